"""`analyze_model`: every estimator's fit at every site, the widths each would keep, and an untouched model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.analysis import analyze_model
from optimum_rmtkd.rmt import ESTIMATORS, fit_spectrum


@pytest.fixture(scope="module")
def analysis(bert_dir, text_splits):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    config = RMTKDConfig(estimator="mp-median", max_length=16, calibration_fraction=1.0)
    result = analyze_model(model, tokenizer, "text-classification", text_splits["train"], config)
    return result, model, before


def test_model_is_left_untouched(analysis):
    _, model, before = analysis
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_every_estimator_is_fitted_on_every_site(analysis):
    result, model, _ = analysis
    # One hidden site plus one FFN site per layer, in stage order (the default sites cut the FFN first).
    assert [site.name for site in result.sites][-1] == "hidden"
    assert len(result.sites) == 1 + model.config.num_hidden_layers
    for site in result.sites:
        assert set(site.fits_by_estimator) == set(ESTIMATORS)
        eigenvalues = np.asarray(site.eigenvalues)
        for name in ESTIMATORS:
            refit = fit_spectrum(eigenvalues, site.n_samples, name, warn=False)
            stored = site.fits_by_estimator[name]
            assert stored["rank"] == refit.rank == site.ranks_by_estimator[name]
            # Same eigenvalues, same deterministic fit: equal up to float round-off only.
            assert stored["sigma2"] == pytest.approx(refit.sigma2, rel=1e-12)
            assert stored["edge"] == pytest.approx(refit.edge, rel=1e-12)
        assert site.sigma2 == site.fits_by_estimator["mp-median"]["sigma2"]


def test_estimator_table_has_one_row_per_site_and_estimator(analysis):
    result, _, _ = analysis
    lines = result.to_estimator_table().splitlines()
    header = lines[0].split()
    assert header == ["site", "d", "n", "estimator", "σ²", "λ₊", "k", "width"]
    rows = [line.split() for line in lines if line.split() and line.split()[0] in {s.name for s in result.sites}]
    assert len(rows) == len(result.sites) * len(ESTIMATORS)
    for site in result.sites:
        mine = {row[3]: row for row in rows if row[0] == site.name}
        assert set(mine) == set(ESTIMATORS)
        for name, row in mine.items():
            assert row[1] == str(site.original_width) and row[2] == str(site.n_samples)
            assert row[6] == str(site.fits_by_estimator[name]["rank"])
            assert row[7] == str(result.saved_widths[site.name][name])


def test_pooled_hidden_site_counts_its_tokens_once(analysis):
    result, model, _ = analysis
    # The hidden site pools the residual stream after every layer: the same tokens seen 2L + 1 times. Its MP null
    # uses the token count (as each single-view FFN site does), not the pooled total, so q is not understated.
    hidden = next(site for site in result.sites if site.name == "hidden")
    ffn = [site for site in result.sites if site.kind == "ffn"]
    assert {site.n_samples for site in ffn} == {hidden.n_samples}
    assert hidden.q == pytest.approx(model.config.hidden_size / hidden.n_samples, rel=1e-12)
