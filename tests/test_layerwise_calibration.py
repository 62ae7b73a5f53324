"""Calibration one layer at a time (for models larger than memory) gives the whole-model pass's statistics, with the
weights in memory or offloaded to disk through Accelerate."""
import pytest
import torch
from _models import save_tiny_decoder
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.calibration import collect_statistics, layerwise_layout


def _batches(vocab_size: int):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(10):
        mask = torch.ones(9, dtype=torch.long)
        mask[9 - i % 4:] = 0  # some right padding: the mask must follow each batch through the layers
        rows.append({"input_ids": torch.randint(3, vocab_size, (9,), generator=g), "attention_mask": mask})
    return DataLoader(rows, batch_size=4)


def _points(model):
    adapter = get_adapter(model)
    sites = adapter.sites(model)
    # Every site kind, and the final norm's output (a point after the layers, reached through the tail).
    points = adapter.required_captures(sites)
    return adapter, points + [p for s in sites for p in s.reader_inputs if p.module == "model.norm"]


@pytest.mark.parametrize("family, tied", [("llama", False), ("mistral", True)])
def test_layer_by_layer_equals_the_whole_model_pass(tmp_path, family, tied):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_decoder(tmp_path / "m", family, tied)).eval()
    adapter, points = _points(model)
    whole = collect_statistics(model, _batches(model.config.vocab_size), points, forward_kwargs={"use_cache": False})
    layout = layerwise_layout(adapter, model, RMTKDConfig(layerwise_calibration=True))
    assert layout.layers == "model.layers" and layout.tail == ("model.norm",)
    layered = collect_statistics(model, _batches(model.config.vocab_size), points,
                                 forward_kwargs={"use_cache": False}, layerwise=layout,
                                 offload_folder=tmp_path / "statistics")
    assert set(layered) == set(whole) == {p.key for p in points}
    for key in whole:
        assert layered[key].n_samples == whole[key].n_samples > 0
        torch.testing.assert_close(layered[key].sum_outer, whole[key].sum_outer, rtol=1e-9, atol=1e-9)
    # Every finished layer's sums went to disk before the next layer ran; the final norm's (a tail point) stay.
    inside = {p.key for p in points if p.module.startswith("model.layers.")}
    assert inside and {key for key, acc in layered.items() if acc.is_offloaded} == inside
    assert len(list((tmp_path / "statistics").iterdir())) == len(inside)
    assert not whole[next(iter(inside))].is_offloaded


def test_layer_by_layer_with_weights_offloaded_to_disk(tmp_path):
    folder = save_tiny_decoder(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    adapter, points = _points(model)
    whole = collect_statistics(model, _batches(model.config.vocab_size), points, forward_kwargs={"use_cache": False})
    # Embeddings in memory, every decoder layer, the final norm and the head on disk (Accelerate's offload hooks
    # load a module's weights for its forward and drop them after).
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "disk",
                  "lm_head": "disk"}
    offloaded = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map,
                                                     offload_folder=tmp_path / "offload").eval()
    assert offloaded.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    layered = collect_statistics(offloaded, _batches(model.config.vocab_size), points,
                                 forward_kwargs={"use_cache": False},
                                 layerwise=layerwise_layout(adapter, offloaded, RMTKDConfig(layerwise_calibration=True)))
    for key in whole:
        torch.testing.assert_close(layered[key].sum_outer, whole[key].sum_outer, rtol=1e-9, atol=1e-9)


def test_layerwise_calibration_needs_an_adapter_that_names_its_layers(bert_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    with pytest.raises(ValueError, match="`layerwise_calibration=True` needs an adapter that names the model's layers"):
        layerwise_layout(get_adapter(model), model, RMTKDConfig(layerwise_calibration=True))
    assert layerwise_layout(get_adapter(model), model, RMTKDConfig()) is None


def test_the_compressor_calibrates_layer_by_layer_to_the_same_widths(tmp_path):
    from _models import counting_texts

    from optimum_rmtkd import RMTKDCompressor

    source = save_tiny_decoder(tmp_path / "m")
    fast = dict(batch_size=8, max_length=16, max_distillation_steps=1, width_multiple=4, min_width=4,
                estimator="mp-median", max_metric_drop=None, sites=("ffn", "heads"), max_stages=1)
    reports = {}
    for layerwise in (False, True):
        result = RMTKDCompressor.from_pretrained(source).compress(
            counting_texts(80, 0), counting_texts(24, 1), RMTKDConfig(**fast, layerwise_calibration=layerwise),
            save_directory=tmp_path / f"out-{layerwise}")
        reports[layerwise] = result.report
    widths = {flag: [(s["name"], s["kept_width"]) for s in report["sites"]] for flag, report in reports.items()}
    assert widths[True] == widths[False] and len(widths[True]) == 2
    assert reports[True]["calibration_peak_rss_mb"] > 0
    # The offloaded statistics lived in the run's checkpoint folder, removed with it when the run succeeded.
    assert not (tmp_path / "out-True.checkpoints").exists()
