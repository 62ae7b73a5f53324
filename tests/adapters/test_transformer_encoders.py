"""BERT, RoBERTa and DistilBERT adapters: site tables, exactness at full width, and reloadable narrower models."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import optimum_rmtkd  # noqa: F401  (registers the per-layer model types)
from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.calibration import collect_statistics
from optimum_rmtkd.configuration import RMTKDConfig
from optimum_rmtkd.modeling.per_layer import as_registered_type
from optimum_rmtkd.saving import save_compressed_model

@pytest.fixture(scope="module")
def sharp_dir(encoder_dir, tmp_path_factory):
    """The tiny encoder with query/key weights scaled up: randomly initialised attention (std 0.02) is almost
    uniform and would hide a wrong head size or score scale; sharp attention does not."""
    model = AutoModelForSequenceClassification.from_pretrained(encoder_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("query.weight", "key.weight", "q_lin.weight", "k_lin.weight")):
                param.mul_(40.0)
    path = tmp_path_factory.mktemp("sharp")
    model.save_pretrained(path)
    return path


FIELDS = {"bert": ("hidden_size", "intermediate_size"), "roberta": ("hidden_size", "intermediate_size"),
          "distilbert": ("dim", "hidden_dim")}


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(5, 100, (4, 11), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        mask[3, 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _reduce(model_dir, hidden, ffn, output_format="stock", **config):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    adapter = get_adapter(model)
    sites = adapter.sites(model)
    stats = collect_statistics(model, _batches(), adapter.required_captures(sites))
    widths = {s.name: (s.dim if hidden is None else hidden) if s.kind == "hidden" else (s.dim if ffn is None else ffn)
              for s in sites}
    return adapter.reduce(model, sites, widths, stats, RMTKDConfig(output_format=output_format, **config))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_site_table(encoder_dir):
    model = AutoModelForSequenceClassification.from_pretrained(encoder_dir)
    sites = get_adapter(model).sites(model)
    assert [(s.kind, s.dim, s.layer) for s in sites] == [("hidden", 32, None), ("ffn", 37, 0), ("ffn", 37, 1)]
    hidden = sites[0]
    # Embeddings LayerNorm plus two LayerNorms per layer write the residual stream.
    assert len(hidden.captures) == 5 and len(hidden.norms) == 5
    for path in hidden.writers + hidden.readers + hidden.norms:
        model.get_submodule(path)  # every table entry names a real module
    # Each reader is refitted where it reads: Q/K/V of layer i after the LayerNorm before them, the FFN input after
    # the attention LayerNorm, the task head's first dense on the pooled [CLS] vector.
    inputs = dict(zip(hidden.readers, hidden.reader_inputs))
    query, ffn_input = ATTENTION[model.config.model_type][0], FFN_INPUT[model.config.model_type]
    assert inputs[f"{_layer_path(model, 1)}.{query}"] == hidden.captures[2]
    assert inputs[f"{_layer_path(model, 0)}.{ffn_input}"] == hidden.captures[1]
    assert hidden.reader_inputs[-1].layout == "vector" and hidden.reader_inputs[-1].side == "input"
    ffn = sites[1]
    assert ffn.reader_inputs == ffn.captures and len(ffn.writers) == len(ffn.readers) == 1


def test_attention_is_sharp_enough_to_matter(sharp_dir):
    model = AutoModelForSequenceClassification.from_pretrained(sharp_dir, attn_implementation="eager").eval()
    probs = model(**_batches()[0], output_attentions=True).attentions[0]
    assert probs.max() > 0.5  # far from uniform over 11 tokens (1/11)


@pytest.mark.parametrize("head_reduction", ["shrink", "prune"])
def test_full_width_reduction_is_exact(sharp_dir, head_reduction):
    reference = AutoModelForSequenceClassification.from_pretrained(sharp_dir).eval()
    reduced = _reduce(sharp_dir, None, None, head_reduction=head_reduction)
    for batch in _batches():
        # float32 round-off through rotations and a float64 solve: far below any change of prediction.
        torch.testing.assert_close(_logits(reduced, batch), _logits(reference, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("head_reduction", "heads"), [("shrink", 4), ("prune", 2)])
def test_narrower_model_has_exact_widths_and_reloads_stock(sharp_dir, tmp_path, head_reduction, heads):
    model = _reduce(sharp_dir, 16, 20, head_reduction=head_reduction)
    hidden_field, ffn_field = FIELDS[model.config.model_type]
    assert getattr(model.config, hidden_field) == 16 and getattr(model.config, ffn_field) == 20
    assert getattr(model.config, ATTENTION[model.config.model_type][2]) == heads
    save_compressed_model(model, None, tmp_path / "out", "stock")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == type(model).__name__
    for name, tensor in model.state_dict().items():
        assert tuple(reloaded.state_dict()[name].shape) == tuple(tensor.shape), name
    batch = _batches()[0]
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model.eval(), batch), rtol=0, atol=0)


FFN_INPUT = {"bert": "intermediate.dense", "roberta": "intermediate.dense", "distilbert": "ffn.lin1"}


def _layer_path(model, index):
    return {"bert": "bert.encoder.layer", "roberta": "roberta.encoder.layer",
            "distilbert": "distilbert.transformer.layer"}[model.config.model_type] + f".{index}"


ATTENTION = {"bert": ("attention.self.query", "attention.output.dense", "num_attention_heads"),
             "roberta": ("attention.self.query", "attention.output.dense", "num_attention_heads"),
             "distilbert": ("attention.q_lin", "attention.out_lin", "n_heads")}


def _layers(model):
    return model.distilbert.transformer.layer if model.config.model_type == "distilbert" else (
        model.base_model.encoder.layer)


def test_head_pruning_keeps_the_strongest_whole_heads_and_reloads_stock(sharp_dir, tmp_path):
    # Heads 0 and 2 (of 4 × 8 channels) write nothing to the residual stream: pruning to 2 heads must drop them,
    # though a "first heads" rule would keep head 0.
    model = AutoModelForSequenceClassification.from_pretrained(sharp_dir)
    query_path, output_path, heads_field = ATTENTION[model.config.model_type]
    with torch.no_grad():
        for layer in _layers(model):
            output = layer.get_submodule(output_path)
            output.weight[:, 0:8] = 0
            output.weight[:, 16:24] = 0
    query_biases = [layer.get_submodule(query_path).bias.detach().clone() for layer in _layers(model)]
    model.save_pretrained(tmp_path / "dead-heads")

    pruned = _reduce(tmp_path / "dead-heads", 16, None, head_reduction="prune")
    hidden_field, _ = FIELDS[pruned.config.model_type]
    assert getattr(pruned.config, hidden_field) == 16 and getattr(pruned.config, heads_field) == 2
    kept = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
    for layer, bias in zip(_layers(pruned), query_biases):
        output = layer.get_submodule(output_path).weight
        assert tuple(output.shape) == (16, 16) and bool((output.abs().sum(dim=0) > 0).all())  # no dead head kept
        # Whole heads, not rotated: the query outputs are heads 1 and 3 as they were (the refit changes only the
        # weight's input side, so the bias is a plain slice), and the score scale is unchanged.
        torch.testing.assert_close(layer.get_submodule(query_path).bias, bias[kept], rtol=0, atol=0)
    save_compressed_model(pruned, None, tmp_path / "out", "stock")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert getattr(reloaded.config, heads_field) == 2
    batch = _batches()[0]
    torch.testing.assert_close(_logits(reloaded, batch), _logits(pruned.eval(), batch), rtol=0, atol=0)


def test_strongest_heads_rank_by_output_energy():
    from optimum_rmtkd.adapters.transformer_encoder import _strongest_heads

    # 3 heads of 2 channels; context second moment Σ = diag(1, 1, 4, 4, 1, 1).
    weight = torch.tensor([[1.0, 0, 1, 0, 3, 0], [0, 1, 0, 1, 0, 0]])
    moment = torch.diag(torch.tensor([1.0, 1, 4, 4, 1, 1], dtype=torch.float64))
    # Energies tr(W_h Σ_h W_hᵀ): head 0 → 2, head 1 → 8, head 2 → 9; kept in their original order.
    assert _strongest_heads(weight, moment, 3, 2).tolist() == [2, 3, 4, 5]
    assert _strongest_heads(weight, moment, 3, 1).tolist() == [4, 5]
    assert _strongest_heads(weight, moment, 3, 3).tolist() == list(range(6))


def test_pruning_needs_a_multiple_of_the_head_size(sharp_dir):
    with pytest.raises(ValueError, match=r"keeps whole heads of 8 channels, so the hidden width must be a multiple "
                                         r"of 8, got 12"):
        _reduce(sharp_dir, 12, None, head_reduction="prune")


def test_per_layer_widths_reload_as_registered_type(encoder_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(encoder_dir).eval()
    adapter = get_adapter(model)
    ffn_sites = [s for s in adapter.sites(model) if s.kind == "ffn"]
    stats = collect_statistics(model, _batches(), adapter.required_captures(ffn_sites))
    stock_type = type(model)
    model = adapter.reduce(model, ffn_sites, {ffn_sites[0].name: 8, ffn_sites[1].name: 24}, stats,
                           RMTKDConfig(output_format="per-layer"))
    # The adapter only edits modules and the config; the registered type is modeling's step (the compressor's too).
    assert type(model) is stock_type and model.config.to_dict()["per_layer_config"]
    cut = model
    model = as_registered_type(model)
    assert type(model).__name__ == f"RMTKD{stock_type.__name__}" and as_registered_type(model) is model
    batch = _batches()[1]
    torch.testing.assert_close(_logits(model, batch), _logits(cut, batch), rtol=0, atol=0)
    save_compressed_model(model, None, tmp_path / "out", "per-layer")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.model_type == model.config.model_type == f"rmtkd_{stock_type.config_class.model_type}"
    assert type(reloaded) is type(model)
    assert (tmp_path / "out" / "modeling_rmtkd.py").is_file() and "auto_map" in reloaded.config.to_dict()
    widths = [s.dim for s in get_adapter(reloaded).sites(reloaded) if s.kind == "ffn"]
    assert widths == [8, 24]
    batch = _batches()[1]
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=0, atol=0)


def test_remote_code_loading_of_per_layer_model(bert_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    adapter = get_adapter(model)
    ffn_sites = [s for s in adapter.sites(model) if s.kind == "ffn"]
    stats = collect_statistics(model, _batches(), adapter.required_captures(ffn_sites))
    model = adapter.reduce(model, ffn_sites, {ffn_sites[0].name: 16, ffn_sites[1].name: 8}, stats,
                           RMTKDConfig(output_format="per-layer"))
    save_compressed_model(model, None, tmp_path / "out", "per-layer")  # a stock class: saving writes the type
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "modeling_rmtkd.RMTKDBertConfig",
        "AutoModelForSequenceClassification": "modeling_rmtkd.RMTKDBertForSequenceClassification",
    }
    assert 'per_layer_classes_for("bert", "BertForSequenceClassification")' in (
        tmp_path / "out" / "modeling_rmtkd.py").read_text()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert reloaded.bert.encoder.layer[1].intermediate.dense.out_features == 8


def test_hidden_cut_after_per_layer_ffn_widths_keeps_them(bert_dir):
    # The compressor's per-layer order: FFN sites one by one (each turned into the registered type), then the hidden
    # width, whose rebuild (attention caches head sizes) must keep the per-layer FFN widths.
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    adapter = get_adapter(model)
    ffn_sites = [s for s in adapter.sites(model) if s.kind == "ffn"]
    config = RMTKDConfig(output_format="per-layer")
    stats = collect_statistics(model, _batches(), adapter.required_captures(ffn_sites))
    model = as_registered_type(adapter.reduce(model, ffn_sites, {ffn_sites[0].name: 8, ffn_sites[1].name: 24}, stats,
                                              config))
    hidden = adapter.sites(model)[0]
    stats = collect_statistics(model, _batches(), adapter.required_captures([hidden]))
    reduced = adapter.reduce(model, [hidden], {"hidden": 16}, stats, config)
    assert type(reduced) is type(model) and reduced is not model
    layers = reduced.bert.encoder.layer
    assert [layer.intermediate.dense.out_features for layer in layers] == [8, 24]
    assert [layer.intermediate.dense.in_features for layer in layers] == [16, 16]


def test_adapters_do_not_import_modeling():
    # One-way dependency: `optimum_rmtkd.modeling` imports the adapters (to resize its layers), never the reverse.
    code = ("import sys, optimum_rmtkd.adapters, optimum_rmtkd.projection; "
            "print(sorted(m for m in sys.modules if m.startswith('optimum_rmtkd.modeling')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stock_format_rejects_unequal_layer_widths(bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    adapter = get_adapter(model)
    ffn_sites = [s for s in adapter.sites(model) if s.kind == "ffn"]
    stats = collect_statistics(model, _batches(), adapter.required_captures(ffn_sites))
    with pytest.raises(ValueError, match="The stock format needs one `intermediate_size` for every layer"):
        adapter.reduce(model, ffn_sites, {ffn_sites[0].name: 16, ffn_sites[1].name: 8}, stats, RMTKDConfig())


def test_unsupported_model_lists_supported_types():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"no adapter for model type 'gpt2' .*supported model types are bert, "
                                         r"distilbert, .*roberta.*optimum_rmtkd/adapters/"):
        get_adapter(model)


def test_kept_width_aligns_heads_for_the_hidden_width(bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    adapter = get_adapter(model)
    hidden, ffn = adapter.sites(model)[:2]
    config = RMTKDConfig(width_multiple=2, min_width=1, head_reduction="shrink")
    # 4 heads × multiple 2: the hidden width steps by 8 so each head's size stays a multiple of 2.
    assert [adapter.kept_width(model, hidden, r, config) for r in (1, 9, 17, 30)] == [8, 16, 24, 32]
    assert [adapter.kept_width(model, ffn, r, config) for r in (0, 9, 36, 37)] == [2, 10, 36, 37]
    assert adapter.kept_width(model, ffn, 3, RMTKDConfig(min_width=64)) == 37  # never above the site's width
    # Pruning whole heads of 8 channels: the width steps by lcm(multiple, 8).
    prune = RMTKDConfig(width_multiple=2, min_width=1, head_reduction="prune")
    assert [adapter.kept_width(model, hidden, r, prune) for r in (1, 9, 17, 30)] == [8, 16, 24, 32]
    prune16 = RMTKDConfig(width_multiple=16, min_width=1, head_reduction="prune")
    assert [adapter.kept_width(model, hidden, r, prune16) for r in (1, 17)] == [16, 32]


@pytest.mark.parametrize("head_reduction", ["shrink", "prune"])
def test_rotation_cut_at_full_width_is_exact(sharp_dir, head_reduction):
    # Every segment rotated by a full orthogonal basis and every LayerNorm folded (DESIGN §8): the model is unchanged,
    # though stock LayerNorms under the same rotation would break it.
    reference = AutoModelForSequenceClassification.from_pretrained(sharp_dir).eval()
    reduced = _reduce(sharp_dir, None, None, head_reduction=head_reduction, hidden_cut="rotation",
                      output_format="per-layer")
    assert reduced.config.rotated_layer_norm_dim == reference.config.to_dict()[FIELDS[reference.config.model_type][0]]
    for batch in _batches():
        torch.testing.assert_close(_logits(reduced, batch), _logits(reference, batch), rtol=1e-5, atol=1e-5)


def test_rotation_cut_reloads_as_registered_type_with_equal_logits(sharp_dir, tmp_path):
    from optimum_rmtkd.layers import RotatedLayerNorm

    model = as_registered_type(_reduce(sharp_dir, 16, None, hidden_cut="rotation", output_format="per-layer"))
    hidden_field, _ = FIELDS[model.config.model_type.removeprefix("rmtkd_")]
    assert getattr(model.config, hidden_field) == 16
    norms = get_adapter(model).sites(model)[0].norms
    for path in norms:
        norm = model.get_submodule(path)
        assert isinstance(norm, RotatedLayerNorm) and tuple(norm.weight.shape) == (16, 16)
        assert norm.normalized_dim == 32 and not norm.centre.requires_grad
    save_compressed_model(model, None, tmp_path / "out", "per-layer")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(model)
    assert all(isinstance(reloaded.get_submodule(path), RotatedLayerNorm) for path in norms)
    batch = _batches()[2]
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model.eval(), batch), rtol=0, atol=0)


def test_rotation_needs_the_per_layer_format():
    with pytest.raises(ValueError, match=r"`hidden_cut='rotation'` stores a k×k matrix per LayerNorm.*add "
                                         r"`output_format='per-layer'`"):
        RMTKDConfig(hidden_cut="rotation")


def test_variance_selection_keeps_the_strongest_coordinates(bert_dir):
    from optimum_rmtkd.adapters.base import Adapter

    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    adapter = get_adapter(model)
    hidden = adapter.sites(model)[0]
    stats = collect_statistics(model, _batches(), adapter.required_captures([hidden]))
    from optimum_rmtkd.covariance import merged

    diagonal = torch.diagonal(merged([stats[p.key] for p in hidden.captures]).second_moment())
    keep = Adapter.site_channels(hidden, 8, stats, RMTKDConfig(channel_selection="variance"))
    assert keep.tolist() == sorted(torch.topk(diagonal, 8).indices.tolist())
    assert RMTKDConfig().channel_selection == "variance"
    qr = Adapter.site_channels(hidden, 8, stats, RMTKDConfig(channel_selection="qr"))
    assert qr.numel() == 8 and qr.tolist() == sorted(qr.tolist())
