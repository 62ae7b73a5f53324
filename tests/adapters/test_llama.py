"""Llama, Mistral and Qwen2 decoders: site tables, exactness at full width, grouped-query head pruning, the exact
hidden rotation, and narrower models that stock `AutoModelForCausalLM` reloads with the same logits and generations."""
import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.adapters.base import rebuild
from optimum_rmtkd.adapters.llama import allowed_factorizations, grouped_head_counts, plan_heads
from optimum_rmtkd.calibration import collect_statistics
from optimum_rmtkd.configuration import RMTKDConfig
from optimum_rmtkd.projection import norm_with_weight

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
HEAD_DIM = 8


def _model(family="llama", tied=False, kv_heads=3, hidden=48):
    """A tiny random decoder with odd sizes (FFN 37, 6 heads of 8 in `kv_heads` groups, vocabulary 100).

    Weights are drawn with std 0.15 rather than 0.02 so that attention is far from uniform (the mean largest weight of
    a late query is about 0.45, not 1/11) and logits are of order 1-5, so a wrong head, scale or ε would show; RMSNorm
    weights are drawn around 1 so that folding them into the readers matters.
    """
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=100, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=kv_heads, head_dim=HEAD_DIM, max_position_embeddings=64, initializer_range=0.15,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
    return model


