"""`rmtkd` and `optimum-cli rmtkd` run as real subprocesses on a tiny saved BERT and small CSV files.

Parsers and documented defaults are checked in-process (cheap); everything that runs a command goes through a
subprocess, so exit codes, stderr and the absence of tracebacks are what a user would see, and the logging setup of
a command cannot leak into other tests.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from optimum.commands.base import RootOptimumCLICommand

from hub_server import TEST_TOKEN, TEST_USER, LocalHub
from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.commands.base import ANALYSIS_FIELDS, CONFIG_FLAGS, ConfigFlag, config_from_args
from optimum_rmtkd.commands.rmtkd_cli import RMTKDCommand, main
from optimum_rmtkd.rmt import ESTIMATORS

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
VERBS = ("compress", "analyze", "export", "benchmark", "push")
# Tiny budget: two distillation steps per stage, widths rounded to 4 so the 32/37-wide model really shrinks.
FAST = ["--max-distillation-steps", "2", "--batch-size", "8", "--max-length", "32", "--width-multiple", "4",
        "--min-width", "4", "--max-metric-drop", "none"]


def _env(**overrides: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    env.update(overrides)
    return env


def _rmtkd_command(*args) -> list:
    """The installed `rmtkd` console script, as a user runs it."""
    return [str(BIN / "rmtkd"), *map(str, args)]


def rmtkd(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(_rmtkd_command(*args), capture_output=True, text=True, timeout=300, env=env or _env())


def _parsers() -> dict:
    root = RootOptimumCLICommand("rmtkd")
    for info in RMTKDCommand.SUBCOMMANDS:
        root.register_subcommand(info)
    return {command.COMMAND.name: command.parser for command in root.registered_subcommands}


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def csv_files(text_splits, tmp_path_factory) -> dict:
    """Train/validation CSVs whose text column is called `sentence`, so `--text-column` is exercised."""
    folder = tmp_path_factory.mktemp("csv")
    files = {}
    for name, split in text_splits.items():
        files[name] = folder / f"{name}.csv"
        split.rename_column("text", "sentence").to_csv(str(files[name]), index=False)
    return files


def _hub_env(hub: LocalHub, folder: Path, **overrides: str) -> dict:
    """Online, but only towards the loopback Hub, and without any token saved by `hf auth login`."""
    settings = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_TOKEN_PATH": str(folder / "no-saved-token")}
    return _env(**{**settings, **overrides})


@pytest.fixture(scope="module")
def compressed(bert_dir, csv_files, tmp_path_factory):
    """One `rmtkd compress --push-to-hub` run shared by the tests that need its output: token and endpoint come from
    `HF_TOKEN` and `HF_ENDPOINT`, as for a user. Returns the process, the output folder and the files pushed."""
    folder = tmp_path_factory.mktemp("compress")
    config_file = folder / "rmtkd_config.json"
    config_file.write_text(json.dumps({"estimator": "paper", "quantile": 0.7, "seed": 3}))
    out = folder / "out"
    with LocalHub() as hub:
        proc = rmtkd(
            "compress", bert_dir, "--dataset", csv_files["train"], "--validation-file", csv_files["validation"],
            "--text-column", "sentence", "--config", config_file, "--estimator", "mp-median", *FAST, "-o", out,
            "--push-to-hub", "--hub-model-id", f"{TEST_USER}/out", env=_hub_env(hub, folder, HF_TOKEN=TEST_TOKEN),
        )
        pushed = hub.files(f"{TEST_USER}/out")
    return proc, out, pushed


@pytest.fixture(scope="module")
def quick_runs(bert_dir, csv_files, tmp_path_factory) -> dict:
    """Runs that stop before any real work, started together: each costs little more than the interpreter's start
    (importing torch and transformers), so running them side by side keeps the module fast."""
    folder = tmp_path_factory.mktemp("quick")
    non_empty = folder / "non-empty"
    non_empty.mkdir()
    (non_empty / "keep.txt").write_text("precious")
    missing = folder / "no-such-model"
    dataset = csv_files["train"]
    commands = {
        "script help": _rmtkd_command("--help"),
        "register import": [sys.executable, "-c", "import sys, optimum.commands.register.register_rmtkd as r; "
                            "print([m for m in ('onnxruntime', 'matplotlib', 'pynvml') if m in sys.modules], "
                            "[c.__name__ for c in r.REGISTER_COMMANDS])"],
        "optimum-cli help": [str(BIN / "optimum-cli"), "rmtkd", "compress", "--help"],
        "missing column": _rmtkd_command("compress", bert_dir, "--dataset", dataset, "--text-column", "review",
                                         *FAST, "-o", folder / "out", "--quiet"),
        # Through optimum-cli: its `main` neither catches errors nor returns a status, the command must.
        "non-empty output": [str(BIN / "optimum-cli"), "rmtkd", "compress", str(bert_dir), "--dataset", str(dataset),
                             "-o", str(non_empty)],
        "hub id without push": _rmtkd_command("compress", bert_dir, "--dataset", dataset, "-o", folder / "unpushed",
                                              "--hub-model-id", "me/model"),
        "missing model": _rmtkd_command("analyze", missing, "--dataset", dataset),
        "missing model --debug": _rmtkd_command("analyze", missing, "--dataset", dataset, "--debug"),
        "unknown hub id": _rmtkd_command("analyze", "rmtkd-tester/no-such-model", "--dataset", dataset),
    }
    running = {name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
               for name, command in commands.items()}
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(commands[name], process.returncode, stdout, stderr)
    results["folders"] = {"out": folder / "out", "non-empty": non_empty, "missing": missing}
    return results


# --- parsers and help ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", VERBS)
def test_help_lists_every_flag_with_its_default(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in _parsers()[verb]._actions:
        for option in action.option_strings:
            assert option in text
        # `-m/--model` is the flag form of the positional model argument, which has no default.
        if action.option_strings and action.dest not in ("help", "model_option") and not action.required:
            assert "(default:" in " ".join(action.help.split()), action.option_strings


def test_cli_defaults_are_read_from_the_library():
    # No copies: a flag has no default of its own, it reads RMTKDConfig's, which `--help` shows.
    assert "default" not in {field.name for field in dataclasses.fields(ConfigFlag)}
    defaults = RMTKDConfig()
    helps = {action.dest: " ".join(action.help.split()) for action in _parsers()["compress"]._actions}
    for flag in CONFIG_FLAGS:
        assert flag.default == getattr(defaults, flag.field), flag.field
        assert helps[flag.field].endswith(f"(default: {flag.default_text()})."), flag.field


def test_compress_help_opens_with_the_defaults_and_the_paper_preset(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "usage: rmtkd compress MODEL --dataset DATA -o OUTPUT [options]"
    head = " ".join(" ".join(lines[:16]).split())
    defaults = RMTKDConfig()
    assert (f"Defaults: --estimator {defaults.estimator}, --sites {' '.join(defaults.sites)}, --on-metric-drop "
            f"{defaults.on_metric_drop}: FFN sites before the hidden width") in head
    assert "The paper's recipe, --preset paper (estimator paper, hidden width first" in head


def test_preset_then_config_file_then_flags(tmp_path):
    parser = _parsers()["compress"]
    base = ["model", "-o", "out", "--dataset", "d.csv"]
    assert config_from_args(parser.parse_args(base)) == RMTKDConfig()
    assert config_from_args(parser.parse_args(base + ["--preset", "paper"])) == RMTKDConfig.preset("paper")
    # Explicit flags win over the preset.
    args = parser.parse_args(base + ["--preset", "paper", "--sites", "ffn", "--on-metric-drop", "skip"])
    assert config_from_args(args) == RMTKDConfig.preset("paper", sites=("ffn",), on_metric_drop="skip")
    # So does a --config file, and a flag over both.
    (tmp_path / "rmtkd_config.json").write_text(json.dumps({"estimator": "gavish-donoho", "quantile": 0.7}))
    args = parser.parse_args(base + ["--preset", "paper", "--config", str(tmp_path), "--quantile", "0.6"])
    assert config_from_args(args) == RMTKDConfig.preset("paper", estimator="gavish-donoho", quantile=0.6)
    assert config_from_args(parser.parse_args(base + ["--learning-rate", "auto"])).learning_rate == "auto"
    assert config_from_args(parser.parse_args(base + ["--learning-rate", "3e-4"])).learning_rate == 3e-4
    analyze = _parsers()["analyze"].parse_args(["model", "--dataset", "d.csv", "--preset", "paper"])
    assert config_from_args(analyze, ANALYSIS_FIELDS).estimator == "paper"


def test_a_wrong_type_in_the_config_file_names_the_file_and_a_flag_can_replace_it(tmp_path):
    config_file = tmp_path / "rmtkd_config.json"
    config_file.write_text(json.dumps({"batch_size": "32", "quantile": 0.7}))
    parser = _parsers()["compress"]
    base = ["model", "-o", "out", "--dataset", "d.csv", "--config", str(config_file)]
    with pytest.raises(TypeError, match=re.escape(
            f"`--config` '{config_file}': `batch_size` must be an integer, got str '32'; write it without quotes.")):
        config_from_args(parser.parse_args(base))
    assert config_from_args(parser.parse_args(base + ["--batch-size", "16"])) == RMTKDConfig(batch_size=16,
                                                                                            quantile=0.7)
    # A bad flag over a good file is the flag's error, without the file's name.
    with pytest.raises(ValueError, match=r"^`quantile` must be in \(0.0, 1.0\), got 1.5.$"):
        config_from_args(parser.parse_args(base + ["--batch-size", "16", "--quantile", "1.5"]))


def test_benchmark_and_export_help_show_the_library_defaults():
    benchmark = pytest.importorskip("optimum_rmtkd.benchmark")
    onnx = pytest.importorskip("optimum_rmtkd.exporters.onnx")
    from optimum_rmtkd.commands.benchmark import BACKENDS

    assert BACKENDS == benchmark.BACKENDS
    helps = {action.dest: " ".join(action.help.split()) for action in _parsers()["benchmark"]._actions}
    signature = inspect.signature(benchmark.benchmark_models).parameters
    for name in ("backends", "batch_sizes", "sequence_lengths", "image_sizes", "warmup", "repeats",
                 "energy_seconds", "seed"):
        default = signature[name].default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else str(default)
        assert f"(default: {shown})" in helps[name], name
    helps = {action.dest: action.help for action in _parsers()["export"]._actions}
    assert f"(default: {onnx.DEFAULT_OPSET}," in helps["opset"]
    assert float(re.search(r"default: ([0-9.e-]+)", helps["atol"]).group(1)) == onnx.DEFAULT_ATOL


def test_benchmark_disabled_optimizers_flag():
    parser = _parsers()["benchmark"]
    base = ["--original", "a", "--compressed", "b"]
    assert parser.parse_args(base).ort_disabled_optimizers is None  # the library's per-device default
    assert parser.parse_args(base + ["--ort-disabled-optimizers"]).ort_disabled_optimizers == []  # stock ORT
    args = parser.parse_args(base + ["--ort-disabled-optimizers", "SkipLayerNormFusion", "BiasGeluFusion"])
    assert args.ort_disabled_optimizers == ["SkipLayerNormFusion", "BiasGeluFusion"]


def test_flags_override_the_config_file_field_by_field(tmp_path):
    config_file = tmp_path / "rmtkd_config.json"
    RMTKDConfig(estimator="gavish-donoho", quantile=0.7, max_stages=2).to_json_file(config_file)
    parser = _parsers()["compress"]
    args = parser.parse_args(["model", "-o", "out", "--dataset", "d.csv", "--config", str(tmp_path),
                              "--estimator", "mppca", "--sites", "ffn", "--max-metric-drop", "none"])
    assert config_from_args(args) == RMTKDConfig(estimator="mppca", quantile=0.7, max_stages=2, sites=("ffn",),
                                                 max_metric_drop=None)
    args = parser.parse_args(["model", "-o", "out", "--dataset", "d.csv", "--quantile", "1.5"])
    with pytest.raises(ValueError, match=r"`quantile` must be in \(0.0, 1.0\), got 1.5"):
        config_from_args(args)


def test_console_script_and_optimum_cli_expose_the_commands(quick_runs):
    proc = quick_runs["script help"]
    assert proc.returncode == 0, proc.stderr
    assert all(verb in proc.stdout for verb in VERBS)
    # optimum-cli finds `rmtkd` through the optimum.commands.register namespace (REGISTER_COMMANDS).
    proc = quick_runs["optimum-cli help"]
    assert proc.returncode == 0, proc.stderr
    assert "usage: optimum-cli rmtkd compress" in proc.stdout
    assert "--max-distillation-steps" in proc.stdout


def test_register_module_only_registers_and_stays_light(quick_runs):
    proc = quick_runs["register import"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] ['RMTKDCommand']"


# --- commands end to end ---------------------------------------------------------------------------------------------
def test_compress_writes_a_folder_that_reloads_with_the_stock_class(compressed):
    from transformers import AutoModelForSequenceClassification

    proc, out, _ = compressed
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # Without --quiet: the stages are logged and long loops show progress bars.
    assert "[INFO]" in proc.stderr and "Calibrating" in proc.stderr
    assert f"Saved the compressed model to {out}" in proc.stdout
    report = json.loads((out / "rmtkd_report.json").read_text())
    assert re.search(rf"parameters: {report['parameters']['original']:,} -> {report['parameters']['compressed']:,}",
                     proc.stdout)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["compressed"]
    assert report["parameters"]["compressed"] < report["parameters"]["original"]
    # --config gave quantile and seed, the flags the rest (the flag's estimator wins over the file's).
    saved = RMTKDConfig.from_json_file(out)
    assert (saved.estimator, saved.quantile, saved.seed) == ("mp-median", 0.7, 3)
    assert (saved.max_distillation_steps, saved.batch_size, saved.max_metric_drop) == (2, 8, None)


def test_analyze_with_a_size_target_prints_the_widths_that_meet_it(bert_dir, csv_files, tmp_path):
    proc = rmtkd("analyze", "-m", bert_dir, "--dataset", csv_files["train"], "--text-column", "sentence",
                 "--calibration-fraction", "0.5", "--width-multiple", "4", "--min-width", "4",
                 "--target-reduction", "0.4", "--output", tmp_path / "analysis", "--quiet")
    assert proc.returncode == 0, proc.stderr
    allocation = json.loads((tmp_path / "analysis" / "analysis.json").read_text())["allocation"]
    assert allocation["reduction"] >= 0.4 and allocation["parameters"] <= allocation["target_parameters"]
    for name, width in allocation["widths"].items():
        assert re.search(rf"^{re.escape(name)}\s+\d+\s+{width}\s+{allocation['uniform_widths'][name]}$", proc.stdout,
                         re.M)
    assert f"these widths leave {allocation['parameters']:,}" in proc.stdout


def test_analyze_prints_the_table_writes_analysis_json_and_leaves_the_model_alone(bert_dir, csv_files, tmp_path):
    before = _digest(bert_dir)
    out = tmp_path / "analysis"
    proc = rmtkd("analyze", "-m", bert_dir, "--dataset", csv_files["train"], "--text-column", "sentence",
                 "--calibration-fraction", "0.5", "--estimator", "gavish-donoho", "--output", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet
    header = proc.stdout.splitlines()[0].split()
    assert header == ["site", "d", "n", "q", "σ²", "λ₊", "paper", "mp-median", "gavish-donoho*",
                      "kritchman-nadler", "mppca", "KS", "heavy-tailed"]
    data = json.loads((out / "analysis.json").read_text())
    assert data["calibration_examples"] == 80 and data["estimator"] == "gavish-donoho"
    names = [site["name"] for site in data["sites"]]
    # In stage order: the default sites cut the FFN first.
    assert names == ["bert.encoder.layer.0.ffn", "bert.encoder.layer.1.ffn", "hidden"]
    for site in data["sites"]:
        assert re.search(rf"^{re.escape(site['name'])}\s+{site['original_width']}\s+{site['n_samples']}\s",
                         proc.stdout, re.M)
        assert set(site["asked_widths"]) == set(site["saved_widths"]) == set(ESTIMATORS)
        assert site["kept_width"] == site["saved_widths"]["gavish-donoho"]
        # A width is a multiple of 8 (the hidden one also of the 4 heads) or the full width, and saving never
        # narrows what a site's spectrum asks for.
        for estimator, width in site["saved_widths"].items():
            assert width % 8 == 0 or width == site["original_width"]
            assert width >= site["asked_widths"][estimator]
    # The stock format holds one FFN width for both layers: the widest asked.
    ffn = [site for site in data["sites"] if site["kind"] == "ffn"]
    for estimator in ESTIMATORS:
        assert ffn[0]["saved_widths"][estimator] == ffn[1]["saved_widths"][estimator] == max(
            site["asked_widths"][estimator] for site in ffn)
    assert sorted(p.name for p in (out / "spectra").iterdir()) == sorted(f"{name}.png" for name in names)
    assert _digest(bert_dir) == before


def test_export_writes_a_validated_onnx_folder(compressed):
    pytest.importorskip("optimum_rmtkd.exporters.onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, out, _ = compressed
    proc = rmtkd("export", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no log lines, warnings or progress bars
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "config.json").is_file()
    assert re.search(r"Validated with ONNX Runtime: max \|Δ\| of the outputs .+ \(atol 0.0001\)", proc.stdout)


def test_compress_push_to_hub_uploads_the_output_folder(compressed):
    proc, out, pushed = compressed
    assert proc.returncode == 0, proc.stderr
    assert f"Pushed to http://127.0.0.1:" in proc.stdout
    local = {path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert set(pushed) <= set(local)
    for name in ("config.json", "model.safetensors", "rmtkd_config.json", "rmtkd_report.json", "README.md"):
        assert pushed[name] == local[name], name
    assert any(name.startswith("spectra/") and name.endswith(".png") for name in pushed)
    assert f"from_pretrained(\"{TEST_USER}/out\")" in pushed["README.md"].decode()


def test_push_uploads_the_folder_to_the_given_endpoint(compressed, tmp_path):
    _, out, _ = compressed
    folder = tmp_path / "tiny-rmtkd"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("onnx", "README.md"))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "benchmark.md").write_text("# Benchmark\n\n| batch | speed-up |\n|---|---|\n| 1 | 1.42x |\n")
    repo_id = f"{TEST_USER}/tiny-rmtkd"
    with LocalHub() as hub:
        proc = rmtkd("push", folder, "--hub-model-id", repo_id, "--token", TEST_TOKEN, "--endpoint", hub.url,
                     "--benchmark", bench, "--quiet",
                     # --endpoint wins over HF_ENDPOINT, which points at a port nothing listens on.
                     env=_hub_env(hub, tmp_path, HF_ENDPOINT="http://127.0.0.1:9"))
        assert proc.returncode == 0, proc.stderr
        assert f"Pushed {folder} to {hub.url}/{repo_id}/commit/" in proc.stdout
        files = hub.files(repo_id)
    assert set(files) == {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    for name in files:
        assert files[name] == (folder / name).read_bytes(), name
    assert "## Benchmark\n\n| batch | speed-up |\n|---|---|\n| 1 | 1.42x |" in files["README.md"].decode()


def test_push_with_a_wrong_token_is_one_line_and_keeps_the_folder(compressed, tmp_path):
    _, out, _ = compressed
    before = _digest(out)
    with LocalHub() as hub:
        proc = rmtkd("push", out, "--hub-model-id", f"{TEST_USER}/denied",
                     env=_hub_env(hub, tmp_path, HF_TOKEN="hf_wrong"))
        assert hub.repos == {}
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"error: Authentication failed for {hub.url}: set `HF_TOKEN` or run `hf auth login`. Local files were left in "
        "place; pushing again is safe and uploads what is missing. (run with --debug to see the traceback)"
    )
    assert _digest(out) == before


# --- errors: one line, non-zero exit, no traceback unless --debug ---------------------------------------------------
def test_missing_column_is_one_clear_line(quick_runs):
    proc = quick_runs["missing column"]
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1  # --quiet leaves only the error
    assert "error: `--dataset` has no column 'review'; its columns are sentence, label." in proc.stderr
    assert "Pass the right `--text-column`/`--image-column`/`--label-column`." in proc.stderr
    assert not quick_runs["folders"]["out"].exists()


def test_non_empty_output_needs_overwrite(quick_runs):
    proc, out = quick_runs["non-empty output"], quick_runs["folders"]["non-empty"]
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"`--output` '{out}' exists and is not empty; choose another folder or pass --overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_hub_model_id_without_push_to_hub_is_refused(quick_runs):
    proc = quick_runs["hub id without push"]
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: `--hub-model-id` was given without `--push-to-hub`; add `--push-to-hub` to push. "
        "(run with --debug to see the traceback)"
    )


def test_nonexistent_model_path_fails_fast_and_debug_shows_the_traceback(quick_runs):
    proc, missing = quick_runs["missing model"], quick_runs["folders"]["missing"]
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"The model '{missing}' was not found: there is no such local folder" in proc.stderr
    proc = quick_runs["missing model --debug"]
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ValueError" in proc.stderr


def test_unknown_hub_id_offline_suggests_a_local_path(quick_runs):
    proc = quick_runs["unknown hub id"]
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "Could not find the model 'rmtkd-tester/no-such-model' locally (no such folder) or on the Hub" in proc.stderr
    assert "pass the path of a local folder written by `save_pretrained`" in proc.stderr
