"""What a new user runs into first, through `rmtkd_cli.main` in-process: an output folder that would delete or mix with
the input model, numbers the config refuses (NaN, inf, wrong types), wrong JSON types in `--config`. Each is exit
status 1 and one line on stderr, before any work, and the input is left as it was.

Every writer goes through one guard, `optimum_rmtkd.utils.io.check_output_folder`; the API entry points are checked
here too, with their argument's name in the same message.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.commands.rmtkd_cli import main
from optimum_rmtkd.utils.io import check_output_folder

HINT = " (run with --debug to see the traceback)"


pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def folders(bert_dir, tmp_path) -> dict:
    """Two saved models side by side under `models/` (an original and a "compressed" one) and a CSV file."""
    models = tmp_path / "models"
    shutil.copytree(bert_dir, models / "original")
    shutil.copytree(bert_dir, models / "compressed")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(20)))
    return {"model": models / "original", "compressed": models / "compressed", "models": models,
            "csv": data / "train.csv", "data": data, "tmp": tmp_path}


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(argv, capsys) -> str:
    """Run `rmtkd argv`, check it exits with 1 and writes one line to stderr, and return that line."""
    with pytest.raises(SystemExit) as info:
        main([str(arg) for arg in argv])
    assert info.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _inside_message(name: str, output, source, what: str = "model") -> str:
    return (f"`{name}` '{output}' is the input {what} '{source}', one of its parents or a folder inside it; writing "
            f"there would delete or mix with the input {what}: choose another folder.")


# --- the output guard on the command line ------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["analyze", "compress"])
@pytest.mark.parametrize("where", ["the model", "its parent", "inside it"])
def test_output_that_holds_or_lies_in_the_model_is_refused(verb, where, folders, capsys):
    model = folders["model"]
    output = {"the model": model, "its parent": folders["models"], "inside it": model / "sub"}[where]
    before = _digest(folders["models"])
    line = _fails([verb, model, "--dataset", folders["csv"], "-o", output, "--overwrite"], capsys)
    assert line == "error: " + _inside_message("--output", output, model) + HINT
    assert _digest(folders["models"]) == before
    assert not (model / "sub").exists()


def test_compress_output_that_holds_the_data_is_refused(folders, capsys):
    line = _fails(["compress", folders["model"], "--dataset", folders["csv"], "-o", folders["data"], "--overwrite"],
                  capsys)
    assert line == "error: " + _inside_message("--output", folders["data"], folders["csv"], "dataset") + HINT
    assert folders["csv"].is_file()


@pytest.mark.parametrize("where", ["the model", "its parent", "inside it"])
def test_export_output_that_holds_or_lies_in_the_model_is_refused(where, folders, capsys):
    model = folders["model"]
    output = {"the model": model, "its parent": folders["models"], "inside it": model / "sub"}[where]
    before = _digest(folders["models"])
    line = _fails(["export", model, output, "--overwrite"], capsys)
    assert line == "error: " + _inside_message("output", output, model) + HINT
    assert _digest(folders["models"]) == before


def test_export_default_folder_inside_the_model_is_its_own():
    # `rmtkd export M` writes M/onnx, which `rmtkd push` uploads: the one folder inside a model a writer may use.
    model = Path("some-model")
    assert check_output_folder(model / "onnx", [model], allowed=[model / "onnx"]) == model / "onnx"


@pytest.mark.parametrize(
    "flag, where, source",
    [
        ("-o", "compressed", "compressed"),           # caches and a file of absolute paths in the model folder
        ("-o", "compressed/sub", "compressed"),
        ("-o", "", "original"),                       # the parent of both models
        ("--onnx-cache-dir", "original", "original"),
    ],
)
def test_benchmark_output_that_holds_or_lies_in_a_model_is_refused(flag, where, source, folders, capsys):
    output = folders["models"] / where
    before = _digest(folders["models"])
    line = _fails(["benchmark", "--original", folders["model"], "--compressed", folders["compressed"], flag, output],
                  capsys)
    name = "--output" if flag == "-o" else flag
    assert line == "error: " + _inside_message(name, output, folders["models"] / source) + HINT
    assert _digest(folders["models"]) == before


def test_push_does_not_write_its_card_into_the_base_models_folder(folders, capsys):
    from optimum_rmtkd.hub import _REPORT_KEYS

    # An output folder left inside its base model by an older version: its README.md would mix with the model.
    base = folders["model"]
    output = base / "rmtkd"
    output.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base / name, output / name)
    report = {key: None for key in _REPORT_KEYS}
    report["base_model"] = str(base.resolve())
    (output / "rmtkd_report.json").write_text(json.dumps(report))
    line = _fails(["push", output, "--hub-model-id", "me/model", "--token", "hf_x", "--endpoint",
                   "http://127.0.0.1:9"], capsys)
    # push_to_hub's `model_dir` is the command's FOLDER argument.
    assert line == "error: " + _inside_message("folder", output, base.resolve()) + HINT
    assert not (output / "README.md").exists()


# --- the same guard in the API -------------------------------------------------------------------------------------
def test_compress_api_refuses_a_save_directory_inside_the_model(folders):
    from optimum_rmtkd import RMTKDCompressor

    model = folders["model"]
    compressor = RMTKDCompressor.from_pretrained(model)
    with pytest.raises(ValueError, match=re.escape(_inside_message("save_directory", model / "sub", model))):
        compressor.compress(str(folders["csv"]), save_directory=model / "sub")
    assert not (model / "sub").exists()


def test_analysis_save_refuses_the_models_folder(folders):
    from optimum_rmtkd.analysis import RMTKDAnalysis

    model = folders["model"]
    analysis = RMTKDAnalysis(model_type="bert", sites=[], asked_widths={}, saved_widths={}, n_examples=0,
                             config=RMTKDConfig(), source=str(model))
    before = _digest(folders["models"])
    for output in (model, folders["models"], model / "spectra"):
        with pytest.raises(ValueError, match=re.escape(_inside_message("output_dir", output, model))):
            analysis.save(output, overwrite=True)
    assert _digest(folders["models"]) == before


def test_export_and_benchmark_api_refuse_folders_of_their_inputs(folders):
    onnx = pytest.importorskip("optimum_rmtkd.exporters.onnx")
    benchmark = pytest.importorskip("optimum_rmtkd.benchmark")
    model, compressed = folders["model"], folders["compressed"]
    for output in (model, folders["models"], model / "sub"):
        with pytest.raises(ValueError, match=re.escape(_inside_message("output_dir", output, model))):
            onnx.export_onnx(model, output, overwrite=True)
    with pytest.raises(ValueError, match=re.escape(_inside_message("output_dir", compressed, compressed))):
        benchmark.benchmark_models(model, compressed, output_dir=compressed)
    with pytest.raises(ValueError, match=re.escape(_inside_message("onnx_cache_dir", model / "cache", model))):
        benchmark.benchmark_models(model, compressed, onnx_cache_dir=model / "cache")


def test_guard_refuses_a_file_and_a_non_empty_folder(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(
            f"`--output` '{tmp_path / 'file.txt'}' is a file, not a folder; pass a folder path.")):
        check_output_folder(tmp_path / "file.txt", name="--output")
    with pytest.raises(FileExistsError, match=re.escape(
            f"`save_directory` '{tmp_path}' exists and is not empty; choose another folder or pass `overwrite=True` "
            "to replace it.")):
        check_output_folder(tmp_path)
    with pytest.raises(FileExistsError, match="choose another folder or pass --overwrite to replace it."):
        check_output_folder(tmp_path, name="output", cli=True)
    # Writers that add files (benchmark, model card) skip the emptiness check; Hub ids and non-paths are no inputs.
    assert check_output_folder(tmp_path, ["org/model", None, object()], overwrite=None) == tmp_path


# --- numbers and types the config refuses, as one line --------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--distillation-epochs", "inf"], "`distillation_epochs` must be a finite number, got inf."),
        (["--max-metric-drop", "nan"], "`max_metric_drop` must be a finite number or None, got nan."),
        (["--target-reduction", "nan"], "`target_reduction` must be a finite number or None, got nan."),
        (["--learning-rate=-inf"], "`learning_rate` must be a finite number, got -inf."),
    ],
)
def test_non_finite_flags_are_one_line(flags, message, folders, capsys):
    output = folders["tmp"] / "out"
    line = _fails(["compress", folders["model"], "--dataset", folders["csv"], "-o", output, *flags], capsys)
    assert line == f"error: {message}{HINT}"
    assert not output.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"batch_size": "32"}', "`batch_size` must be an integer, got str '32'; write it without quotes."),
        ('{"seed": "a"}', "`seed` must be an integer, got str 'a'."),
        ('{"max_metric_drop": NaN}', "`max_metric_drop` must be a finite number or None, got nan."),
        ('{"centered": "false"}',
         "`centered` must be a bool (true or false), got str 'false'; write it without quotes."),
    ],
)
def test_wrong_json_types_in_the_config_file_are_one_line_naming_the_field(content, message, folders, capsys):
    config_file = folders["tmp"] / "rmtkd_config.json"
    config_file.write_text(content)
    line = _fails(["analyze", folders["model"], "--dataset", folders["csv"], "--config", config_file], capsys)
    assert line == f"error: `--config` '{config_file}': {message}{HINT}"


def test_a_config_file_that_is_not_an_object_is_one_line(folders, capsys):
    config_file = folders["tmp"] / "rmtkd_config.json"
    config_file.write_text("[1, 2]")
    line = _fails(["analyze", folders["model"], "--dataset", folders["csv"], "--config", config_file], capsys)
    assert line == (f"error: `--config` '{config_file}' holds a JSON list, not an object of RMTKDConfig fields; pass "
                    f"an rmtkd_config.json written by `rmtkd compress` or `RMTKDConfig.to_json_file`.{HINT}")


# --- a folder without tokenizer files, degenerate runs, failed runs, API argument types ------------------------------
TINY_RUN = dict(batch_size=16, max_length=32, max_distillation_steps=1, width_multiple=4, min_width=4)


def _fails_after_loading(argv, capsys) -> str:
    """As `_fails`, for errors met after the model loaded (its progress bars come first): the one error line."""
    with pytest.raises(SystemExit) as info:
        main([str(arg) for arg in argv])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def _without_tokenizer(bert_dir, folder: Path) -> Path:
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert_dir / name, folder / name)
    return folder


def test_a_model_folder_without_tokenizer_files_is_one_line(bert_dir, folders, capsys):
    # AutoTokenizer builds a tokenizer of the 5 special tokens from such a folder: every word becomes [UNK].
    model = _without_tokenizer(bert_dir, folders["tmp"] / "no-tokenizer")
    output = folders["tmp"] / "out"
    line = _fails_after_loading(["compress", model, "--dataset", folders["csv"], "-o", output], capsys)
    assert line == (
        f"error: The tokenizer of '{model}' maps 100% of the tokens of the first 20 training texts to '[UNK]' (a "
        f"vocabulary of 5 tokens; at most 50% may be unknown): '{model}' has no tokenizer files, or not this model's; "
        "pass a folder that holds them beside the model's weights, or save them there with "
        f"`tokenizer.save_pretrained(folder)`.{HINT}"
    )
    assert not output.exists() and not Path(f"{output}.checkpoints").exists()


def test_damaged_weights_are_one_line(folders, capsys):
    weights = folders["model"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    line = _fails_after_loading(["compress", folders["model"], "--dataset", folders["csv"], "-o",
                                 folders["tmp"] / "out"], capsys)
    assert line.startswith(f"error: The weights of '{folders['model']}' cannot be read (")
    assert line.endswith("): the file is damaged or incomplete; save or download the model again." + HINT)


def test_a_text_model_without_a_preprocessor_is_refused(bert_dir, text_splits, tmp_path):
    from optimum_rmtkd import RMTKDCompressor

    compressor = RMTKDCompressor(RMTKDCompressor.from_pretrained(bert_dir).model, None)
    with pytest.raises(ValueError, match=re.escape(
            "`preprocessor` is None, but the text-classification task needs one (AutoTokenizer): pass "
            "`RMTKDCompressor(model, preprocessor)`, or save it beside the model's weights "
            "(`preprocessor.save_pretrained(folder)`) and load both with `RMTKDCompressor.from_pretrained`.")):
        compressor.compress(text_splits["train"], save_directory=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_that_cuts_nothing_says_so(bert_dir, text_splits, tmp_path, caplog):
    from optimum_rmtkd import RMTKDCompressor

    # No width is below 1% of the original: every stage is skipped, as when every site keeps k = d.
    config = RMTKDConfig(**TINY_RUN, max_kept_ratio=0.01)
    result = RMTKDCompressor.from_pretrained(bert_dir).compress(
        text_splits["train"], text_splits["validation"], config, save_directory=tmp_path / "out")
    note = ("nothing was cut: of 2 stage(s), 2 were skipped (a kept width ≥ 1% of the original) and 0 were undone "
            "(the validation metric dropped too far)")
    assert result.report["stop_reason"] == f"no site left; {note}"
    assert result.report["parameters"]["reduction"] == 0
    assert ("N" + note[1:] + "; the saved model has the input model's widths: raise `max_kept_ratio` "
            "(`--max-kept-ratio`) to cut sites that keep most of their width, or `max_metric_drop` "
            "(`--max-metric-drop`) to accept a larger drop.") in caplog.messages


def test_tiny_data_and_fewer_calibration_samples_than_the_width_are_warned(bert_dir, text_splits, tmp_path, caplog):
    from optimum_rmtkd import RMTKDCompressor

    # 12 rows: 10 train and 2 held out; the 1-row rounding of the calibration share is raised to 2 examples, and with
    # one sample per example ([CLS]) the FFN spectrum (width 37) rests on 2 samples: q = 18.5.
    config = RMTKDConfig(**TINY_RUN, sample_unit="cls", max_stages=1)
    RMTKDCompressor.from_pretrained(bert_dir).compress(
        text_splits["train"].select(range(12)), config=config, save_directory=tmp_path / "out")
    assert ("Only 10 training and 2 validation rows: distillation and the stop rules are noise below 100 and 50 (one "
            "validation row moves the metric by 50.0 points); pass more data for a result to trust.") in caplog.messages
    assert any(message.startswith("Stage 1: fewer calibration samples than the width at bert.encoder.layer.0.ffn "
                                  "(2 samples, width 37, q = 18.50)") for message in caplog.messages), caplog.messages


def test_a_failed_run_keeps_its_checkpoints_and_says_how_to_resume(bert_dir, text_splits, tmp_path, caplog,
                                                                   monkeypatch):
    import optimum_rmtkd.compressor as compressor_module
    from optimum_rmtkd import RMTKDCompressor

    real_train, calls = compressor_module.train, {"n": 0}

    def train_until_the_disk_is_full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_train(*args, **kwargs)

    def compress():
        return RMTKDCompressor.from_pretrained(bert_dir).compress(
            text_splits["train"], text_splits["validation"], RMTKDConfig(**TINY_RUN), save_directory=tmp_path / "out")

    monkeypatch.setattr(compressor_module, "train", train_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left on device"):
        compress()
    checkpoints = tmp_path / "out.checkpoints"
    # Kept, not deleted: the stages done are what a resume after freeing space starts from.
    assert (checkpoints / "stage-1").is_dir()
    assert (f"The run failed (OSError) after 1 completed stage(s); its checkpoints are kept in '{checkpoints}': run "
            "the same command again to resume from there, or pass `resume=False` (`--no-resume`) to start over (or "
            "delete the folder).") in caplog.messages
    monkeypatch.setattr(compressor_module, "train", real_train)
    result = compress()
    assert [s["stage"] for s in result.report["stages"]] == [1, 2]
    assert not checkpoints.exists()  # a run that succeeds removes them


def test_compress_api_argument_types(bert_dir, text_splits, tmp_path, monkeypatch):
    import optimum_rmtkd.compressor as compressor_module
    from optimum_rmtkd import RMTKDCompressor

    compressor = RMTKDCompressor.from_pretrained(bert_dir)
    # A dict of fields is read as `RMTKDConfig.from_dict` reads it (the run itself is not needed here).
    monkeypatch.setattr(compressor_module._Run, "execute", lambda run, resume: run.config)
    assert compressor.compress(text_splits["train"], config={"batch_size": 8, "sites": ["ffn"]},
                               save_directory=tmp_path / "out") == RMTKDConfig(batch_size=8, sites=("ffn",))
    with pytest.raises(ValueError, match=r"Unknown RMTKDConfig field\(s\) 'batch_sise'; allowed fields are "):
        compressor.compress(text_splits["train"], config={"batch_sise": 8}, save_directory=tmp_path / "out")
    with pytest.raises(TypeError, match=re.escape(
            "`config` must be an RMTKDConfig or a dict of its fields, got list; pass `RMTKDConfig(...)`, or "
            "`RMTKDConfig.from_json_file(path)` for a saved rmtkd_config.json.")):
        compressor.compress(text_splits["train"], config=[("batch_size", 8)], save_directory=tmp_path / "out")
    for value in (None, "", 3):
        with pytest.raises(TypeError, match=re.escape(
                f"`save_directory` must be a folder path (a non-empty str or os.PathLike), got {value!r}; pass the "
                'folder to write the compressed model to, e.g. `save_directory="bert-rmtkd"`.')):
            compressor.compress(text_splits["train"], save_directory=value)


def test_model_objects_and_paths_go_to_their_own_constructor(bert_dir):
    from optimum_rmtkd import RMTKDCompressor

    model = RMTKDCompressor.from_pretrained(bert_dir).model
    with pytest.raises(TypeError, match=re.escape(
            "`model_name_or_path` must be a Hub id, a folder or a .gguf file, got a BertForSequenceClassification "
            "object; for a model in memory use `RMTKDCompressor(model, preprocessor)`.")):
        RMTKDCompressor.from_pretrained(model)
    with pytest.raises(TypeError, match=re.escape(
            f"`model` must be a loaded model (an nn.Module), got the path '{bert_dir}'; load it with "
            f"`RMTKDCompressor.from_pretrained('{bert_dir}')`.")):
        RMTKDCompressor(str(bert_dir))


# --- data files: one line with the fix, before the model loads ------------------------------------------------------
BROKEN_DATA = {
    # name: (content, message after "`--dataset` '<path>' ")
    "empty.csv": (b"", "is empty (0 bytes); pass a CSV file with at least one example."),
    "binary.csv": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text (a NUL byte at offset 8): is it a binary "
                                                          "file? Pass a CSV file saved as UTF-8."),
    "latin1.csv": ("text,label\ncafé,1\n".encode("latin-1"),
                   "is not UTF-8 text (byte b'\\xe9' at offset 14): is it a binary file? Pass a CSV file saved as "
                   "UTF-8."),
    "semicolons.csv": (b"text;label\nreview 0;0\nreview 1;1\n",
                       "reads as one column 'text;label': it looks semicolon-separated, but a .csv file is read "
                       "comma-separated; save it with commas (.csv) or tabs (.tsv)."),
    "tabs.csv": (b"text\tlabel\nreview 0\t0\n",
                 "reads as one column 'text\\tlabel': it looks tab-separated, but a .csv file is read comma-separated; "
                 "rename it to .tsv."),
    "commas.tsv": (b"text,label\nreview 0,0\n", "reads as one column 'text,label': it looks comma-separated, but a "
                                                ".tsv file is read tab-separated; rename it to .csv."),
    "header.csv": (b"text,label\n", "has no rows (only a header); pass a file with at least one example."),
    "null.json": (b"null\n", "does not hold JSON objects (it starts with 'n'); pass a JSON list of objects, or JSON "
                             "Lines (one object per line, .jsonl)."),
    "empty-list.json": (b"[]", "has no rows; pass a file with at least one example."),
    "train.xlsx": (b"PK\x03\x04", "has the extension '.xlsx', which is not read; save it as one of .csv, .tsv, .json, "
                                  ".jsonl, .parquet."),
}


@pytest.mark.parametrize("name", list(BROKEN_DATA))
def test_a_data_file_that_cannot_be_read_is_one_line_before_the_model_loads(name, folders, capsys, monkeypatch):
    from optimum_rmtkd.compressor import RMTKDCompressor

    content, message = BROKEN_DATA[name]
    path = folders["data"] / name
    path.write_bytes(content)
    monkeypatch.setattr(RMTKDCompressor, "from_pretrained", _not_called)
    line = _fails(["compress", folders["model"], "--dataset", path, "-o", folders["tmp"] / "out"], capsys)
    assert line == f"error: `--dataset` '{path}' {message}{HINT}"
    assert not (folders["tmp"] / "out").exists()


@pytest.mark.parametrize("content", [b'{"text": "a", "label": 1\n', b'[{"text": "a", "label": 1},'])
def test_broken_json_is_one_line_naming_the_flag(content, folders, capsys):
    path = folders["data"] / "eval.json"
    path.write_bytes(content)
    line = _fails(["compress", folders["model"], "--dataset", folders["csv"], "--eval-dataset", path, "-o",
                   folders["tmp"] / "out"], capsys)
    # The parser's own reason sits between the two parts (its words depend on the pyarrow or pandas version).
    assert line.startswith(f"error: `--eval-dataset` '{path}' is not valid JSON (")
    assert line.endswith("); fix it: a JSON list of objects, or JSON Lines (one object per line, .jsonl), each with "
                         f"the same fields.{HINT}")


@pytest.mark.parametrize("missing", ["data/train.xlsx", "train.csv", "./splits/train", "a/b/c"])
def test_a_missing_data_path_is_refused_at_once_without_a_hub_lookup(missing, folders, capsys, monkeypatch):
    import datasets

    # `datasets.load_dataset("data/train.xlsx")` looks the string up on the Hub: 22 seconds, then an unrelated error.
    monkeypatch.setattr(datasets, "load_dataset", _not_called)
    monkeypatch.chdir(folders["tmp"])
    line = _fails(["analyze", folders["model"], "--dataset", missing], capsys)
    assert line == (f"error: `--dataset` '{missing}' does not exist; pass an existing csv/tsv/json/jsonl/parquet "
                    f"file, a dataset folder or a Hub dataset id.{HINT}")


def test_load_split_names_the_argument_and_wraps_the_parser_error(tmp_path):
    from optimum_rmtkd.data import load_split

    path = tmp_path / "train.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=re.escape(f"`train_dataset` '{path}' could not be read as Parquet (")) as info:
        load_split(str(path), name="train_dataset")
    assert str(info.value).endswith("); fix the file or write it again.")
    assert info.value.__cause__ is not None  # the parser's error, for --debug


def _not_called(*args, **kwargs):
    raise AssertionError("called although the data should have been refused first")


# --- messages name the flags on the command line --------------------------------------------------------------------
@pytest.mark.parametrize(
    "verb, message, expected",
    [
        ("compress",
         "`eval_dataset` has class id 7 but the model has `num_labels=2`; for a model whose head is new pass "
         "`num_labels=8` to `RMTKDCompressor.from_pretrained` (`--num-labels 8`), else fix the labels.",
         "`--eval-dataset` has class id 7 but the model has `num_labels=2`; for a model whose head is new pass "
         "`--num-labels 8`, else fix the labels."),
        ("compress",
         "`train_dataset` is too small to hold out a validation split; pass `eval_dataset`.",
         "`--dataset` is too small to hold out a validation split; pass `--eval-dataset`."),
        ("compress",
         "The checkpoints in 'out.checkpoints' belong to another run (its config differ); pass `resume=False` "
         "(`--no-resume`) to start over and replace them, or choose another `save_directory`.",
         "The checkpoints in 'out.checkpoints' belong to another run (its config differ); pass `--no-resume` to start "
         "over and replace them, or choose another `--output`."),
        ("compress",
         "`test_dataset` has no column 'review'; its columns are text, label. Pass the right "
         "`text_column`/`image_column`/`label_column`.",
         "`--test-dataset` has no column 'review'; its columns are text, label. Pass the right "
         "`--text-column`/`--image-column`/`--label-column`."),
        ("compress",
         "`calibration_dataset` has labels 'x' the training data's classes do not include; fix the labels, or load "
         "the model with a new head (`num_labels`).",
         "`--calibration-dataset` has labels 'x' the training data's classes do not include; fix the labels, or load "
         "the model with a new head (`--num-labels`)."),
        ("compress",
         "`save_directory` 'out' exists and is not empty; choose another folder or pass `overwrite=True`.",
         "`--output` 'out' exists and is not empty; choose another folder or pass `--overwrite`."),
        ("analyze",
         "`output_dir` 'x' exists and is not empty; choose another folder or pass `overwrite=True`.",
         "`--output` 'x' exists and is not empty; choose another folder or pass `--overwrite`."),
        ("push",
         "The base model '/m' is a local path, so the card has no `base_model` metadata; pass `base_model=` with its "
         "Hub id to link the model tree.",
         "The base model '/m' is a local path, so the card has no `base_model` metadata; pass `--base-model` with its "
         "Hub id to link the model tree."),
        ("push",
         "`model_dir` 'x' is missing config.json; push the `save_directory` written by `RMTKDCompressor.compress`.",
         "`folder` 'x' is missing config.json; push the `--output` written by `rmtkd compress`."),
        ("push",
         "`revision` must be None with `create_pr=True` (pull requests open against `main`), got 'dev'.",
         "`--revision` must be None with `--create-pr` (pull requests open against `main`), got 'dev'."),
        ("push",
         "`benchmark` must be a benchmark.md or a folder holding one, got 'b'; pass the `--output` folder of "
         "`rmtkd benchmark`.",
         "`--benchmark` must be a benchmark.md or a folder holding one, got 'b'; pass the `--output` folder of "
         "`rmtkd benchmark`."),
        ("export",
         "`fp16=True` needs `device='cuda'`, got `device`='cpu': the CPU execution provider has few float16 kernels.",
         "`--fp16` needs `--device cuda`, got `--device`='cpu': the CPU execution provider has few float16 kernels."),
        ("export",
         "`output_dir` 'm/sub' is the input model 'm', one of its parents or a folder inside it.",
         "`output` 'm/sub' is the input model 'm', one of its parents or a folder inside it."),
        ("benchmark",
         "`original_dir` and `compressed_dir` must hold models of the same task, got 'a' and 'b'.",
         "`--original` and `--compressed` must hold models of the same task, got 'a' and 'b'."),
        ("benchmark",
         "`sequence_lengths` must not exceed the original model's limit (64), got (32, 128).",
         "`--sequence-lengths` must not exceed the original model's limit (64), got (32, 128)."),
    ],
)
def test_library_messages_name_the_flags_on_the_command_line(verb, message, expected):
    from optimum_rmtkd.commands.base import cli_message
    from optimum_rmtkd.commands.rmtkd_cli import VERBS

    (command,) = [command for command in VERBS if command.COMMAND.name == verb]
    assert cli_message(message, command.API_FLAGS) == expected


def _csv(path: Path, labels) -> Path:
    path.write_text("text,label\n" + "".join(f"review {i},{label}\n" for i, label in enumerate(labels)))
    return path


def test_errors_that_reach_the_command_line_name_flags(folders, capsys):
    small = _csv(folders["data"] / "small.csv", [0, 1, 0, 1, 0])
    # These fail once the model is loaded: --quiet leaves the error alone on stderr.
    line = _fails(["compress", folders["model"], "--dataset", small, "-o", folders["tmp"] / "out", "--quiet"], capsys)
    assert line == f"error: `--dataset` is too small to hold out a validation split; pass `--eval-dataset`.{HINT}"
    line = _fails(["compress", folders["model"], "--dataset", folders["csv"], "--text-column", "review", "-o",
                   folders["tmp"] / "out", "--quiet"], capsys)
    assert line.startswith("error: `--dataset` has no column 'review'; its columns are text, label.")
    assert "`--text-column`/`--image-column`/`--label-column`" in line and "_column" not in line


def test_warnings_on_the_command_line_name_flags(capsys):
    from optimum_rmtkd.commands.base import configure_logging
    from optimum_rmtkd.commands.push import PushCommand

    configure_logging(quiet=False, debug=False, api_flags=PushCommand.API_FLAGS)
    logging.getLogger("optimum_rmtkd.hub").warning("pass `base_model=` with its Hub id")
    assert capsys.readouterr().err == "[WARNING] pass `--base-model` with its Hub id\n"


# --- a trained head, the input limit --------------------------------------------------------------------------------
def test_num_labels_on_a_trained_head_is_refused_before_loading(folders, capsys, monkeypatch):
    from optimum_rmtkd.compressor import RMTKDCompressor

    monkeypatch.setattr(RMTKDCompressor, "from_pretrained", _not_called)
    line = _fails(["compress", folders["model"], "--dataset", folders["csv"], "--num-labels", "5", "-o",
                   folders["tmp"] / "out"], capsys)
    assert line == ("error: `--num-labels` is 5, but the model's head (BertForSequenceClassification) has 3 labels; "
                    "--num-labels only sizes a new head: drop it, or start from the base encoder (a checkpoint "
                    f"without a task head).{HINT}")


def test_num_labels_sizes_a_new_head_and_may_repeat_a_trained_ones():
    from transformers import BertConfig

    from optimum_rmtkd.commands.base import check_num_labels

    check_num_labels(5, BertConfig(architectures=["BertModel"]))  # no head yet: --num-labels sizes it
    check_num_labels(3, BertConfig(architectures=["BertForSequenceClassification"], num_labels=3))
    check_num_labels(None, BertConfig(architectures=["BertForSequenceClassification"], num_labels=3))


def test_max_length_above_the_models_limit_is_clamped_with_one_warning(folders, capsys):
    # Texts longer than the model's 64 positions: truncated to 100000 tokens they would index past the position table.
    long_texts = folders["data"] / "long.csv"
    long_texts.write_text("text,label\n" + "".join(f"{' '.join(['w1'] * 200)},{i % 2}\n" for i in range(20)))
    main([str(arg) for arg in ["analyze", folders["model"], "--dataset", long_texts, "--max-length", "100000",
                               "--sites", "ffn"]])
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "max-length" in line] == [
        "[WARNING] `--max-length` 100000 is above the model's limit of 64 tokens (`max_position_embeddings`); texts "
        "are truncated to 64 tokens."
    ]
    assert not [line for line in lines if "Traceback" in line or line.startswith("error")]


def test_the_default_max_length_is_clamped_without_a_word():
    from transformers import BertConfig

    from optimum_rmtkd.commands.base import clamp_max_length

    config = RMTKDConfig()
    assert config.max_length == 128
    assert clamp_max_length(config, "text-classification", BertConfig(max_position_embeddings=64)).max_length == 64
    assert clamp_max_length(config, "text-classification", BertConfig(max_position_embeddings=512)) is config


# --- a full disk ----------------------------------------------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_no_temporary_files(folders, capsys, monkeypatch):
    output = folders["tmp"] / "spectra"
    monkeypatch.setattr(os, "fsync", _no_space)  # every atomic write syncs its file before moving it into place
    line = _fails(["analyze", folders["model"], "--dataset", folders["csv"], "--sites", "ffn", "--no-plots", "-o",
                   output], capsys)
    assert line == (f"error: No space left on the device while writing '{output}'; the partial write was removed: "
                    f"free space on that disk, or choose an output folder on another disk.{HINT}")
    assert sorted(path.name for path in folders["tmp"].iterdir()) == ["data", "models"]


def test_atomic_writes_on_a_full_disk(tmp_path, monkeypatch):
    from optimum_rmtkd.utils.io import RMTKDDiskFullError, atomic_directory, atomic_write_json

    (tmp_path / "kept.json").write_text("{}")
    monkeypatch.setattr(os, "fsync", _no_space)
    message = "No space left on the device while writing '{}'; the partial write was removed: free space on that " \
              "disk, or choose an output folder on another disk."
    with pytest.raises(RMTKDDiskFullError, match=re.escape(message.format(tmp_path / "kept.json"))) as info:
        atomic_write_json(tmp_path / "kept.json", {"new": True})
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    with pytest.raises(RMTKDDiskFullError, match=re.escape(message.format(tmp_path / "model"))):
        with atomic_directory(tmp_path / "model") as folder:
            atomic_write_json(folder / "config.json", {})
    assert [path.name for path in tmp_path.iterdir()] == ["kept.json"]
    assert (tmp_path / "kept.json").read_text() == "{}"
