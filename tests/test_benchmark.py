"""Benchmark: report schema, FLOP counts, memory probe, speed-up statistics, energy meters, and the speed script."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _models import NUM_LABELS, save_tiny_bert, save_tiny_resnet

from optimum_rmtkd import benchmark as benchmark_module
from optimum_rmtkd.benchmark import BenchmarkReport, BenchmarkSpeedup, benchmark_models, count_flops_per_example
from optimum_rmtkd.energy import NVMLPowerSampler, RAPLReader
from optimum_rmtkd.exporters.onnx import ONNXExportResult, export_onnx, load_saved_model
from optimum_rmtkd.utils import memory as memory_module

SPEED_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
RESULT_KEYS = {
    "backend", "model", "batch_size", "sequence_length", "median_ms", "p90_ms", "p99_ms", "throughput",
    "peak_memory_mb", "threads", "repeats", "energy",
}
SPEEDUP_KEYS = {
    "backend", "batch_size", "sequence_length", "speedup", "speedup_ci95", "flop_ratio", "speedup_over_flop_ratio",
}


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    # The "compressed" twin has a narrower FFN (16 instead of 37), so the FLOP ratio is above 1.
    return save_tiny_bert(root / "original", "bert"), save_tiny_bert(root / "compressed", "bert", intermediate_size=16)


def _bert_flops(sequence_length: int, hidden: int = 32, ffn: int = 37, layers: int = 2) -> int:
    """2 × multiply-accumulates of Q, K, V, output and both FFN matmuls per token, QKᵀ and AV, pooler, classifier."""
    per_layer = sequence_length * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * sequence_length**2 * hidden
    return 2 * (layers * per_layer + hidden * hidden + hidden * NUM_LABELS)


@pytest.mark.parametrize("sequence_length", [8, 32])
def test_flop_count_matches_the_analytic_count(bert_pair, sequence_length):
    model = load_saved_model(bert_pair[0])
    feed = {"input_ids": np.ones((3, sequence_length), dtype=np.int64)}
    # Batch 3 in, one example counted; attention included although PyTorch runs its CPU SDPA kernel.
    assert count_flops_per_example(model, feed) == _bert_flops(sequence_length)


def _conv_and_linear_flops(model: torch.nn.Module, pixel_values: torch.Tensor) -> int:
    """2 × multiply-accumulates of every Conv2d and Linear, from the output shapes that forward hooks see."""
    total = 0

    def hook(module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output[0].numel() * kernel  # output[0]: one example of the batch
        else:
            total += 2 * module.in_features * module.out_features

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [layer.register_forward_hook(hook) for layer in layers]
    with torch.no_grad():
        model(pixel_values=pixel_values)
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("image_size", [16, 32])
def test_flop_count_of_resnet_counts_convolutions_and_classifier(tmp_path, image_size):
    model = load_saved_model(save_tiny_resnet(tmp_path / "resnet"))
    pixels = np.zeros((2, 3, image_size, image_size), dtype=np.float32)
    expected = _conv_and_linear_flops(model, torch.from_numpy(pixels[:1]))
    # Convolutions and the classifier only: BatchNorm, ReLU and pooling are not counted, as in FLOP tables.
    assert count_flops_per_example(model, {"pixel_values": pixels}) == expected
    if image_size == 32:  # every convolution's output grows with the image area: 4× the FLOPs of 16 × 16 but the head
        small = _conv_and_linear_flops(model, torch.zeros(1, 3, 16, 16))
        head = 2 * model.classifier[1].in_features * NUM_LABELS
        assert expected - head == 4 * (small - head)


def test_timing_interleaves_the_models():
    calls = []

    class Recorder:
        def __init__(self, name: str):
            self.name = name

        def __call__(self) -> None:
            calls.append(self.name)

    seconds = benchmark_module._time_interleaved({"original": Recorder("A"), "compressed": Recorder("B")}, repeats=4)
    # One call of each model per pair, the order flipped every other pair.
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert {name: times.shape for name, times in seconds.items()} == {"original": (4,), "compressed": (4,)}
    assert all((times >= 0).all() for times in seconds.values())


@pytest.mark.slow  # two ONNX exports: 10-20 s on 2 busy cores
def test_benchmark_report_schema(bert_pair, tmp_path):
    output_dir, onnx_cache = tmp_path / "speed", tmp_path / "onnx-cache"
    report = benchmark_models(
        *bert_pair,
        backends=("pytorch", "onnxruntime-cpu", "onnxruntime-cuda"),
        batch_sizes=(1, 2),
        sequence_lengths=(8,),
        warmup=1,
        repeats=3,
        threads=1,
        output_dir=output_dir,
        onnx_cache_dir=onnx_cache,
    )
    assert {path.name for path in output_dir.iterdir()} == {"benchmark.json", "benchmark.md", "benchmark.png"}
    assert {path.name for path in onnx_cache.iterdir()} == {"original", "compressed"}
    assert {"model.onnx", "config.json", "source.json"} <= {path.name for path in (onnx_cache / "original").iterdir()}
    data = json.loads((output_dir / "benchmark.json").read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert set(data) == {"machine", "models", "settings", "results", "speedups", "skipped"}

    machine = data["machine"]
    assert isinstance(machine["cpu_model"], str) and machine["logical_cores"] >= 1
    assert {"torch", "transformers", "onnxruntime", "python"} <= set(machine["versions"])

    assert set(data["models"]) == {"original", "compressed"}
    original, compressed = data["models"]["original"], data["models"]["compressed"]
    assert original["parameters"] - compressed["parameters"] == 2 * (2 * 32 * (37 - 16) + (37 - 16))
    assert original["flops_per_example"] == {"8": _bert_flops(8)}
    assert compressed["flops_per_example"] == {"8": _bert_flops(8, ffn=16)}
    for summary in (original, compressed):
        assert set(summary["file_size_bytes"]) == {"pytorch", "onnx"}
        assert all(isinstance(size, int) and size > 0 for size in summary["file_size_bytes"].values())
        # Exported into the empty cache by this run: the time of export + validation is measured, not reused.
        export = summary["onnx_export"]
        assert set(export) == {"seconds", "max_abs_diff", "atol", "opset", "timings", "reused"}
        assert export["seconds"] > 0 and export["reused"] is False and export["opset"] == 23
        assert set(export["timings"]) == {"export", "validation"} and sum(export["timings"].values()) <= export[
            "seconds"]
        assert set(export["max_abs_diff"]) == {"2x16", "3x37"} and max(export["max_abs_diff"].values()) < 1e-4
    assert data["settings"]["reuse_onnx"] is True
    assert data["settings"]["ort_disabled_optimizers"] == {
        "onnxruntime-cpu": ["SkipLayerNormFusion"], "onnxruntime-cuda": []
    }

    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    measured = ["pytorch", "onnxruntime-cpu"] + (["onnxruntime-cuda"] if cuda else [])
    if not cuda:
        assert [skip["backend"] for skip in data["skipped"]] == ["onnxruntime-cuda"]
        expected_reason = (
            "CUDAExecutionProvider is not among" if torch.cuda.is_available() else "torch.cuda.is_available() is False"
        )
        assert data["skipped"][0]["reason"].startswith(expected_reason)

    assert len(data["results"]) == len(measured) * 2 * 2  # backends × batch sizes × models
    for row in data["results"]:
        assert set(row) == RESULT_KEYS
        assert row["backend"] in measured and row["model"] in ("original", "compressed")
        assert row["sequence_length"] == 8 and row["repeats"] == 3 and row["threads"] >= 1
        assert 0 < row["median_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["throughput"] == pytest.approx(row["batch_size"] / row["median_ms"] * 1e3)
        if row["backend"] != "onnxruntime-cuda":
            assert isinstance(row["peak_memory_mb"], float) and row["peak_memory_mb"] >= 0
        energy = row["energy"]
        assert energy["source"] in ("rapl", "nvml")
        if energy["available"]:
            assert energy["joules_per_example"] > 0
        else:
            assert isinstance(energy["reason"], str) and energy["reason"]

    assert len(data["speedups"]) == len(measured) * 2
    for row in data["speedups"]:
        assert set(row) == SPEEDUP_KEYS
        low, high = row["speedup_ci95"]
        assert low <= row["speedup"] <= high
        assert row["flop_ratio"] == pytest.approx(_bert_flops(8) / _bert_flops(8, ffn=16))
        assert row["speedup_over_flop_ratio"] == pytest.approx(row["speedup"] / row["flop_ratio"])

    markdown = (output_dir / "benchmark.md").read_text()
    exports = [summary["onnx_export"]["seconds"] for summary in (original, compressed)]
    assert f"| ONNX export + validation (s) | {exports[0]:.1f} | {exports[1]:.1f} |" in markdown
    assert "| pytorch | 2 | 8 |" in markdown and "| onnxruntime-cpu | 1 | 8 |" in markdown
    if not cuda:
        assert "onnxruntime-cuda not measured:" in markdown
    assert "onnxruntime-cpu sessions leave off the ONNX Runtime rewrites SkipLayerNormFusion." in markdown
    assert report.speedup_for("pytorch", 2, 8).batch_size == 2
    assert report.speedup_for("pytorch", 32, 128) is None


def test_image_benchmark_names_its_size(tmp_path):
    original = save_tiny_resnet(tmp_path / "original")
    compressed = save_tiny_resnet(tmp_path / "compressed", seed=1)
    report = benchmark_models(
        original, compressed, backends=("pytorch",), batch_sizes=(2,), image_sizes=(16,), warmup=0, repeats=2,
        threads=1,
    )
    row = report.to_dict()["results"][0]
    assert row["image_size"] == 16 and "sequence_length" not in row
    assert report.to_dict()["models"]["original"]["flops_per_example"].keys() == {"16"}
    assert "image size" in report.to_markdown()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backends": ("tensorrt",)}, r"`backends` must be a non-empty subset of .*got \('tensorrt',\)"),
        ({"batch_sizes": (0,)}, r"`batch_sizes` must be a non-empty sequence of positive ints, got \(0,\)"),
        ({"repeats": 1}, r"`repeats` must be an int of at least 2, got 1"),
        ({"threads": 0}, r"`threads` must be None or a positive int, got 0"),
        (
            {"ort_disabled_optimizers": "SkipLayerNormFusion"},
            r"Disabled optimizers must be a sequence of ONNX Runtime graph transformer names",
        ),
        (
            {"sequence_lengths": (65,)},
            r"`sequence_lengths` must not exceed the original model's limit \(64\)",
        ),
    ],
)
def test_bad_arguments_are_refused(bert_pair, kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark_models(*bert_pair, **kwargs)


def test_text_and_image_models_cannot_be_compared(bert_pair, tmp_path):
    resnet = save_tiny_resnet(tmp_path / "resnet")
    with pytest.raises(ValueError, match=r"must hold models of the same task, got 'text-classification' and "
                                         r"'image-classification'"):
        benchmark_models(bert_pair[0], resnet, backends=("pytorch",))


def test_speedup_interval_brackets_ratio_of_medians():
    compressed = np.array([1.0, 1.1, 0.9, 1.05, 0.95])
    speedup, (low, high) = benchmark_module._speedup_with_ci(2 * compressed, compressed, seed=0)
    # Every pair has ratio exactly 2, so every bootstrap resample does too.
    assert speedup == pytest.approx(2.0) and low == pytest.approx(2.0) and high == pytest.approx(2.0)


@pytest.mark.parametrize("use_proc_peak", [True, False], ids=["vmhwm", "rss-poll"])
def test_peak_memory_sees_a_temporary_allocation(monkeypatch, use_proc_peak):
    if not use_proc_peak:
        monkeypatch.setattr(memory_module, "_reset_peak_rss", lambda: False)

    def call() -> None:
        block = np.ones(8_000_000)  # 64 MB, touched page by page
        time.sleep(0.05)  # long enough for the 1 ms poll to see it
        del block

    # The allocation is freed before the probe returns; only its peak can be seen.
    assert memory_module.peak_rss_increase_mb(call) > 50


def _write_zone(root: Path, zone: str, name: str, energy_uj: int, max_range_uj: int = 1_000_000) -> None:
    folder = root / zone
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "name").write_text(name + "\n")
    (folder / "energy_uj").write_text(f"{energy_uj}\n")
    (folder / "max_energy_range_uj").write_text(f"{max_range_uj}\n")


def test_rapl_sums_packages_and_corrects_wraparound(tmp_path):
    _write_zone(tmp_path, "intel-rapl:0", "package-0", 999_000)
    _write_zone(tmp_path, "intel-rapl:0:0", "core", 10)  # part of package 0: not counted again
    _write_zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000, max_range_uj=10**12)
    _write_zone(tmp_path, "intel-rapl:2", "psys", 0)  # the whole platform: not a package
    reader = RAPLReader(tmp_path)
    assert reader.available() and reader.reason is None
    assert reader.read_energy_uj() == {"intel-rapl:0": 999_000, "intel-rapl:1": 5_000_000}
    reader.start()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("1000\n")  # wrapped past 1_000_000: +2_000 µJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("8000000\n")  # +3_000_000 µJ
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("999999\n")
    measurement = reader.stop()
    assert measurement.joules == pytest.approx(3.002)
    assert measurement.source == "rapl" and measurement.average_watts == pytest.approx(3.002 / measurement.seconds)


def test_rapl_not_available_says_why(tmp_path):
    missing = RAPLReader(tmp_path / "powercap")
    assert not missing.available()
    assert "not readable" in missing.reason
    empty = RAPLReader(tmp_path)
    assert not empty.available()
    assert empty.reason == f"{tmp_path} has no intel-rapl:<n> package zone"
    (tmp_path / "intel-rapl:0" / "energy_uj").mkdir(parents=True)  # a counter that cannot be read as a file
    unreadable = RAPLReader(tmp_path)
    assert not unreadable.available()
    assert "energy_uj not readable" in unreadable.reason
    # On this machine, whatever it is, the answer and the reason agree.
    default = RAPLReader()
    assert default.available() == (default.reason is None)


def _fake_pynvml(device_count: int = 1, init_error: bool = False, milliwatts: int = 50_000):
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if init_error:
            raise NVMLError("Driver Not Loaded")

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlDeviceGetCount = lambda: device_count
    module.nvmlDeviceGetHandleByIndex = lambda index: ("index", index)
    module.nvmlDeviceGetHandleByUUID = lambda uuid: ("uuid", uuid)
    module.nvmlDeviceGetPowerUsage = lambda handle: milliwatts
    return module


def test_nvml_not_available_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    sampler = NVMLPowerSampler()
    assert not sampler.available() and sampler.reason == "pynvml not installed (`pip install nvidia-ml-py`)"
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_error=True))
    assert not sampler.available() and sampler.reason.startswith("NVML did not start (Driver Not Loaded)")
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(device_count=0))
    assert not sampler.available() and sampler.reason == "no NVIDIA GPU"
    with pytest.raises(RuntimeError, match="NVML power sampling is not available: no NVIDIA GPU"):
        sampler.start()


def test_nvml_sampler_integrates_power(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(milliwatts=50_000))
    sampler = NVMLPowerSampler("GPU-1234", interval_s=0.005)
    assert sampler.available() and sampler._handle == ("uuid", "GPU-1234")
    sampler.start()
    time.sleep(0.05)
    measurement = sampler.stop()
    assert measurement.average_watts == pytest.approx(50.0)
    assert measurement.joules == pytest.approx(50.0 * measurement.seconds)
    assert measurement.source == "nvml"
    with pytest.raises(ValueError, match=r"`interval_s` must be positive, got 0"):
        NVMLPowerSampler(interval_s=0)


def _load_speed_script():
    spec = importlib.util.spec_from_file_location("speed_script", SPEED_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_speed_script_runs_end_to_end(bert_pair, tmp_path, capsys):
    script = _load_speed_script()
    output_dir = tmp_path / "speed"
    targets = script.main([
        "--original", str(bert_pair[0]), "--compressed", str(bert_pair[1]), "--output-dir", str(output_dir),
        # PyTorch only keeps this test fast; the ONNX Runtime backends are covered by the schema test.
        "--backends", "pytorch", "--batch-sizes", "1", "2", "--sequence-lengths", "8",
        "--warmup", "0", "--repeats", "2", "--threads", "1",
        "--target-backend", "pytorch", "--target-batch-size", "2", "--target-size", "8",
    ])
    printed = capsys.readouterr().out
    assert "| pytorch | 2 | 8 |" in printed
    speed = targets["speedup"]
    assert speed["measured"] and speed["backend"] == "pytorch" and speed["batch_size"] == 2
    assert speed["met"] == (speed["speedup_over_flop_ratio"] >= 0.8)
    assert (
        f"Speed-up at pytorch, batch 2, sequence length 8: {speed['speedup']:.2f}× (95% CI "
        f"{speed['speedup_ci95'][0]:.2f}–{speed['speedup_ci95'][1]:.2f}), FLOP ratio {speed['flop_ratio']:.2f}×, "
        f"speed-up ÷ FLOP ratio {speed['speedup_over_flop_ratio']:.2f} (target ≥ 0.8: "
    ) in printed
    assert targets["export"] == {
        "measured": False, "reason": "no ONNX Runtime backend ran, so nothing was exported",
    }
    assert "Export + validation of the compressed model: not measured, no ONNX Runtime backend ran" in printed
    assert json.loads((output_dir / "targets.json").read_text()) == json.loads(json.dumps(targets))
    # The default target cell (ONNX Runtime CPU, batch 32, length 128) is outside this grid: said, not invented.
    script.main([
        "--original", str(bert_pair[0]), "--compressed", str(bert_pair[1]), "--output-dir", str(output_dir),
        "--backends", "pytorch", "--batch-sizes", "1", "--sequence-lengths", "8", "--warmup", "0", "--repeats", "2",
        "--threads", "1",
    ])
    assert (
        "Speed-up at onnxruntime-cpu, batch 32, sequence length 128: not measured, that cell is not in the grid."
    ) in capsys.readouterr().out
    assert {"benchmark.json", "benchmark.md", "benchmark.png", "targets.json"} <= {p.name for p in output_dir.iterdir()}


def test_speed_script_defaults_to_the_rotten_tomatoes_grid(monkeypatch, tmp_path):
    script = _load_speed_script()
    seen = {}

    def fake_benchmark(original, compressed, **kwargs):
        seen.update(original=original, compressed=compressed, **kwargs)
        raise SystemExit(0)  # stop before any timing: only the arguments are checked

    monkeypatch.setattr(script, "benchmark_models", fake_benchmark)
    with pytest.raises(SystemExit):
        script.main([])
    rotten_tomatoes = SPEED_SCRIPT.parent / "results" / "rotten_tomatoes"
    assert seen["original"] == rotten_tomatoes / "original" and seen["compressed"] == rotten_tomatoes / "compressed"
    assert seen["output_dir"] == SPEED_SCRIPT.parent / "results" / "speed"
    # The target cell is in the default grid, and the export is timed afresh.
    assert 32 in seen["batch_sizes"] and 128 in seen["sequence_lengths"] and "onnxruntime-cpu" in seen["backends"]
    assert seen["reuse_onnx"] is False


def _report_with(speedup: float, flop_ratio: float, export: Optional[dict]) -> BenchmarkReport:
    models = {"original": {}, "compressed": {} if export is None else {"onnx_export": export}}
    report = BenchmarkReport(machine={}, models=models, settings={"size_key": "sequence_length"})
    report.speedups.append(BenchmarkSpeedup(
        backend="onnxruntime-cpu", batch_size=32, sequence_length=128, image_size=None, speedup=speedup,
        speedup_ci95=(speedup - 0.1, speedup + 0.1), flop_ratio=flop_ratio,
        speedup_over_flop_ratio=speedup / flop_ratio,
    ))
    return report


@pytest.mark.parametrize(("speedup", "met"), [(1.21, True), (1.19, False)])
def test_speedup_target_is_80_percent_of_the_flop_ratio(speedup, met):
    script = _load_speed_script()
    target = script.speedup_target(_report_with(speedup, 1.5, None), "onnxruntime-cpu", 32, 128)
    assert target["cell"] == "onnxruntime-cpu, batch 32, sequence length 128"
    assert target["speedup"] == speedup and target["flop_ratio"] == 1.5 and target["target"] == 0.8
    assert target["met"] is met  # 1.21 / 1.5 = 0.807 meets it; 1.19 / 1.5 = 0.793 does not


@pytest.mark.parametrize(("seconds", "met"), [(12.5, True), (60.0, False)])
def test_export_target_is_under_a_minute(seconds, met):
    script = _load_speed_script()
    record = {"seconds": seconds, "max_abs_diff": {"2x16": 1e-6}, "atol": 1e-4, "opset": 18, "reused": False}
    target = script.export_target(_report_with(1.0, 1.0, record))
    assert target == {"measured": True, **record, "target_seconds": 60.0, "met": met}
    own_file = _report_with(1.0, 1.0, None)
    own_file.models["compressed"]["onnx_export"] = None
    assert script.export_target(own_file) == {
        "measured": False, "reason": "the folder's own ONNX file was used (run without --reuse-onnx)",
    }


def test_onnx_cache_is_reused_only_for_the_same_source(monkeypatch, tmp_path):
    exported = []

    def fake_export(model_dir, output_dir, overwrite):
        exported.append(Path(model_dir).name)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "model.onnx").write_bytes(b"onnx")
        return ONNXExportResult(output_dir / "model.onnx", max_abs_diff={"2x16": 1e-6}, passed=True, seconds=2.5)

    monkeypatch.setattr(benchmark_module, "export_onnx", fake_export)
    monkeypatch.setattr(benchmark_module, "_reuse_problem", lambda *args: None)  # these files are no real graphs
    first, second, cache = tmp_path / "first", tmp_path / "second", tmp_path / "cache"
    for folder in (first, second):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    record = {"seconds": 2.5, "max_abs_diff": {"2x16": 1e-6}, "atol": 1e-4, "opset": 23, "timings": {}}
    assert benchmark_module._onnx_model_path(first, cache) == (cache / "model.onnx", {**record, "reused": False})
    # Same files: reused, with the time measured when the export was made.
    assert benchmark_module._onnx_model_path(first, cache) == (cache / "model.onnx", {**record, "reused": True})
    assert exported == ["first"]
    benchmark_module._onnx_model_path(second, cache)  # another model in the same cache: exported again
    (second / "config.json").write_text('{"changed": true}')  # a newer save of that model: exported again
    benchmark_module._onnx_model_path(second, cache)
    assert exported == ["first", "second", "second"]
    (first / "model.onnx").write_bytes(b"own")  # a folder with its own export is used as it is
    assert benchmark_module._onnx_model_path(first, cache) == (first / "model.onnx", None)
    # Without reuse, neither the folder's own file nor the cache is used: exported and timed again.
    fresh = benchmark_module._onnx_model_path(first, cache, reuse=False)
    assert fresh == (cache / "model.onnx", {**record, "reused": False})
    assert exported == ["first", "second", "second", "first"]


# --- a reused ONNX file must be the model's --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_exports(bert_pair, tmp_path_factory):
    """Each model of `bert_pair` exported once (unvalidated: the tests compare the files with the models)."""
    root = tmp_path_factory.mktemp("exports")
    return {name: export_onnx(folder, root / name, validate=False).onnx_path
            for name, folder in zip(("original", "compressed"), bert_pair)}


def _copy_model(folder: Path, destination: Path) -> Path:
    shutil.copytree(folder, destination, ignore=shutil.ignore_patterns("onnx"))
    return destination


@pytest.mark.slow  # two ONNX exports (the fixture), then one small benchmark run
def test_benchmark_replaces_a_swapped_or_truncated_onnx_file(bert_pair, pair_exports, tmp_path, monkeypatch, capsys,
                                                             restore_logging):
    from optimum_rmtkd.commands.rmtkd_cli import main

    original, compressed = _copy_model(bert_pair[0], tmp_path / "original"), _copy_model(bert_pair[1],
                                                                                        tmp_path / "compressed")
    (original / "onnx").mkdir()
    truncated = pair_exports["original"].read_bytes()
    (original / "onnx" / "model.onnx").write_bytes(truncated[: len(truncated) // 2])
    (compressed / "onnx").mkdir()
    shutil.copy(pair_exports["original"], compressed / "onnx" / "model.onnx")  # the other model's export
    exported = []

    def export_again(model_dir, output_dir, overwrite):
        # The model's own export, made once by the fixture: what `export_onnx` would write here.
        name = Path(model_dir).name
        exported.append(name)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(pair_exports[name], Path(output_dir) / "model.onnx")
        return ONNXExportResult(Path(output_dir) / "model.onnx", max_abs_diff={}, passed=True, seconds=1.0)

    monkeypatch.setattr(benchmark_module, "export_onnx", export_again)
    output = tmp_path / "bench"
    main([str(arg) for arg in ["benchmark", "--original", original, "--compressed", compressed, "--backends",
                               "onnxruntime-cpu", "--batch-sizes", "1", "--sequence-lengths", "8", "--warmup", "0",
                               "--repeats", "2", "--energy-seconds", "0.01", "-o", output]])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert exported == ["original", "compressed"]
    # One line each, naming the file, why, and the fix.
    warnings = [line for line in err.splitlines() if line.startswith("[WARNING] Not timing")]
    assert [line.split(":")[0] for line in warnings] == [
        f"[WARNING] Not timing {original / 'onnx' / 'model.onnx'}",
        f"[WARNING] Not timing {compressed / 'onnx' / 'model.onnx'}",
    ]
    assert "(`onnx.checker` rejects" in warnings[0] and "outputs differ by max |Δ|" in warnings[1]
    report = json.loads((output / "benchmark.json").read_text())
    for name in ("original", "compressed"):
        assert report["models"][name]["onnx_export"]["reused"] is False  # exported for this run, not the stray file
    # The files in the model folders are left as they were.
    assert (compressed / "onnx" / "model.onnx").read_bytes() == pair_exports["original"].read_bytes()


@pytest.mark.slow  # two ONNX exports (the fixture)
def test_a_reused_onnx_file_is_checked_against_the_model(bert_pair, pair_exports, tmp_path, monkeypatch, caplog):
    exported = []

    def export_again(model_dir, output_dir, overwrite):
        exported.append(Path(model_dir).name)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(pair_exports[Path(model_dir).name], Path(output_dir) / "model.onnx")
        return ONNXExportResult(Path(output_dir) / "model.onnx", max_abs_diff={}, passed=True, seconds=1.0)

    monkeypatch.setattr(benchmark_module, "export_onnx", export_again)
    compressed = _copy_model(bert_pair[1], tmp_path / "compressed")
    model = load_saved_model(compressed)
    own = compressed / "onnx" / "model.onnx"
    own.parent.mkdir()
    cache = tmp_path / "cache"
    fix = f"exporting the model again for this run; replace it with `rmtkd export {compressed} --overwrite`."

    # Its own export is timed as it is.
    shutil.copy(pair_exports["compressed"], own)
    assert benchmark_module._onnx_model_path(compressed, cache, model=model) == (own, None)
    # Another model's export gives other logits.
    shutil.copy(pair_exports["original"], own)
    with caplog.at_level("WARNING", logger="optimum_rmtkd.benchmark"):
        path, record = benchmark_module._onnx_model_path(compressed, cache, model=model)
    assert (path, record["reused"]) == (cache / "model.onnx", False)
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.startswith(f"Not timing {own}: it is not a valid export of the model in '{compressed}' (ONNX "
                              "Runtime and PyTorch outputs differ by max |Δ| = ")
    assert message.endswith(fix)
    # A truncated file is no ONNX graph at all.
    caplog.clear()
    own.write_bytes(pair_exports["compressed"].read_bytes()[:5000])
    with caplog.at_level("WARNING", logger="optimum_rmtkd.benchmark"):
        benchmark_module._onnx_model_path(compressed, cache, model=model, reuse=True)
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.startswith(f"Not timing {own}: it is not a valid export of the model in '{compressed}' "
                              f"(`onnx.checker` rejects '{own}' (")
    assert message.endswith(fix)
    assert exported == ["compressed"]  # the second time, the cache made the first time was checked and reused
    # A damaged cache is exported again too.
    caplog.clear()
    shutil.copy(pair_exports["compressed"], own)
    (cache / "model.onnx").write_bytes(b"")
    with caplog.at_level("WARNING", logger="optimum_rmtkd.benchmark"):
        assert benchmark_module._onnx_model_path(compressed, cache, model=model, reuse=False)[0] == cache / "model.onnx"
        (cache / "model.onnx").write_bytes(b"")
        benchmark_module._onnx_model_path(compressed, tmp_path / "unused", model=model)  # its own file: fine
        own.unlink()
        benchmark_module._onnx_model_path(compressed, cache, model=model)
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.startswith(f"Not reusing the cached export {cache / 'model.onnx'}: it is not a valid export of the "
                              f"model in '{compressed}' (`onnx.checker` rejects")
    assert message.endswith("; exporting the model again.")
    assert exported == ["compressed"] * 3


def test_a_reused_onnx_file_at_the_folders_root_or_that_onnx_runtime_refuses(bert_pair, tmp_path, monkeypatch,
                                                                              caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH :\n This is an invalid model.")

    monkeypatch.setattr(benchmark_module, "validate_onnx", refuse)
    monkeypatch.setattr(benchmark_module, "export_onnx", lambda model_dir, output_dir, overwrite: ONNXExportResult(
        output_dir / "model.onnx", seconds=1.0))
    monkeypatch.setattr(benchmark_module, "atomic_write_json", lambda *args: None)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph")
    with caplog.at_level("WARNING", logger="optimum_rmtkd.benchmark"):
        benchmark_module._onnx_model_path(folder, tmp_path / "cache", model=load_saved_model(bert_pair[0]))
    assert [record.getMessage() for record in caplog.records] == [
        f"Not timing {folder / 'model.onnx'}: ONNX Runtime cannot run it for the model in '{folder}' (RuntimeError: "
        "[ONNXRuntimeError] : 10 : INVALID_GRAPH : This is an invalid model.); exporting the model again for this run; "
        "delete it (`rmtkd export` writes <model>/onnx)."
    ]
