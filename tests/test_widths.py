"""`decide_widths`: the one width decision shared by `compress`, `analyze_model` and the quality benchmark."""
from __future__ import annotations

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.calibration import collect_statistics
from optimum_rmtkd.rmt import fit_spectrum
from optimum_rmtkd.widths import decide_widths, widths_for_ranks


@pytest.fixture(scope="module")
def calibrated(bert_dir, text_splits):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    texts = text_splits["train"]["text"]
    batches = [tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=16, return_tensors="pt")
               for i in range(0, len(texts), 32)]
    adapter = get_adapter(model)
    stats = collect_statistics(model, batches, adapter.required_captures(adapter.sites(model)))
    return adapter, model, stats


@pytest.mark.parametrize("output_format", ["stock", "per-layer"])
@pytest.mark.parametrize("estimator", ["paper", "mp-median", "gavish-donoho"])
def test_decision_rounds_each_rank_then_lets_the_format_tie_the_widths(calibrated, output_format, estimator):
    adapter, model, stats = calibrated
    config = RMTKDConfig(estimator=estimator, output_format=output_format, min_width=2)
    for group in adapter.stages(model, config):
        decision = decide_widths(adapter, model, group, stats, config, warn=False)
        names = [site.name for site in group]
        assert list(decision.widths) == list(decision.reports) == list(decision.fits) == names
        for site in group:
            spectrum, fit = decision.spectra[site.name], decision.fits[site.name]
            assert fit.rank == fit_spectrum(spectrum.eigenvalues, spectrum.n_samples, warn=False,
                                            **config.estimator_kwargs()).rank
            assert decision.asked_widths[site.name] == adapter.kept_width(model, site, fit.rank, config)
            assert decision.asked_widths[site.name] <= decision.widths[site.name] <= site.dim
            report = decision.reports[site.name]
            assert report.kept_width == decision.widths[site.name] and report.rank == fit.rank
        if output_format == "stock":
            # One config field holds every layer's width: all take the widest width asked.
            assert set(decision.widths.values()) == {max(decision.asked_widths.values())}
        else:
            assert decision.widths == decision.asked_widths


def test_given_spectra_give_the_same_decision_and_other_ranks_the_same_rounding(calibrated):
    adapter, model, stats = calibrated
    first = RMTKDConfig(estimator="paper", output_format="stock", min_width=2)
    other = RMTKDConfig(estimator="mp-median", output_format="stock", min_width=2)
    group = next(group for group in adapter.stages(model, first) if group[0].kind == "ffn")  # every layer's FFN
    decision = decide_widths(adapter, model, group, stats, first, warn=False)
    reused = decide_widths(adapter, model, group, stats, other, spectra=decision.spectra, warn=False)
    fresh = decide_widths(adapter, model, group, stats, other, warn=False)
    assert reused.widths == fresh.widths and reused.asked_widths == fresh.asked_widths
    assert all(reused.spectra[name] is decision.spectra[name] for name in reused.spectra)
    # Another estimator's rank, read from the first decision's reports, rounds to that estimator's own decision.
    ranks = {site.name: decision.reports[site.name].ranks_by_estimator["mp-median"] for site in group}
    assert widths_for_ranks(adapter, model, group, ranks, other) == (fresh.asked_widths, fresh.widths)
