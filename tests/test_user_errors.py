"""What a new user runs into first, through `rmtkd_cli.main` in-process: an output folder that would delete or mix with
the input model, numbers the config refuses (NaN, inf, wrong types), wrong JSON types in `--config`. Each is exit
status 1 and one line on stderr, before any work, and the input is left as it was.

Every writer goes through one guard, `optimum_rmtkd.utils.io.check_output_folder`; the API entry points are checked
here too, with their argument's name in the same message.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.commands.rmtkd_cli import main
from optimum_rmtkd.utils.io import check_output_folder

HINT = " (run with --debug to see the traceback)"


@pytest.fixture(autouse=True)
def _restore_logging():
    """`run()` configures the package logger with a handler on the stderr of the moment (pytest's capture)."""
    logger = logging.getLogger("optimum_rmtkd")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


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
    assert line == "error: " + _inside_message("model_dir", output, base.resolve()) + HINT
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