def _batches():
    """Random token batches with left padding (as generation pads) in two rows."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(2, 100, (4, 11), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        mask[3, :7] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _stats(model, sites):
    return collect_statistics(model, _batches(), get_adapter(model).required_captures(sites))


def _cut(model, kind, width, config=None):
    """Cut every site of `kind` to `width` on fresh statistics; returns the cut model."""
    adapter = get_adapter(model)
    sites = [s for s in adapter.sites(model) if s.kind == kind]
    widths = {s.name: s.dim if width is None else width for s in sites}
    return adapter.reduce(model, sites, widths, _stats(model, sites), config or RMTKDConfig())


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def _params(model):
    return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter


def test_site_table():
    model = _model("llama")
    adapter = get_adapter(model)
    sites = adapter.sites(model)
    assert [(s.kind, s.dim, s.layer) for s in sites] == [
        ("hidden", 48, None), ("heads", 48, 0), ("heads", 48, 1), ("ffn", 37, 0), ("ffn", 37, 1)
    ]
    hidden, heads, ffn = sites[0], sites[1], sites[3]
    assert heads.name == "model.layers.0.self_attn" and ffn.name == "model.layers.0.mlp"
    for site in sites:
        for path in site.writers + site.readers + site.norms + tuple(p.module for p in site.captures):
            model.get_submodule(path)  # every table entry names a real module
    # The stream is read after the embedding and after every layer; 2 RMSNorms per layer and the final one.
    assert [p.module for p in hidden.captures] == ["model.embed_tokens", "model.layers.0", "model.layers.1"]
    assert len(hidden.norms) == 5 and hidden.writers[0] == "model.embed_tokens"
    inputs = dict(zip(hidden.readers, hidden.reader_inputs))
    assert inputs["model.layers.1.self_attn.k_proj"].module == "model.layers.1.input_layernorm"
    assert inputs["model.layers.0.mlp.up_proj"].module == "model.layers.0.post_attention_layernorm"
    assert inputs["lm_head"].module == "model.norm"
    assert ffn.writers == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert ffn.readers == ("model.layers.0.mlp.down_proj",) and ffn.reader_inputs == ffn.captures
    assert heads.captures[0].key == "model.layers.0.self_attn.o_proj:input"
    # The rotation refits no reader: the RMSNorm outputs are not calibrated.
    keys = {p.key for p in adapter.required_captures(sites)}
    assert not any("layernorm" in key or key.startswith("model.norm") for key in keys)
    assert all(p.layout == "sequence" for p in adapter.required_captures(sites))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["ffn", "heads", "hidden"])
def test_full_width_cut_is_exact(family, tied, kind):
    model = _model(family, tied=tied, kv_heads=2 if family == "mistral" else 3)
    reference = copy.deepcopy(model)
    cut = _cut(model, kind, None)
    assert cut.config.head_dim == HEAD_DIM
    for batch in _batches():
        # float32 round-off of a float64 rotation (or none: slices and refits are exact copies at full width).
        torch.testing.assert_close(_logits(cut, batch), _logits(reference, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hidden_cut_is_exact_when_the_stream_spans_k_dimensions(family):
    # Writers confined to a 24-dimensional subspace U: the stream's second moment has rank 24, the rotation keeps U,
    # and the cut to 24 loses nothing, which checks the RMSNorm weight √(d/k) and ε·d/k (ε is made large, 0.05, so
    # that a wrong ε shows).
    model = _model(family, tied=True)
    model.config.rms_norm_eps = 0.05
    model = rebuild(model)
    basis, _ = torch.linalg.qr(torch.randn(48, 24, generator=torch.Generator().manual_seed(1)))
    span = basis @ basis.T
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ span)  # also the tied head's weight
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(span @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(span @ layer.mlp.down_proj.weight)
    reference = copy.deepcopy(model)
    cut = _cut(model, "hidden", 24)
    assert cut.config.hidden_size == 24 and cut.config.rms_norm_eps == pytest.approx(0.1)
    for batch in _batches():
        torch.testing.assert_close(_logits(cut, batch), _logits(reference, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_cuts_reload_stock_with_equal_logits_and_generations(family, tied, tmp_path):
    model = _model(family, tied=tied, kv_heads=2)
    adapter = get_adapter(model)
    for kind, width in (("ffn", 20), ("heads", 32), ("hidden", 24)):
        sites = [s for s in adapter.sites(model) if s.kind == kind]
        widths = {s.name: width for s in sites}
        stats = _stats(model, sites)
        predicted = adapter.parameters_after_cut(model, sites, widths, stats)
        model = adapter.reduce(model, sites, widths, stats, RMTKDConfig())
        assert _params(model) == predicted, kind
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.head_dim) == (24, 20, HEAD_DIM)
    # 6 heads in 2 groups of 3 keep 4: both groups, 2 query heads from each.
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings is False and config.rms_norm_eps == pytest.approx(1e-6 * 48 / 24)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    for name, tensor in model.state_dict().items():
        assert tuple(reloaded.state_dict()[name].shape) == tuple(tensor.shape), name
    assert tuple(reloaded.model.layers[1].self_attn.k_proj.weight.shape) == (2 * HEAD_DIM, 24)
    batch = _batches()[0]
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=0, atol=0)
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(reloaded.generate(**batch, max_new_tokens=8, do_sample=False), generated)
    assert len(set(generated[:, -8:].flatten().tolist())) > 2  # a real continuation, not one repeated token


@pytest.mark.parametrize(("kv_heads", "count", "factorization"), [
    (3, 4, (2, 2)),  # drops a whole key/value group with its query heads
    (3, 3, (3, 1)),  # keeps every group, one query head from each
    (2, 4, (2, 2)),  # keeps both groups, 2 of the 3 query heads from each
    (2, 3, (1, 3)),  # keeps one whole group
])
def test_head_pruning_equals_zeroed_output_columns(kv_heads, count, factorization, tmp_path):
    model = _model("qwen2", kv_heads=kv_heads)
    reference = copy.deepcopy(model)
    adapter = get_adapter(model)
    sites = [s for s in adapter.sites(model) if s.kind == "heads"]
    stats = _stats(model, sites)
    plans = plan_heads([adapter.head_energies(model, s.layer, stats) for s in sites], kv_heads, count)
    assert {(len(p.groups), len(p.heads) // len(p.groups)) for p in plans} == {factorization}
    cut = adapter.reduce(model, sites, {s.name: count * HEAD_DIM for s in sites}, stats, RMTKDConfig())
    assert (cut.config.num_attention_heads, cut.config.num_key_value_heads) == (count, factorization[0])
    with torch.no_grad():
        for layer, plan in zip(reference.model.layers, plans):
            dropped = [h for h in range(6) if h not in plan.heads]
            for h in dropped:
                layer.self_attn.o_proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
    for batch in _batches():
        # The same sums with the zero terms left out: equal up to float32 summation order.
        torch.testing.assert_close(_logits(cut, batch), _logits(reference, batch), rtol=1e-5, atol=1e-5)
    cut.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, _batches()[0]), _logits(cut, _batches()[0]), rtol=0, atol=0)


@pytest.mark.parametrize(("kv_heads", "dead", "heads", "groups"), [
    # 6 heads in 3 groups of 2; group 1 (heads 2, 3) writes nothing: 4 heads keep groups 0 and 2 whole.
    (3, (2, 3), (0, 1, 4, 5), (0, 2)),
    # 6 heads in 2 groups of 3; heads 1 and 4 write nothing: 4 heads keep both groups without them.
    (2, (1, 4), (0, 2, 3, 5), (0, 1)),
])
def test_head_pruning_keeps_the_heads_with_output_energy(kv_heads, dead, heads, groups):
    model = _model("llama", kv_heads=kv_heads)
    with torch.no_grad():
        for layer in model.model.layers:
            for h in dead:
                layer.self_attn.o_proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
    keys = [layer.self_attn.k_proj.weight.detach().clone() for layer in model.model.layers]
    queries = [layer.self_attn.q_proj.weight.detach().clone() for layer in model.model.layers]
    cut = _cut(model, "heads", 4 * HEAD_DIM)

    def rows(weight, indices):
        return torch.cat([weight[i * HEAD_DIM:(i + 1) * HEAD_DIM] for i in indices])

    for layer, key, query in zip(cut.model.layers, keys, queries):
        # Whole heads, not rotated: the kept rows are the originals.
        torch.testing.assert_close(layer.self_attn.k_proj.weight, rows(key, groups), rtol=0, atol=0)
        torch.testing.assert_close(layer.self_attn.q_proj.weight, rows(query, heads), rtol=0, atol=0)
        assert bool((layer.self_attn.o_proj.weight.abs().sum(dim=0) > 0).all())  # no dead head kept


def test_grouped_head_counts_and_factorizations():
    # SmolLM2: 9 heads in 3 groups can become 6 in 3 groups (2 from each) or 6 in 2 (whole groups).
    assert grouped_head_counts(9, 3) == [1, 2, 3, 4, 6, 9]
    assert allowed_factorizations(9, 3, 6) == [(3, 2), (2, 3)]
    assert grouped_head_counts(6, 2) == [1, 2, 3, 4, 6] and allowed_factorizations(6, 2, 5) == []
    with pytest.raises(ValueError, match=r"5 query heads cannot be kept from 6 heads in 2 key/value groups; the counts "
                                         r"allowed are \[1, 2, 3, 4, 6\]"):
        plan_heads([torch.ones(6)], 2, 5)
    # On equal energies the factorisation with more groups wins, and the lower-numbered heads.
    assert [(p.heads, p.groups) for p in plan_heads([torch.ones(9)], 3, 6)] == [((0, 1, 3, 4, 6, 7), (0, 1, 2))]


def test_heads_width_must_be_a_count_the_groups_allow():
    model = _model("mistral", kv_heads=2)
    with pytest.raises(ValueError, match=r"Layer 0 has 6 attention heads of 8 channels in 2 key/value groups, so "
                                         r"`model.layers.0.self_attn` can keep \[8, 16, 24, 32, 48\] channels "
                                         r"\(\[1, 2, 3, 4, 6\] heads: .*got 40"):
        _cut(model, "heads", 40)


def test_kept_width_rounds_to_whole_heads_the_layout_allows():
    config = RMTKDConfig(width_multiple=8, min_width=8)
    model = _model("mistral", kv_heads=2)
    adapter = get_adapter(model)
    heads = next(s for s in adapter.sites(model) if s.kind == "heads")
    # 1 head covers 8 channels; 17 need 3 heads; 33 need 5, which 2 groups of 3 cannot hold, so all 6.
    assert [adapter.kept_width(model, heads, r, config) for r in (0, 8, 17, 25, 33)] == [8, 8, 24, 32, 48]
    hidden = adapter.sites(model)[0]
    assert adapter.kept_width(model, hidden, 17, config) == 24  # Mistral: only width_multiple
    # Llama with hidden size 42: only head counts dividing 42 (1, 2, 3, 6); the hidden width steps by lcm(8, 6).
    llama = _model("llama", kv_heads=2, hidden=42)
    adapter = get_adapter(llama)
    hidden, heads = adapter.sites(llama)[:2]
    assert adapter.allowed_head_counts(llama, 0) == [1, 2, 3, 6]
    assert [adapter.kept_width(llama, heads, r, config) for r in (17, 25)] == [24, 48]
    assert [adapter.kept_width(llama, hidden, r, config) for r in (5, 25)] == [24, 42]


def test_llama_refuses_a_head_count_that_does_not_divide_the_hidden_size():
    model = _model("llama", kv_heads=2, hidden=42)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = (r"`num_attention_heads` must divide `hidden_size` in a LlamaConfig, which refuses to build otherwise, "
               r"got 4 heads for a hidden size of 42; cut to a head count")
    with pytest.raises(ValueError, match=message):
        _cut(model, "heads", 4 * HEAD_DIM)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any edit
    with pytest.raises(ValueError, match=r"got 6 heads for a hidden size of 40"):
        _cut(_model("llama", kv_heads=2), "hidden", 40)
    # Mistral does not check: the same cuts build and reload.
    mistral = _cut(_cut(_model("mistral", kv_heads=2, hidden=42), "heads", 4 * HEAD_DIM), "hidden", 37)
    assert (mistral.config.hidden_size, mistral.config.num_attention_heads) == (37, 4)


def test_tied_hidden_cut_costs_the_untied_head():
    model = _model("qwen2", tied=True)
    adapter = get_adapter(model)
    hidden = adapter.sites(model)[0]
    before = _params(model)
    assert adapter.parameters_after_cut(model, [], {}) == before
    # Each hidden dimension holds 615 parameters here (embedding 100, 257 per layer, final norm 1). Cutting 4 of 48
    # saves 2,460 but untying the head adds vocabulary × k = 4,400; cutting 32 saves 19,680 and adds 1,600.
    assert adapter.parameters_after_cut(model, [hidden], {"hidden": 44}) == before - 2460 + 4400
    assert adapter.parameters_after_cut(model, [hidden], {"hidden": 16}) == before - 19680 + 1600
    cut = _cut(model, "hidden", 44)
    assert cut.lm_head.weight is not cut.model.embed_tokens.weight and cut.config.tie_word_embeddings is False
    assert _params(cut) == before - 2460 + 4400


def test_per_layer_widths_rebuild_from_the_config():
    # The stock classes build every layer at the global widths; `resize_per_layer` gives them the recorded ones
    # (saving this format needs the registered decoder type).
    model = _model("llama", kv_heads=3)
    adapter = get_adapter(model)
    config = RMTKDConfig(output_format="per-layer")
    ffn = [s for s in adapter.sites(model) if s.kind == "ffn"]
    model = adapter.reduce(model, ffn, {ffn[0].name: 16, ffn[1].name: 24}, _stats(model, ffn), config)
    heads = [s for s in adapter.sites(model) if s.kind == "heads"]
    model = adapter.reduce(model, heads, {heads[0].name: 24, heads[1].name: 32}, _stats(model, heads), config)
    # transformers keeps only the values that differ from the global ones (layer 0 keeps its 3 groups).
    assert model.config.to_dict()["per_layer_config"] == {
        "0": {"intermediate_size": 16, "num_attention_heads": 3},
        "1": {"intermediate_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2},
    }
    rebuilt = rebuild(model)
    assert [adapter.layer_heads(rebuilt, i) for i in range(2)] == [(3, 3), (4, 2)]
    assert [layer.mlp.down_proj.in_features for layer in rebuilt.model.layers] == [16, 24]
    batch = _batches()[1]
    torch.testing.assert_close(_logits(rebuilt, batch), _logits(model, batch), rtol=0, atol=0)


def test_stock_format_needs_one_width_for_every_layer():
    model = _model("llama")
    adapter = get_adapter(model)
    ffn = [s for s in adapter.sites(model) if s.kind == "ffn"]
    with pytest.raises(ValueError, match="The stock format needs one `intermediate_size` for every layer"):
        adapter.reduce(model, ffn, {ffn[0].name: 16, ffn[1].name: 24}, _stats(model, ffn), RMTKDConfig())


def test_stages_of_the_configured_kinds():
    model = _model("llama")
    stages = get_adapter(model).stages(model, RMTKDConfig(sites=("ffn", "hidden")))
    assert [[s.name for s in group] for group in stages] == [["model.layers.0.mlp", "model.layers.1.mlp"], ["hidden"]]


def test_unsupported_decoder_lists_supported_types():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"no adapter for model type 'gpt2' .*supported model types are .*llama, "
                                         r"mistral, qwen2.*optimum_rmtkd/adapters/"):
        get_adapter(model)


def test_norm_with_weight_needs_a_weight_only_norm():
    with pytest.raises(TypeError, match=r"`norm_with_weight` needs a module whose only parameter is `weight`, got "
                                        r"LayerNorm with parameters \['weight', 'bias'\]"):
        norm_with_weight(torch.nn.LayerNorm(4), torch.ones(2))
