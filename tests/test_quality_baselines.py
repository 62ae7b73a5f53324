"""The quality benchmark's baselines (`optimum_rmtkd.baselines`) on tiny models and synthetic spectra, and its report
helpers (`benchmarks.quality`)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.baselines import (
    cut_channels,
    drop_layers,
    explained_variance_width,
    magnitude_channels,
    random_channels,
    variance_channels,
)
from optimum_rmtkd.calibration import collect_statistics
from optimum_rmtkd.configuration import RMTKDConfig
from optimum_rmtkd.projection import select_channels


def _linear_pair(dim: int = 6) -> tuple[nn.Linear, nn.Linear]:
    writer, reader = nn.Linear(4, dim), nn.Linear(dim, 3)
    with torch.no_grad():
        writer.weight.fill_(1.0)
        reader.weight.fill_(1.0)
        writer.weight[2] *= 5.0  # channel 2: large writer row
        reader.weight[:, 4] *= 3.0  # channel 4: large reader column
        writer.weight[1] *= 0.5
        reader.weight[:, 1] *= 100.0  # channel 1: product 50, the largest, though its writer row is the smallest
    return writer, reader


def test_magnitude_picks_largest_writer_row_times_reader_column_norms():
    writer, reader = _linear_pair()
    # Scores ∝ 1, 50, 5, 1, 3, 1: the two largest are channels 1 and 2, returned sorted.
    assert magnitude_channels(writer, reader, 2).tolist() == [1, 2]
    assert magnitude_channels(writer, reader, 3).tolist() == [1, 2, 4]
    assert magnitude_channels(writer, reader, 6).tolist() == list(range(6))


def test_magnitude_rejects_mismatched_sides_and_bad_width():
    writer, reader = _linear_pair()
    with pytest.raises(ValueError, match=r"`writer` produces 6 channels but `reader` reads 5"):
        magnitude_channels(writer, nn.Linear(5, 3), 2)
    with pytest.raises(ValueError, match=r"`width` must be an integer in \[1, 6\], got 7."):
        magnitude_channels(writer, reader, 7)


def test_variance_picks_largest_diagonal_not_largest_eigenvector():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 5, dtype=torch.float64, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0, 0.1], dtype=torch.float64)
    sigma = x.T @ x / x.shape[0]
    assert variance_channels(sigma, 2).tolist() == [1, 3]
    # Two equal diagonals: the lower index wins, so the choice is deterministic.
    assert variance_channels(torch.diag(torch.tensor([2.0, 5.0, 5.0, 1.0])), 1).tolist() == [1]
    with pytest.raises(ValueError, match=r"`second_moment` must be a square matrix, got shape \(2, 3\)."):
        variance_channels(torch.zeros(2, 3), 1)


def test_random_channels_are_seeded_reproducible_and_valid():
    first, again, other = random_channels(50, 10, seed=3), random_channels(50, 10, seed=3), random_channels(50, 10, seed=4)
    assert first.tolist() == again.tolist()
    assert first.tolist() != other.tolist()
    assert first.tolist() == sorted(set(first.tolist())) and len(first) == 10
    assert 0 <= int(first.min()) and int(first.max()) < 50
    assert random_channels(7, 7, seed=0).tolist() == list(range(7))
    with pytest.raises(ValueError, match=r"`width` must be an integer in \[1, 7\], got 0."):
        random_channels(7, 0, seed=0)
    with pytest.raises(ValueError, match=r"`dim` must be a positive integer, got 0."):
        random_channels(0, 1, seed=0)


def test_explained_variance_width_on_a_synthetic_spectrum():
    # 40% + 30% + 20% = 90% exactly at k = 3 (round-off must not push it to 4); 10 tiny tail values share the rest.
    spectrum = [40.0, 30.0, 20.0] + [1.0] * 10
    assert explained_variance_width(spectrum, 0.9) == 3
    assert explained_variance_width(spectrum[::-1], 0.9) == 3  # any input order
    assert explained_variance_width(spectrum, 0.91) == 4
    assert explained_variance_width(spectrum, 0.4) == 1
    assert explained_variance_width(spectrum, 1.0) == 13
    assert explained_variance_width([1.0] * 20, 0.9) == 18  # a flat spectrum needs 90% of its width
    with pytest.raises(ValueError, match=r"`fraction` must be in \(0, 1\], got 1.5."):
        explained_variance_width(spectrum, 1.5)
    with pytest.raises(ValueError, match=r"`eigenvalues` must hold at least one positive value."):
        explained_variance_width([0.0, 0.0])


def _calibration_batches(n_batches: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        ids = torch.randint(5, 100, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        yield {"input_ids": ids, "attention_mask": mask}


def test_cut_channels_with_qr_keep_reproduces_the_adapter_cut(bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    adapter = get_adapter(model)
    ffn = [s for s in adapter.sites(model) if s.kind == "ffn"]
    stats = collect_statistics(model, list(_calibration_batches()), adapter.required_captures(ffn))
    widths = {s.name: 16 for s in ffn}
    config = RMTKDConfig(output_format="per-layer", channel_selection="qr")
    library = adapter.reduce(copy.deepcopy(model), ffn, widths, stats, config)
    ours = copy.deepcopy(model)
    for site in ffn:
        acc = stats[site.captures[0].key]
        keep = select_channels(acc.eigh().eigenvectors, widths[site.name])
        cut_channels(ours, site, keep, acc.second_moment(), config.ridge)
    batch = next(iter(_calibration_batches(1, seed=5)))
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, library(**batch).logits, rtol=0, atol=0)
    assert ours.get_submodule(ffn[0].writers[0]).out_features == 16
    assert ours.get_submodule(ffn[0].readers[0]).in_features == 16


def test_cut_channels_keeping_every_channel_is_exact(bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    adapter = get_adapter(model)
    ffn = [s for s in adapter.sites(model) if s.kind == "ffn"]
    stats = collect_statistics(model, list(_calibration_batches()), adapter.required_captures(ffn))
    cut = copy.deepcopy(model)
    for site in ffn:
        cut_channels(cut, site, torch.arange(site.dim), stats[site.captures[0].key].second_moment(), 1e-4)
    batch = next(iter(_calibration_batches(1, seed=5)))
    with torch.no_grad():
        torch.testing.assert_close(cut(**batch).logits, model(**batch).logits)


def test_cut_channels_rejects_a_site_with_several_readers(bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    hidden = next(s for s in get_adapter(model).sites(model) if s.kind == "hidden")
    with pytest.raises(ValueError, match=r"`site` must be a non-linear site with one writer and one reader"):
        cut_channels(model, hidden, torch.arange(4), torch.eye(32), 1e-4)


def _layer_parameters(model: nn.Module, prefix: str, index: int) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"{prefix}.{index}."))


def test_drop_layers_reloads_stock_with_expected_size_and_weights(encoder_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(encoder_dir).eval()
    layout = get_adapter(model).layout
    student = drop_layers(model, [1])
    assert getattr(student.config, layout.layers_field) == 1
    expected = sum(p.numel() for p in model.parameters()) - _layer_parameters(model, layout.layers, 0)
    assert sum(p.numel() for p in student.parameters()) == expected
    student.save_pretrained(tmp_path / "dropped")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dropped").eval()
    assert sum(p.numel() for p in reloaded.parameters()) == expected
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    for name, tensor in reloaded_state.items():
        source = name.replace(f"{layout.layers}.0.", f"{layout.layers}.1.")
        torch.testing.assert_close(tensor, original_state[source], rtol=0, atol=0)
    # Keeping every layer gives back the same function.
    batch = {"input_ids": torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        torch.testing.assert_close(drop_layers(model, [0, 1])(**batch).logits, model(**batch).logits)


def test_drop_layers_rejects_bad_indices(bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    for bad in ([], [0, 0], [2]):
        with pytest.raises(ValueError, match=r"`keep_layers` must be distinct layer indices in \[0, 1\]"):
            drop_layers(model, bad)


# --- the benchmark's report helpers (pure functions of stored results) ------------------------------------------------
def test_pareto_front_keeps_only_undominated_arms():
    from benchmarks.quality import pareto_front

    arms = {
        "big": {"parameters": 10.0, "accuracy": 0.90},
        "small": {"parameters": 5.0, "accuracy": 0.80},
        "dominated": {"parameters": 6.0, "accuracy": 0.79},  # bigger and worse than `small`
        "tie": {"parameters": 10.0, "accuracy": 0.90},  # equal to `big` on both counts: neither dominates
    }
    assert pareto_front(arms) == ["small", "big", "tie"]


def test_paired_difference_verdicts_and_single_seed_floor():
    from benchmarks.quality import paired_difference

    n = 400
    better = {0: {"correct": [1] * 360 + [0] * 40}}  # 90%
    worse = {0: {"correct": [1] * 320 + [0] * 80}}  # 80%, the same examples wrong plus 40 more
    close = {0: {"correct": [1] * 356 + [0] * 44}}  # 89%
    result = paired_difference(better, worse, "")
    assert result["verdict"] == "win" and result["delta"] == pytest.approx(0.1)
    # Paired SE: the difference is 1 on 40 of 400 examples, 0 elsewhere.
    assert result["se"] == pytest.approx(float(np.std([1] * 40 + [0] * 360, ddof=1)) / np.sqrt(n))
    assert paired_difference(worse, better, "")["verdict"] == "lose"
    # 1 pt apart with a tiny paired SE is still a tie with one seed (below DESIGN §8's 1.5 pt).
    assert paired_difference(better, close, "")["verdict"] == "tie"
    assert paired_difference(better, {1: better[0]}, "") is None  # no common seed


def test_select_arms_keeps_the_order_of_the_patterns():
    from benchmarks.quality import select_arms

    chosen = select_arms(["control", "qr_mp-median", "*_mp-median"])
    assert chosen == ["control", "qr_mp-median", "magnitude_mp-median", "variance_mp-median", "random_mp-median"]
