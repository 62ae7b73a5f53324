"""An `evaluate.EvaluationModule` as the `metric` of `compress`, loaded from a local script as evaluate documents.

`evaluate.load("accuracy")` fetches its script from the Hub, which no test may reach, so the module here is a small
script written in the test's folder and loaded by path: the route a user without Hub access takes.
"""
from __future__ import annotations

import sys
import textwrap

import evaluate
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from optimum_rmtkd import RMTKDCompressor, RMTKDConfig


# A metric that differs from the default accuracy (each class counts the same), so the name and value in the report
# come from the module, not from the built-in accuracy. It returns two values: the first is the one that counts.
METRIC_SCRIPT = '''
import datasets
import evaluate


class BalancedAccuracy(evaluate.Metric):
    """Mean over classes of the share of that class's references predicted right."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Balanced accuracy.",
            citation="",
            inputs_description="predictions and references: lists of class ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        recalls = []
        for label in sorted(set(references)):
            rows = [p for p, r in zip(predictions, references) if r == label]
            recalls.append(sum(p == label for p in rows) / len(rows))
        return {"balanced_accuracy": sum(recalls) / len(recalls), "n": len(references)}
'''


def _balanced_accuracy(predictions, references) -> float:
    labels = sorted(set(references))
    return sum(
        sum(p == label for p, r in zip(predictions, references) if r == label) / references.count(label)
        for label in labels
    ) / len(labels)


@pytest.fixture
def metric_module(tmp_path, monkeypatch):
    """`evaluate.load(<local script>)`; evaluate's module and data caches go to `tmp_path`, not the home folder."""
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    monkeypatch.setattr(sys, "path", list(sys.path))  # evaluate appends its modules cache to sys.path
    script = tmp_path / "balanced_accuracy.py"
    script.write_text(textwrap.dedent(METRIC_SCRIPT))
    return evaluate.load(str(script), keep_in_memory=True, cache_dir=str(tmp_path / "evaluate-cache"))


def test_local_metric_module_computes_its_value(metric_module):
    predictions, references = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    assert isinstance(metric_module, evaluate.EvaluationModule)
    assert metric_module.name == "balanced_accuracy"
    # Class 0: 1 of 2 right, class 1: 1 of 2, class 2: 2 of 2 -> (0.5 + 0.5 + 1) / 3, where plain accuracy is 4/6.
    result = metric_module.compute(predictions=predictions, references=references)
    assert result == {"balanced_accuracy": pytest.approx(2 / 3, abs=1e-12), "n": 6}


def test_compress_scores_with_the_evaluate_module_and_reports_its_name(
    bert_dir, text_splits, tmp_path, metric_module, monkeypatch
):
    results = []
    compute = metric_module.compute

    def recording_compute(*args, **kwargs):
        results.append(compute(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(metric_module, "compute", recording_compute)
    config = RMTKDConfig(max_stages=1, batch_size=16, max_length=32, max_distillation_steps=2, width_multiple=4,
                         min_width=4, estimator="mp-median", max_metric_drop=None)
    out = tmp_path / "out"
    report = RMTKDCompressor.from_pretrained(bert_dir).compress(
        text_splits["train"], text_splits["validation"], config, save_directory=out, metric=metric_module
    ).report
    assert report["metric_name"] == "balanced_accuracy"
    assert results and all(result["n"] == len(text_splits["validation"]) for result in results)
    # No test set, so the report scores the validation split; the first call scores the uncompressed model, the
    # last one the saved model, and the report keeps the first value of the module's dict.
    assert report["metrics"]["evaluated_on"] == "validation"
    assert report["metrics"]["original"] == results[0]["balanced_accuracy"]
    assert report["metrics"]["compressed"] == results[-1]["balanced_accuracy"]
    assert report["stages"][0]["metric_after_distillation"] in [result["balanced_accuracy"] for result in results]

    # The same value from the saved model, scored here without the compressor (labels are already ids 0..2).
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    inputs = AutoTokenizer.from_pretrained(out)(
        list(text_splits["validation"]["text"]), truncation=True, max_length=32, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        predictions = model(**inputs).logits.argmax(dim=-1).tolist()
    references = list(text_splits["validation"]["label"])
    expected = compute(predictions=predictions, references=references)["balanced_accuracy"]
    assert expected == pytest.approx(_balanced_accuracy(predictions, references), abs=1e-12)
    assert report["metrics"]["compressed"] == expected
