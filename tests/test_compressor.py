"""RMTKDCompressor end to end on tiny models: outputs, reload equality, resume, stop rules and input errors."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import optimum_rmtkd.compressor as compressor_module
from optimum_rmtkd import RMTKDCompressor, RMTKDConfig

# The tests below script the paper's stage order and stop rule (hidden width first, stop on a drop).
FAST = dict(batch_size=16, max_length=32, max_distillation_steps=2, width_multiple=4, min_width=4,
            estimator="mp-median", max_metric_drop=None, sites=("hidden", "ffn"), on_metric_drop="stop")


def _compress(model_dir, splits, out, **overrides):
    config = RMTKDConfig(**{**FAST, **overrides})
    compressor = RMTKDCompressor.from_pretrained(model_dir)
    return compressor.compress(splits["train"], splits["validation"], config, save_directory=out)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_stock_output_reloads_with_plain_from_pretrained(encoder_dir, text_splits, tmp_path):
    result = _compress(encoder_dir, text_splits, tmp_path / "out")
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "rmtkd_config.json", "rmtkd_report.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert any((out / "spectra").glob("*.png"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(reloaded) is type(result.model)
    batch = {"input_ids": torch.randint(5, 100, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.model.eval()(**batch).logits, rtol=0, atol=0)

    report = json.loads((out / "rmtkd_report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert report["parameters"]["compressed"] == sum(p.numel() for p in reloaded.parameters())
    assert report["parameters"]["compressed"] < report["parameters"]["original"]
    assert set(config["rmtkd"]["sites"]) == {s["name"] for s in report["sites"]}
    for site in report["sites"]:
        assert set(site["ranks_by_estimator"]) == {"paper", "mp-median", "gavish-donoho", "kritchman-nadler", "mppca"}
        assert site["kept_width"] % 4 == 0 or site["kept_width"] == site["original_width"]
    hidden = next(s for s in report["sites"] if s["name"] == "hidden")
    field = "dim" if config["model_type"] == "distilbert" else "hidden_size"
    assert config[field] == hidden["kept_width"]
    assert RMTKDConfig.from_json_file(out / "rmtkd_config.json") == RMTKDConfig(**FAST)
    assert not (tmp_path / "out.checkpoints").exists()


def test_per_layer_output_goes_layer_by_layer(bert_dir, text_splits, tmp_path):
    result = _compress(bert_dir, text_splits, tmp_path / "out", output_format="per-layer", sites=("ffn",))
    assert [s["sites"] for s in result.report["stages"]] == [["bert.encoder.layer.0.ffn"], ["bert.encoder.layer.1.ffn"]]
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert reloaded.config.model_type == "rmtkd_bert"
    widths = [layer.intermediate.dense.out_features for layer in reloaded.bert.encoder.layer]
    assert widths == [s["kept_width"] for s in result.report["sites"]]


def test_rotation_cut_of_the_hidden_width_end_to_end(bert_dir, text_splits, tmp_path):
    # `hidden_cut="rotation"` through the compressor: the hidden stage folds every LayerNorm, the FFN stages follow
    # on the rotated model, and the registered type reloads with the compressor's logits.
    from optimum_rmtkd.layers import RotatedLayerNorm

    result = _compress(bert_dir, text_splits, tmp_path / "out", output_format="per-layer", hidden_cut="rotation")
    assert result.report["stages"][0]["sites"] == ["hidden"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.model_type == "rmtkd_bert" and reloaded.config.rotated_layer_norm_dim == 32
    assert isinstance(reloaded.bert.embeddings.LayerNorm, RotatedLayerNorm)
    assert reloaded.config.hidden_size < 32
    batch = {"input_ids": torch.randint(5, 100, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.model.eval()(**batch).logits, rtol=0, atol=0)


def test_input_model_is_never_modified(bert_dir, text_splits, tmp_path):
    compressor = RMTKDCompressor.from_pretrained(bert_dir)
    before = _state(compressor.model)
    compressor.compress(text_splits["train"], text_splits["validation"], RMTKDConfig(**FAST),
                        save_directory=tmp_path / "out")
    after = compressor.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert compressor.model.config.hidden_size == 32


def test_interrupted_run_resumes_from_its_last_stage(bert_dir, text_splits, tmp_path, monkeypatch):
    real_train, calls = compressor_module.train, {"n": 0}

    def failing_train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second stage's distillation
            raise KeyboardInterrupt("simulated interruption")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(compressor_module, "train", failing_train)
    with pytest.raises(KeyboardInterrupt):
        _compress(bert_dir, text_splits, tmp_path / "out")
    state = json.loads((tmp_path / "out.checkpoints" / "rmtkd_state.json").read_text())
    assert state["completed_stages"] == 1 and not (tmp_path / "out").exists()
    assert [p.name for p in (tmp_path / "out.checkpoints").glob("stage-*")] == ["stage-1"]  # older stages dropped

    stages_run = []
    real_run_stage = compressor_module._Run.run_stage

    def recording_run_stage(self, model, site_names, st):
        stages_run.append(site_names)
        return real_run_stage(self, model, site_names, st)

    monkeypatch.setattr(compressor_module, "train", real_train)
    monkeypatch.setattr(compressor_module._Run, "run_stage", recording_run_stage)
    result = _compress(bert_dir, text_splits, tmp_path / "out")
    assert stages_run == [["bert.encoder.layer.0.ffn", "bert.encoder.layer.1.ffn"]]  # stage 1 was not redone
    assert [s["stage"] for s in result.report["stages"]] == [1, 2]
    assert result.report["sites"][0]["kept_width"] == result.model.config.hidden_size


def test_checkpoints_of_another_run_are_not_resumed(bert_dir, text_splits, tmp_path, monkeypatch):
    real_train, calls = compressor_module.train, {"n": 0}

    def failing_train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(compressor_module, "train", failing_train)
    with pytest.raises(KeyboardInterrupt):
        _compress(bert_dir, text_splits, tmp_path / "out")
    monkeypatch.setattr(compressor_module, "train", real_train)
    other_data = dict(text_splits, train=text_splits["train"].select(range(100)))
    with pytest.raises(ValueError, match=r"belong to another run \(different data\); pass `resume=False`"):
        _compress(bert_dir, other_data, tmp_path / "out")
    # Nothing of the interrupted run was lost.
    assert [p.name for p in (tmp_path / "out.checkpoints").glob("stage-*")] == ["stage-1"]


def test_metric_drop_keeps_the_previous_stage(bert_dir, text_splits, tmp_path):
    scores = iter([0.9, 0.5, 0.1, 0.1, 0.1])  # baseline, before/after stage 1, final

    def falling_metric(predictions, references):
        return next(scores)

    config = RMTKDConfig(**{**FAST, "max_metric_drop": 0.05})
    result = RMTKDCompressor.from_pretrained(bert_dir).compress(
        text_splits["train"], text_splits["validation"], config, save_directory=tmp_path / "out", metric=falling_metric
    )
    assert "kept the previous stage" in result.report["stop_reason"]
    assert result.report["stages"][0]["reverted"] is True
    assert result.model.config.hidden_size == 32
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").config.hidden_size == 32


def test_metric_drop_can_skip_a_stage_and_go_on(bert_dir, text_splits, tmp_path):
    # baseline; stage 1 (hidden) before/after: a drop, undone; stage 2 (ffn) before/after: fine; final.
    scores = iter([0.9, 0.5, 0.1, 0.9, 0.9, 0.9])

    def metric(predictions, references):
        return next(scores)

    config = RMTKDConfig(**{**FAST, "max_metric_drop": 0.05, "on_metric_drop": "skip"})
    result = RMTKDCompressor.from_pretrained(bert_dir).compress(
        text_splits["train"], text_splits["validation"], config, save_directory=tmp_path / "out", metric=metric
    )
    assert [s.get("reverted", False) for s in result.report["stages"]] == [True, False]
    assert result.report["stop_reason"] == "no site left"
    assert result.model.config.hidden_size == 32  # the hidden cut was undone
    assert result.model.config.intermediate_size < 37  # the FFN cut was kept


def test_target_reduction_stops_early(bert_dir, text_splits, tmp_path):
    result = _compress(bert_dir, text_splits, tmp_path / "out", target_reduction=0.05)
    assert len(result.report["stages"]) == 1
    assert result.report["stop_reason"].startswith("target reduction 5% reached")


def test_local_csv_files_are_datasets(bert_dir, text_splits, tmp_path):
    train_csv, eval_csv = tmp_path / "train.csv", tmp_path / "eval.csv"
    text_splits["train"].to_csv(train_csv)
    text_splits["validation"].to_csv(eval_csv)
    compressor = RMTKDCompressor.from_pretrained(bert_dir)
    result = compressor.compress(str(train_csv), str(eval_csv), RMTKDConfig(**FAST, max_stages=1),
                                 save_directory=tmp_path / "out")
    assert result.report["stop_reason"] == "max_stages=1 reached"


def test_string_labels_follow_the_models_label2id(bert_dir, text_splits, tmp_path):
    # The head names its classes in an order that is not alphabetical: mapping the names in sorted order would flip
    # classes 0 and 2 and score the same rows far worse than their ids do.
    names = ["pos", "neu", "neg"]
    model = AutoModelForSequenceClassification.from_pretrained(
        bert_dir, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    named = RMTKDCompressor(model, compressor_module.get_task("text-classification").load_preprocessor(bert_dir),
                            source=str(bert_dir))
    train = text_splits["train"].map(lambda r: {"label": names[r["label"]]})
    valid = text_splits["validation"].map(lambda r: {"label": names[r["label"]]})
    by_name = named.compress(train, valid, RMTKDConfig(**FAST, max_stages=1), save_directory=tmp_path / "names")
    by_id = named.compress(text_splits["train"], text_splits["validation"], RMTKDConfig(**FAST, max_stages=1),
                           save_directory=tmp_path / "ids")
    assert by_name.report["metrics"]["original"] == by_id.report["metrics"]["original"]
    saved = json.loads((tmp_path / "names" / "config.json").read_text())
    assert saved["label2id"] == {"pos": 0, "neu": 1, "neg": 2}


def test_string_labels_without_class_names_are_numbered_and_saved(bert_dir, text_splits, tmp_path):
    names = ["neg", "neu", "pos"]
    train = text_splits["train"].map(lambda r: {"label": names[r["label"]]})
    valid = text_splits["validation"].map(lambda r: {"label": names[r["label"]]})
    RMTKDCompressor.from_pretrained(bert_dir).compress(
        train, valid, RMTKDConfig(**FAST, max_stages=1), save_directory=tmp_path / "out"
    )
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    assert saved["label2id"] == {"neg": 0, "neu": 1, "pos": 2}


def test_missing_label_column(bert_dir, text_splits, tmp_path):
    with pytest.raises(ValueError, match="`train_dataset` has no column 'sentiment'; its columns are text, label"):
        RMTKDCompressor.from_pretrained(bert_dir).compress(
            text_splits["train"], text_splits["validation"], RMTKDConfig(**FAST), save_directory=tmp_path / "o",
            label_column="sentiment",
        )


def test_empty_dataset(bert_dir, text_splits, tmp_path):
    empty = text_splits["train"].select([])
    with pytest.raises(ValueError, match="`train_dataset` is empty; pass a dataset with at least one example."):
        RMTKDCompressor.from_pretrained(bert_dir).compress(
            empty, text_splits["validation"], RMTKDConfig(**FAST), save_directory=tmp_path / "o"
        )


def test_save_directory_is_the_input_directory(bert_dir, text_splits):
    with pytest.raises(ValueError, match="is the input model .*, one of its parents or a folder inside it; writing "
                                         "there would delete or mix with the input model: choose another folder."):
        RMTKDCompressor.from_pretrained(bert_dir).compress(
            text_splits["train"], text_splits["validation"], RMTKDConfig(**FAST), save_directory=bert_dir
        )


def test_save_directory_holding_the_input_model_is_refused(bert_dir, text_splits):
    # overwrite=True replaces the whole folder: the input model inside it would be deleted.
    with pytest.raises(ValueError, match="is the input model .*, one of its parents or a folder inside it"):
        RMTKDCompressor.from_pretrained(bert_dir).compress(
            text_splits["train"], text_splits["validation"], RMTKDConfig(**FAST), save_directory=bert_dir.parent,
            overwrite=True,
        )
    assert (bert_dir / "config.json").is_file()


def test_non_empty_save_directory_needs_overwrite(bert_dir, text_splits, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not empty; choose another folder or pass `overwrite=True`"):
        RMTKDCompressor.from_pretrained(bert_dir).compress(
            text_splits["train"], text_splits["validation"], RMTKDConfig(**FAST), save_directory=tmp_path / "taken"
        )
    assert (tmp_path / "taken" / "file.txt").read_text() == "keep me"


def test_unsupported_model_type():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="RMT-KD has no adapter for model type 'gpt2'"):
        RMTKDCompressor(model)


def test_a_head_the_adapter_does_not_describe_is_refused():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=23,
                                       num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"BertAdapter describes \*ForSequenceClassification models, got "
                                         r"BertForMaskedLM: its site tables name that task head's modules"):
        RMTKDCompressor(model)


def test_unknown_task():
    with pytest.raises(ValueError, match="`task` must be one of .*got 'translation'"):
        RMTKDCompressor.from_pretrained("unused", task="translation")


def test_missing_model_path_explains_the_fix(tmp_path):
    with pytest.raises(OSError, match="Could not load a model from .*pass a local folder"):
        RMTKDCompressor.from_pretrained(tmp_path / "nope")


def test_too_many_labels_for_the_head(bert_dir, text_splits, tmp_path):
    train = text_splits["train"].map(lambda r: {"label": r["label"] + 5})
    with pytest.raises(ValueError, match="`train_dataset` has class id 7 but the model has `num_labels=3`; .* pass "
                                         "`num_labels=8`"):
        RMTKDCompressor.from_pretrained(bert_dir).compress(
            train, text_splits["validation"], RMTKDConfig(**FAST), save_directory=tmp_path / "o"
        )


def test_a_new_head_is_drawn_under_the_seed(bert_dir, tmp_path):
    # An encoder without its classifier: the compressor adds a head, which must not depend on the process's
    # (randomly seeded) default generator, nor change it.
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    model.bert.save_pretrained(tmp_path / "encoder")

    def head(seed):
        compressor = RMTKDCompressor.from_pretrained(tmp_path / "encoder", num_labels=2, seed=seed)
        assert compressor.head_is_new
        return compressor.model.classifier.weight.detach().clone()

    torch.manual_seed(123)
    first = head(0)
    torch.manual_seed(456)  # another generator state before loading: the same head
    torch.testing.assert_close(head(0), first, rtol=0, atol=0)
    assert not torch.equal(head(1), first)
    torch.manual_seed(456)
    head(0)
    # The caller's stream is untouched: the state is the one manual_seed(456) left.
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(456).get_state())
