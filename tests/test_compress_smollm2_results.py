"""The decoder benchmark's results (`benchmarks.compress_smollm2`): the per-seed headline, its table and its plot,
built from seed records as a resumed benchmark builds them."""
from __future__ import annotations

import pytest

from benchmarks.compress_smollm2 import PROMPTS, headline, plot, render


def _seed_record(seed: int, compressed: float, control: float | None) -> dict:
    sites = [{"name": f"model.layers.{i}.mlp", "kind": "ffn", "original_width": 48, "kept_width": 24, "rank": 20 + i,
              "ranks_by_estimator": {"mp-median": 20 + i, "gavish-donoho": 15 + i}} for i in range(3)]
    sites.append({"name": "model.layers.0.self_attn", "kind": "heads", "original_width": 64, "kept_width": 48,
                  "rank": 40, "ranks_by_estimator": {"mp-median": 40, "gavish-donoho": 30}})
    return {
        "weights": "tiny", "text": "tiny", "reduction": 0.25,
        "budget": {"block_size": 16, "batch_size": 2, "calibration_blocks": 4, "distill_steps_per_stage": 3,
                   "learning_rate": 1e-4, "train_paragraphs": 10, "eval_paragraphs": 5, "seed": seed},
        "original": {"test_perplexity": 50.0, "completions": ["a"] * len(PROMPTS),
                     "parameters": {"total": 1000, "without_embeddings": 600}},
        "compressed": {"test_perplexity": compressed, "completions": ["b"] * len(PROMPTS),
                       "parameters": {"total": 750, "without_embeddings": 350}},
        "control_self_distilled": None if control is None else {"test_perplexity": control, "distill_steps": 3},
        "sites": sites, "stop_reason": "target reached",
        "stages": [{"stage": 1, "sites": [s["name"] for s in sites], "metric_before_distillation": 90.0,
                    "metric_after_distillation": compressed}],
        "calibration_peak_rss_mb": 100.0, "timings_s": {"compress_s": 1.0},
    }


def test_headline_pairs_each_seed_with_its_control():
    seeds = headline([_seed_record(0, 60.0, 40.0), _seed_record(1, 66.0, 44.0)])
    assert [row["ratio"] for row in seeds["runs"]] == [pytest.approx(1.5), pytest.approx(1.5)]
    mean, std = seeds["mean_std"]["compressed"]
    assert mean == pytest.approx(63.0) and std == pytest.approx(4.242640687, rel=1e-6)


def test_table_and_plot_from_seed_records(tmp_path):
    records = [_seed_record(0, 60.0, 40.0), _seed_record(1, 66.0, 44.0)]
    summary = {**records[0], "seeds": headline(records)}
    text = render(summary)
    assert "| mean ± std (n=2) | | 63.00 ± 4.24 | 42.00 ± 2.83 | 1.500 ± 0.000 |" in text
    assert "| model.layers.0.self_attn | heads | 64 | 48 | 40 | mp-median: 40, gavish-donoho: 30 |" in text

    plot(summary, tmp_path / "results.png")
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_a_control(tmp_path):
    records = [_seed_record(0, 60.0, None)]
    summary = {**records[0], "seeds": headline(records)}
    assert "| 0 | 750 | 60.00 | - | - |" in render(summary)
    plot(summary, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 0
