"""Resuming a run: a checkpoint is resumed only by the same model weights, data and config, and an interrupted run
resumed from its checkpoint ends exactly where the uninterrupted run ends (same seed, every RNG restored)."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import optimum_rmtkd.compressor as compressor_module
from optimum_rmtkd import RMTKDCompressor, RMTKDConfig

# Dropout (the tiny models' default 0.1) and the shuffled training loader draw random numbers in every stage, so a
# state left unrestored changes the result.
FAST = dict(batch_size=16, max_length=32, max_distillation_steps=4, width_multiple=4, min_width=4,
            estimator="mp-median", max_metric_drop=None, sites=("ffn", "hidden"), on_metric_drop="skip")


def _compress(model_dir, splits, out, **kwargs):
    compressor = RMTKDCompressor.from_pretrained(model_dir)
    return compressor.compress(splits["train"], splits["validation"], RMTKDConfig(**FAST), save_directory=out,
                               **kwargs)


def _interrupt_at_training_call(monkeypatch, n: int) -> None:
    """Make the `n`-th call of the training loop raise KeyboardInterrupt (as Ctrl-C, or kill -9, would stop it)."""
    real_train, calls = compressor_module.train, {"n": 0}

    def interrupted_train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated interruption")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(compressor_module, "train", interrupted_train)


def _logits(model):
    batch = {"input_ids": torch.arange(5, 95).reshape(6, 15), "attention_mask": torch.ones(6, 15, dtype=torch.long)}
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_equals_the_uninterrupted_run_bit_for_bit(stage, bert_dir, text_splits, tmp_path, monkeypatch):
    reference = _compress(bert_dir, text_splits, tmp_path / "reference")

    _interrupt_at_training_call(monkeypatch, stage)  # no fine-tuning: call n is stage n's distillation
    with pytest.raises(KeyboardInterrupt):
        _compress(bert_dir, text_splits, tmp_path / "out")
    state = json.loads((tmp_path / "out.checkpoints" / "rmtkd_state.json").read_text())
    assert state["completed_stages"] == stage - 1
    monkeypatch.undo()
    resumed = _compress(bert_dir, text_splits, tmp_path / "out")

    assert [s["widths"] for s in resumed.report["stages"]] == [s["widths"] for s in reference.report["stages"]]
    torch.testing.assert_close(_logits(resumed.model), _logits(reference.model), rtol=0, atol=0)
    saved, expected = load_file(tmp_path / "out" / "model.safetensors"), load_file(
        tmp_path / "reference" / "model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[name], expected[name]) for name in expected)
    assert resumed.report["metrics"] == reference.report["metrics"]


def test_checkpoints_of_other_weights_in_the_same_folder_are_refused(bert_dir, text_splits, tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    shutil.copytree(bert_dir, model_dir)
    _interrupt_at_training_call(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _compress(model_dir, text_splits, tmp_path / "out")
    monkeypatch.undo()

    # Other weights saved into the same folder: same path, config, parameter count and data.
    model = RMTKDCompressor.from_pretrained(model_dir).model
    with torch.no_grad():
        model.classifier.weight.mul_(2.0)
    model.save_pretrained(model_dir)
    checkpoints = tmp_path / "out.checkpoints"
    message = (f"The checkpoints in '{checkpoints}' belong to another run (different input weights); pass "
               "`resume=False` (`--no-resume`) to start over and replace them, or choose another `save_directory`.")
    with pytest.raises(ValueError, match=re.escape(message)):
        _compress(model_dir, text_splits, tmp_path / "out")
    assert [p.name for p in checkpoints.glob("stage-*")] == ["stage-0"]  # nothing of the other run was lost


def test_checkpoints_of_other_rows_of_the_same_size_are_refused(bert_dir, text_splits, tmp_path, monkeypatch):
    _interrupt_at_training_call(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _compress(bert_dir, text_splits, tmp_path / "out")
    monkeypatch.undo()
    # The same number of rows, one text changed.
    train = text_splits["train"].map(lambda row, i: {"text": row["text"] + (" a" if i == 0 else "")},
                                     with_indices=True)
    with pytest.raises(ValueError, match=r"belong to another run \(different data\); pass `resume=False`"):
        _compress(bert_dir, dict(text_splits, train=train), tmp_path / "out")


def test_the_same_weights_and_data_resume(bert_dir, text_splits, tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    shutil.copytree(bert_dir, model_dir)
    _interrupt_at_training_call(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _compress(model_dir, text_splits, tmp_path / "out")
    monkeypatch.undo()
    # The same weights saved again (new file, same tensors) and the same rows in a new Dataset object.
    RMTKDCompressor.from_pretrained(bert_dir).model.save_pretrained(model_dir)
    splits = {name: split.select(range(len(split))) for name, split in text_splits.items()}

    stages_run = []
    real_run_stage = compressor_module._Run.run_stage

    def recording_run_stage(self, model, site_names, state):
        stages_run.append(site_names)
        return real_run_stage(self, model, site_names, state)

    monkeypatch.setattr(compressor_module._Run, "run_stage", recording_run_stage)
    result = _compress(model_dir, splits, tmp_path / "out")
    assert stages_run == [["hidden"]]  # the FFN stage was not redone
    assert [s["stage"] for s in result.report["stages"]] == [1, 2]
