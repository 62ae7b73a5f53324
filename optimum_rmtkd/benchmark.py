"""Latency, throughput, memory, FLOPs and energy of a compressed model against its original, in one process.

How it measures (so that a speed-up means what it says):
- Both models are loaded in the same process and timed on the same backend and inputs, interleaved after warm-up:
  pair i runs original then compressed when i is even, compressed then original when odd, so drift (turbo, heat,
  other load) and whatever one call leaves in the caches for the next are shared alike. Latency is the wall time
  of one call (`time.perf_counter`, the GPU synchronised), garbage collection off while timing.
- Per model and cell (backend, batch size, sequence length or image size): median, p90 and p99 latency (numpy's
  linear percentiles; p99 means something only with ≥ 100 repeats), throughput = batch size / median latency.
- Speed-up = original median / compressed median, with a 95% percentile-bootstrap interval that resamples the
  pairs (so each resample keeps the interleaving), and the FLOP ratio original / compressed beside it.
- FLOPs per example: `torch.utils.flop_counter.FlopCounterMode` over one forward at batch 1, i.e. 2 × the
  multiply-accumulates of every matrix product, convolution and attention product (PyTorch's CPU attention kernel
  is mapped to the same formula as the GPU ones); element-wise ops, norms and softmax are not counted, as in the
  usual FLOP tables. It counts what the model actually runs, so registered `rmtkd_*` types need no special case.
- Peak memory: the working memory that one call adds on top of the loaded model. CPU: rise of the process's peak
  resident set (Linux `VmHWM`, reset through `/proc/self/clear_refs` after freed heap is handed back with
  `malloc_trim`; elsewhere a 1 ms RSS poll). ONNX Runtime on CPU is measured on a second session of the same file
  with its memory arena and pattern planner off, since the arena keeps memory from earlier calls and would show
  ~0. PyTorch on GPU: `torch.cuda.max_memory_allocated` above the allocation before the call. ONNX Runtime's CUDA
  arena cannot be observed from outside: not measured, and the report says so.
- Threads: `threads` sets PyTorch's intra-op threads and ONNX Runtime's `intra_op_num_threads`; otherwise each
  library's default (PyTorch: its `get_num_threads()`; ONNX Runtime: one per physical core). ONNX Runtime's idle
  worker spinning is turned off, so one session's spinning workers cannot take the cores of the other's call.
- ONNX Runtime sessions: `ort_session_options(device, ort_disabled_optimizers)`, the options the exporter
  recommends for deployment (on CPU, ONNX Runtime's defaults less the `SkipLayerNormFusion` rewrite, whose kernel
  is slower than the ops it fuses); the same for both models, and recorded in the report's settings.
- ONNX files: a folder's own export, or `export_onnx` (validated against PyTorch) into a cache; the wall time of
  export + validation is kept in `models[name]["onnx_export"]`.
- Energy: after timing, each model runs alone for at least `energy_seconds` under a meter: NVML on CUDA backends,
  RAPL on CPU backends (see `optimum_rmtkd.energy`); "not available" with the reason when there is no meter.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .energy import NVMLPowerSampler, RAPLReader
from .exporters.generation import ONNXCausalLM
from .exporters.onnx import (
    ONNX_WEIGHTS_NAME,
    RMTKDValidationError,
    check_optimizer_names,
    default_disabled_optimizers,
    export_onnx,
    load_saved_model,
    model_task,
    ort_session_options,
    validate_onnx,
)
from .modeling.kv_cache import greedy_decode
from .utils.import_utils import is_matplotlib_available, require
from .utils.io import atomic_write_json, atomic_write_text, check_output_folder
from .utils.memory import peak_rss_increase_mb
from .utils.progress import progress_bars_enabled

logger = logging.get_logger(__name__)

PathLike = Union[str, os.PathLike]

BACKENDS = ("pytorch", "pytorch-cuda", "onnxruntime-cpu", "onnxruntime-cuda")
DEFAULT_BACKENDS = ("pytorch", "pytorch-cuda", "onnxruntime-cpu", "onnxruntime-cuda")
MODEL_NAMES = ("original", "compressed")
_PYTORCH_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_BOOTSTRAP_RESAMPLES = 2000


@dataclass
class BenchmarkResult:
    """Timing of one model in one cell of the grid (one row of `benchmark.json`'s `results`)."""

    backend: str
    model: str
    batch_size: int
    sequence_length: Optional[int]
    image_size: Optional[int]
    median_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float
    peak_memory_mb: Optional[float]
    threads: int
    repeats: int
    energy: dict[str, Any]
    phase: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return _drop_unset(asdict(self))


@dataclass
class BenchmarkSpeedup:
    """Original against compressed in one cell: speed-up, its 95% bootstrap interval and the FLOP ratio."""

    backend: str
    batch_size: int
    sequence_length: Optional[int]
    image_size: Optional[int]
    speedup: float
    speedup_ci95: tuple[float, float]
    flop_ratio: float
    speedup_over_flop_ratio: float
    phase: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        row = _drop_unset(asdict(self))
        row["speedup_ci95"] = list(self.speedup_ci95)
        return row


def _drop_unset(row: dict[str, Any]) -> dict[str, Any]:
    """A row names its size by what it is (`sequence_length` for text, `image_size` for images) and has a `phase`
    only for generative models (`prefill`, `decode`)."""
    return {key: value for key, value in row.items()
            if not (key in ("sequence_length", "image_size", "phase") and value is None)}


@dataclass
class BenchmarkReport:
    """Everything one `benchmark_models` run measured; `save` writes benchmark.json, .md and .png."""

    machine: dict[str, Any]
    models: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    results: list[BenchmarkResult] = field(default_factory=list)
    speedups: list[BenchmarkSpeedup] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def size_key(self) -> str:
        """`"sequence_length"` for text models, `"image_size"` for image models."""
        return self.settings["size_key"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "models": self.models,
            "settings": self.settings,
            "results": [row.to_dict() for row in self.results],
            "speedups": [row.to_dict() for row in self.speedups],
            "skipped": self.skipped,
        }

    def speedup_for(self, backend: str, batch_size: int, size: int,
                    phase: Optional[str] = None) -> Optional[BenchmarkSpeedup]:
        """The speed-up entry of one cell (of one `phase` for a generative model), or `None` when the grid did not
        measure it."""
        for row in self.speedups:
            if (row.backend, row.batch_size, getattr(row, self.size_key), row.phase) == (backend, batch_size, size,
                                                                                         phase):
                return row
        return None

    def to_markdown(self) -> str:
        """Original and compressed side by side per cell, with the speed-up and FLOP ratio."""
        size_label = "seq len" if self.size_key == "sequence_length" else "image size"
        original, compressed = self.models["original"], self.models["compressed"]
        lines = [
            "| | original | compressed |",
            "|---|---|---|",
            f"| parameters | {original['parameters']:,} | {compressed['parameters']:,} |",
        ]
        for fmt in ("pytorch", "onnx"):
            if fmt in original["file_size_bytes"] and fmt in compressed["file_size_bytes"]:
                lines.append(
                    f"| {fmt} file size (MB) | {original['file_size_bytes'][fmt] / 1e6:.2f} "
                    f"| {compressed['file_size_bytes'][fmt] / 1e6:.2f} |"
                )
        exports = [original.get("onnx_export"), compressed.get("onnx_export")]
        if all(exports):
            cached = " (cached)" if any(export["reused"] for export in exports) else ""
            lines.append(
                f"| ONNX export + validation (s){cached} | {exports[0]['seconds']:.1f} | {exports[1]['seconds']:.1f} |"
            )
        new_tokens = self.settings.get("new_tokens")
        flop_lines = [("flops_per_example", f"GFLOPs / example ({size_label} {{}})")]
        if new_tokens is not None:
            size_label = "prompt tokens"
            flop_lines = [("flops_per_example", "GFLOPs / prompt of {} tokens"),
                          ("flops_per_decode_step", "GFLOPs / decode step after {} tokens")]
        for key, label in flop_lines:
            for size, flops in original[key].items():
                lines.append(f"| {label.format(size)} | {flops / 1e9:.4g} | {compressed[key][size] / 1e9:.4g} |")
        phase_column = "phase | " if new_tokens is not None else ""
        unit = "tok/s" if new_tokens is not None else "ex/s"
        lines += [
            "",
            f"| backend | {phase_column}batch | {size_label} | original ms (p50 / p90 / p99) "
            f"| compressed ms (p50 / p90 / p99) | speed-up (95% CI) | FLOP ratio | throughput {unit} (orig → comp) "
            "| peak MB (orig / comp) | J / example (orig / comp) |",
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if new_tokens is not None else ""),
        ]
        rows = {(r.backend, r.batch_size, getattr(r, self.size_key), r.phase, r.model): r for r in self.results}
        for speedup in self.speedups:
            cell = (speedup.backend, speedup.batch_size, getattr(speedup, self.size_key), speedup.phase)
            a, b = rows[cell + ("original",)], rows[cell + ("compressed",)]
            low, high = speedup.speedup_ci95
            phase = f"{cell[3]} | " if new_tokens is not None else ""
            lines.append(
                f"| {cell[0]} | {phase}{cell[1]} | {cell[2]} "
                f"| {a.median_ms:.3f} / {a.p90_ms:.3f} / {a.p99_ms:.3f} "
                f"| {b.median_ms:.3f} / {b.p90_ms:.3f} / {b.p99_ms:.3f} "
                f"| {speedup.speedup:.2f}× ({low:.2f}–{high:.2f}) | {speedup.flop_ratio:.2f}× "
                f"| {a.throughput:,.1f} → {b.throughput:,.1f} "
                f"| {_format_optional(a.peak_memory_mb)} / {_format_optional(b.peak_memory_mb)} "
                f"| {_format_energy(a.energy)} / {_format_energy(b.energy)} |"
            )
        for skip in self.skipped:
            lines.append(f"\n{skip['backend']} not measured: {skip['reason']}.")
        for backend, names in self.settings.get("ort_disabled_optimizers", {}).items():
            if names and any(r.backend == backend for r in self.results):
                lines.append(f"\n{backend} sessions leave off the ONNX Runtime rewrites {', '.join(names)}.")
        energy_reasons = sorted({r.energy["reason"] for r in self.results if not r.energy["available"]})
        for reason in energy_reasons:
            lines.append(f"\nEnergy n/a: {reason}.")
        machine = self.machine
        lines.append(
            f"\nMachine: {machine['cpu_model']} ({machine['physical_cores']} cores / {machine['logical_cores']} "
            f"threads), GPU: {machine['gpu'] or 'none'}; torch {machine['versions'].get('torch')}, "
            f"onnxruntime {machine['versions'].get('onnxruntime')}; {self.settings['warmup']} warm-up and "
            f"{self.settings['repeats']} timed calls per model and cell, interleaved."
        )
        if new_tokens is not None:
            lines.append(
                f"\nprefill: one forward of the prompt, the cache built; decode: {new_tokens} greedy steps of one token "
                f"per row after the prompt's cache (built untimed); throughput in tokens per second (prompt tokens "
                f"for prefill, new tokens for decode); the FLOP ratio of decode is that of one decode step."
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: PathLike) -> None:
        """Write a PNG of median latency against batch size, one panel per backend, both models per size."""
        require("matplotlib", "BenchmarkReport.plot")
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullLocator

        backends = list(dict.fromkeys(r.backend for r in self.results))
        figure = Figure(figsize=(5.5 * max(len(backends), 1), 4.2), layout="constrained")
        axes = figure.subplots(1, max(len(backends), 1), squeeze=False)[0]
        for axis, backend in zip(axes, backends):
            groups = sorted({(getattr(r, self.size_key), r.phase or "") for r in self.results if r.backend == backend})
            for color_index, (size, phase) in enumerate(groups):
                for model, style in zip(MODEL_NAMES, ("-o", "--s")):
                    cell = (backend, model, size, phase)
                    rows = sorted(
                        (r for r in self.results
                         if (r.backend, r.model, getattr(r, self.size_key), r.phase or "") == cell),
                        key=lambda r: r.batch_size,
                    )
                    label = f"{model}, {self.size_key.replace('_', ' ')} {size}" + (f", {phase}" if phase else "")
                    axis.plot([r.batch_size for r in rows], [r.median_ms for r in rows], style,
                              color=f"C{color_index}", label=label)
            axis.set_xscale("log", base=2)
            batch_sizes = sorted({r.batch_size for r in self.results if r.backend == backend})
            axis.set_xticks(batch_sizes, labels=[str(b) for b in batch_sizes])
            axis.xaxis.set_minor_locator(NullLocator())
            axis.set_yscale("log")
            axis.set_xlabel("batch size")
            axis.set_ylabel("median latency (ms)")
            axis.set_title(backend)
            axis.legend(fontsize="small")
        path = Path(path)
        # Render next to the target, then rename: a reader never sees half a PNG.
        tmp_path = path.with_name(f".{path.name}.tmp.png")
        try:
            figure.savefig(tmp_path, dpi=110)
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)

    def save(self, output_dir: PathLike) -> dict[str, Path]:
        """Write `benchmark.json`, `benchmark.md` and (with matplotlib) `benchmark.png` into `output_dir`."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": output_dir / "benchmark.json", "markdown": output_dir / "benchmark.md"}
        atomic_write_json(paths["json"], self.to_dict())
        atomic_write_text(paths["markdown"], self.to_markdown())
        if is_matplotlib_available():
            paths["png"] = output_dir / "benchmark.png"
            self.plot(paths["png"])
        else:
            logger.warning("matplotlib is not installed: no benchmark.png (`pip install matplotlib`).")
        return paths


def _format_optional(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _format_energy(energy: dict[str, Any]) -> str:
    return f"{energy['joules_per_example']:.4g}" if energy["available"] else "n/a"


# ----------------------------------------------------------------------------------------------------------------
# Runners: one model on one backend, ready to run one fixed input


class _Runner(Protocol):
    """One model on one backend, holding one input; calling it runs one inference and returns when it is done."""

    backend: str
    threads: int

    def set_inputs(self, feed: dict[str, np.ndarray]) -> None: ...

    def __call__(self) -> None: ...

    def peak_memory_mb(self) -> Optional[float]: ...


class _PyTorchRunner:
    """Runs the task's exported module (`Task.onnx_module`: the model itself, or a causal LM with its cache as
    tensors) on the inputs the ONNX graph takes, so both backends compute the same thing."""

    def __init__(self, model: torch.nn.Module, device: str):
        self.backend = "pytorch" if device == "cpu" else "pytorch-cuda"
        self.model = model.to(device)
        self.task = model_task(model)
        self.module = self.task.onnx_module(self.model)
        self.device = device
        self.threads = torch.get_num_threads()
        self.inputs: dict[str, torch.Tensor] = {}

    def set_inputs(self, feed: dict[str, np.ndarray]) -> None:
        self.inputs = {name: torch.from_numpy(array).to(self.device) for name, array in feed.items()}
        self.kwargs = self.task.onnx_module_kwargs(self.inputs)

    def __call__(self) -> None:
        with torch.inference_mode():
            self.module(**self.kwargs)
        if self.device != "cpu":
            torch.cuda.synchronize()

    def peak_memory_mb(self) -> Optional[float]:
        if self.device == "cpu":
            return peak_rss_increase_mb(self)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self()
        return (torch.cuda.max_memory_allocated() - before) / 1e6


class _PyTorchDecodeRunner(_PyTorchRunner):
    """`new_tokens` greedy decode steps after the prompt of the inputs, whose cache is built once, untimed."""

    def __init__(self, model: torch.nn.Module, device: str, new_tokens: int):
        super().__init__(model, device)
        self.new_tokens = new_tokens

    def set_inputs(self, feed: dict[str, np.ndarray]) -> None:
        super().set_inputs(feed)
        with torch.inference_mode():
            logits, *past = self.module(**self.kwargs)
        self.state = (logits[:, -1:].argmax(dim=-1), self.inputs["attention_mask"], past)

    def __call__(self) -> None:
        with torch.inference_mode():
            greedy_decode(self.model, *self.state, steps=self.new_tokens)
        if self.device != "cpu":
            torch.cuda.synchronize()


class _ONNXRuntimeRunner:
    def __init__(self, onnx_path: Path, device: str, threads: Optional[int], disabled_optimizers: Sequence[str]):
        import onnxruntime as ort
        import psutil

        self.backend = f"onnxruntime-{device}"
        self.onnx_path = onnx_path
        self.device = device
        self.threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
        self._thread_option = threads
        self._disabled_optimizers = tuple(disabled_optimizers)
        providers = (
            [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
            if device == "cuda"
            else ["CPUExecutionProvider"]
        )
        self.providers = providers
        self.session = ort.InferenceSession(str(onnx_path), self._options(), providers=providers)
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.feed: dict[str, np.ndarray] = {}
        self._binding = None
        self._device_inputs: list = []
        self._memory_session = None

    def _options(self, *, memory_arena: bool = True):
        import onnxruntime as ort

        options = ort_session_options(self.device, self._disabled_optimizers)
        if self._thread_option is not None:
            options.intra_op_num_threads = self._thread_option
            options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = memory_arena
        options.enable_mem_pattern = memory_arena
        return options

    def set_inputs(self, feed: dict[str, np.ndarray]) -> None:
        import onnxruntime as ort

        self.feed = feed
        if self.device == "cuda":
            # I/O binding: inputs copied to the GPU once, outputs left there, so a call times the model only.
            self._binding = self.session.io_binding()
            self._device_inputs = []
            for name, array in feed.items():
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)
                self._device_inputs.append(value)
                self._binding.bind_ortvalue_input(name, value)
            for name in self.output_names:
                self._binding.bind_output(name, "cuda")

    def __call__(self) -> None:
        if self._binding is not None:
            self.session.run_with_iobinding(self._binding)
        else:
            self._run_on(self.session)

    def _run_on(self, session) -> None:
        """One timed call's work on `session` (the timed one, or the memory-measuring twin)."""
        session.run(self.output_names, self.feed)

    def peak_memory_mb(self) -> Optional[float]:
        if self.device == "cuda":
            return None
        import onnxruntime as ort

        if self._memory_session is None:
            options = self._options(memory_arena=False)
            self._memory_session = ort.InferenceSession(str(self.onnx_path), options, providers=self.providers)
        session = self._memory_session
        self._run_on(session)  # first call at this shape: kernel set-up, not working memory
        return peak_rss_increase_mb(lambda: self._run_on(session))


class _ONNXRuntimeDecodeRunner(_ONNXRuntimeRunner):
    """`new_tokens` greedy decode steps (`ONNXCausalLM.decode`) after the prompt's cache, built once, untimed.

    The steps run with I/O binding: the cache each step writes stays on the provider's device as the next step's
    past (on CUDA it never crosses to the host); only the prompt's cache starts from host memory.
    """

    def __init__(self, onnx_path: Path, device: str, threads: Optional[int], disabled_optimizers: Sequence[str],
                 new_tokens: int):
        super().__init__(onnx_path, device, threads, disabled_optimizers)
        self.new_tokens = new_tokens
        self.decoder = ONNXCausalLM(self.session)

    def set_inputs(self, feed: dict[str, np.ndarray]) -> None:
        self.feed = feed
        past = {name: feed[name] for name in self.decoder.past_names}
        logits, self.past = self.decoder.step(feed["input_ids"], feed["attention_mask"], past)
        self.next_ids = logits[:, -1:].argmax(axis=-1).astype(np.int64)

    def __call__(self) -> None:
        self._run_on(self.session)

    def _run_on(self, session) -> None:
        decoder = self.decoder if session is self.session else ONNXCausalLM(session)
        decoder.decode(self.next_ids, self.feed["attention_mask"], self.past, self.new_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def count_flops_per_example(model: torch.nn.Module, feed: dict[str, np.ndarray]) -> int:
    """FLOPs of one forward on a batch of one (2 × multiply-accumulates of matmuls, convolutions, attention), run
    as the exported graph runs it (`Task.onnx_module`, so a causal LM's cache inputs count)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # PyTorch registers SDPA formulas for its GPU kernels only; its CPU kernel is the same product count.
    custom_mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom_mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa_flop
    device = next(model.parameters()).device
    task = model_task(model)
    inputs = task.onnx_module_kwargs({name: torch.from_numpy(array[:1]).to(device) for name, array in feed.items()})
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=custom_mapping) as counter:
        task.onnx_module(model)(**inputs)
    return int(counter.get_total_flops())


def _latency_stats(seconds: np.ndarray, items: int) -> dict[str, float]:
    """Median/p90/p99 latency of one call and the throughput of `items` per call (examples, or tokens)."""
    milliseconds = seconds * 1e3
    median = float(np.median(milliseconds))
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(milliseconds, 90)),
        "p99_ms": float(np.percentile(milliseconds, 99)),
        "throughput": items / (median / 1e3),
    }


def _speedup_with_ci(original: np.ndarray, compressed: np.ndarray, seed: int) -> tuple[float, tuple[float, float]]:
    """Ratio of medians and its 95% percentile-bootstrap interval, resampling (original, compressed) pairs."""
    speedup = float(np.median(original) / np.median(compressed))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(original), size=(_BOOTSTRAP_RESAMPLES, len(original)))
    ratios = np.median(original[index], axis=1) / np.median(compressed[index], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return speedup, (float(low), float(high))


def _time_interleaved(runners: dict[str, _Runner], repeats: int) -> dict[str, np.ndarray]:
    """Seconds of `repeats` calls of each runner, timed in pairs: A B, then B A, then A B, ….

    Each pair holds one call of every model, so a resample of pairs keeps the interleaving; flipping the order
    every other pair cancels a linear drift within the pairs and gives each model the same share of first places.
    """
    names = list(runners)
    seconds = {name: np.empty(repeats) for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                runners[name]()
                seconds[name][i] = time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return seconds


def _energy_meter(backend: str):
    if backend.endswith("cuda"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        device: Union[int, str] = int(visible) if visible.isdigit() else (visible or 0)
        return NVMLPowerSampler(device)
    return RAPLReader()


def _measure_energy(meter, runner: _Runner, batch_size: int, min_seconds: float) -> dict[str, Any]:
    if not meter.available():
        return {"available": False, "source": meter.source, "reason": meter.reason}
    calls = 0
    meter.start()
    start = time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_seconds:
        runner()
        calls += 1
    measurement = meter.stop()
    examples = calls * batch_size
    return {
        "available": True,
        "source": meter.source,
        "joules_per_example": measurement.joules / examples,
        "average_watts": measurement.average_watts,
        "seconds": measurement.seconds,
        "examples": examples,
    }


def _backend_unavailable_reason(backend: str) -> Optional[str]:
    if backend.startswith("onnxruntime"):
        for module in ("onnx", "onnxscript", "onnxruntime"):
            try:
                require(module, f"the `{backend}` backend", "onnx")
            except ImportError as error:
                return str(error)
    if backend.endswith("cuda") and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no CUDA GPU or a CPU-only PyTorch build)"
    if backend == "onnxruntime-cuda":
        import onnxruntime as ort

        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return f"CUDAExecutionProvider is not among onnxruntime's providers {providers} (install onnxruntime-gpu)"
    return None


def _machine_info() -> dict[str, Any]:
    import importlib.metadata

    import psutil

    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    versions = {"python": platform.python_version()}
    packages = (
        "torch", "transformers", "optimum-rmtkd", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy",
        "nvidia-ml-py",
    )
    for package in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu_model": cpu_model,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "versions": versions,
    }


def _files_size(paths: Sequence[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


def _onnx_files(onnx_path: Path) -> list[Path]:
    """The ONNX file and its external data (`model.onnx.data` from torch, `model.onnx_data` from optimum)."""
    return sorted(path for path in onnx_path.parent.glob(f"{onnx_path.name}*") if path.is_file())


def _source_fingerprint(model_dir: Path) -> dict[str, Any]:
    files = sorted(path for path in model_dir.iterdir() if path.is_file())
    return {
        "model_dir": str(model_dir.resolve()),
        "files": {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in files},
    }


# A reused ONNX file must reproduce the model's outputs within this many times the export's own tolerance
# (`Task.onnx_atol`) before it is timed: room for another machine's or ONNX Runtime version's kernels; another
# model's export (or a NaN-filled one) is off by far more.
REUSE_ATOL_FACTOR = 10


def _onnx_model_path(
    model_dir: Path, cache_dir: Path, *, reuse: bool = True, model: Optional[torch.nn.Module] = None
) -> tuple[Path, Optional[dict[str, Any]]]:
    """The ONNX file to benchmark for `model_dir`, and the record of its export (`None` when none was made here).

    With `reuse`, `model_dir/model.onnx` or `model_dir/onnx/model.onnx` (where `rmtkd export` writes) is used, and an
    export cached in `cache_dir` is reused when `cache_dir/source.json` names the same folder with the same files
    (name, size, modification time), so a cache left by another model, or by an older save of this one, is replaced.
    Either is first checked against `model` (loaded from `model_dir` when not given) by `_reuse_problem`: a file that
    is not the model's export (another model's, a damaged or truncated one) is named in a warning and not used. When
    nothing is reused, the model is exported and validated into `cache_dir`.

    The record holds the wall time of export + validation (`seconds`), max |Δ| per validated shape, `atol`, `opset`
    and `reused`: `True` when it describes the cached export of an earlier run, whose time it keeps.
    """
    if reuse:
        for own in (model_dir / ONNX_WEIGHTS_NAME, model_dir / "onnx" / ONNX_WEIGHTS_NAME):
            if own.is_file():
                problem = _reuse_problem(own, model_dir, model)
                if problem is None:
                    return own, None
                fix = (f"replace it with `rmtkd export {model_dir} --overwrite`" if own.parent.name == "onnx" else
                       "delete it (`rmtkd export` writes <model>/onnx)")
                logger.warning(f"Not timing {own}: {problem}; exporting the model again for this run; {fix}.")
                break
    cached, source_file = cache_dir / ONNX_WEIGHTS_NAME, cache_dir / "source.json"
    fingerprint = _source_fingerprint(model_dir)
    if reuse and cached.is_file() and source_file.is_file():
        try:
            source = json.loads(source_file.read_text())
        except (OSError, ValueError):  # a damaged record: export again
            source = {}
        if isinstance(source, dict) and source.get("fingerprint") == fingerprint and "export" in source:
            problem = _reuse_problem(cached, model_dir, model)
            if problem is None:
                logger.info("Reusing the ONNX export %s.", cached)
                return cached, {**source["export"], "reused": True}
            logger.warning(f"Not reusing the cached export {cached}: {problem}; exporting the model again.")
    result = export_onnx(model_dir, cache_dir, overwrite=True)
    record = {
        "seconds": result.seconds,
        "max_abs_diff": result.max_abs_diff,
        "atol": result.atol,
        "opset": result.opset,
        "timings": result.timings,
    }
    atomic_write_json(source_file, {"fingerprint": fingerprint, "export": record})
    return result.onnx_path, {**record, "reused": False}


def _reuse_problem(onnx_path: Path, model_dir: Path, model: Optional[torch.nn.Module]) -> Optional[str]:
    """Why `onnx_path` is not `model`'s export, or None: it must pass `onnx.checker`, load in ONNX Runtime and give
    the model's outputs within `REUSE_ATOL_FACTOR` × the task's `onnx_atol` at the task's first validation shape (a swapped, damaged, truncated or
    NaN-filled file fails)."""
    if model is None:
        model = load_saved_model(model_dir)
    try:
        task = model_task(model)
        validate_onnx(onnx_path, model, atol=REUSE_ATOL_FACTOR * task.onnx_atol, shapes=task.validation_shapes[:1])
    except RMTKDValidationError as error:
        # The validator's own advice (export again, or loosen `atol`) is replaced by the benchmark's.
        reason = " ".join(str(error).split(";")[0].split())
        return f"it is not a valid export of the model in {str(model_dir)!r} ({reason})"
    except Exception as error:  # ONNX Runtime refusing the graph, or inputs the graph does not take
        reason = " ".join(str(error).split()) or type(error).__name__
        return f"ONNX Runtime cannot run it for the model in {str(model_dir)!r} ({type(error).__name__}: {reason})"
    return None


def _backend_device(backend: str) -> str:
    """The device a backend runs on: `"cuda"` for `pytorch-cuda` and `onnxruntime-cuda`, else `"cpu"`."""
    return "cuda" if backend.endswith("cuda") else "cpu"


def _check_positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"`{name}` must be a non-empty sequence of positive ints, got {values!r}.")
    return values


def benchmark_models(
    original_dir: PathLike,
    compressed_dir: PathLike,
    *,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    batch_sizes: Sequence[int] = (1, 8, 32),
    sequence_lengths: Sequence[int] = (32, 128),
    image_sizes: Sequence[int] = (32, 224),
    warmup: int = 5,
    repeats: int = 50,
    threads: Optional[int] = None,
    output_dir: Optional[PathLike] = None,
    onnx_cache_dir: Optional[PathLike] = None,
    reuse_onnx: bool = True,
    energy_seconds: float = 2.0,
    ort_disabled_optimizers: Optional[Sequence[str]] = None,
    new_tokens: int = 64,
    seed: int = 0,
) -> BenchmarkReport:
    """Measure a compressed model against its original on each backend over a grid of batch and input sizes.

    See the module docstring for what each number means and how it is taken.

    Args:
        original_dir (`str` or `os.PathLike`): the uncompressed model's `save_pretrained` folder.
        compressed_dir (`str` or `os.PathLike`): the compressed model's folder (stock or registered `rmtkd_*` type).
        backends (`Sequence[str]`, *optional*): any of `"pytorch"`, `"pytorch-cuda"`, `"onnxruntime-cpu"`,
            `"onnxruntime-cuda"`; a backend this machine lacks is skipped and `skipped` says why.
        batch_sizes (`Sequence[int]`, *optional*, defaults to `(1, 8, 32)`): batch sizes of the grid.
        sequence_lengths (`Sequence[int]`, *optional*, defaults to `(32, 128)`): token counts (text models).
        image_sizes (`Sequence[int]`, *optional*, defaults to `(32, 224)`): square image sides (image models).
        warmup (`int`, *optional*, defaults to 5): untimed calls per model and cell before timing.
        repeats (`int`, *optional*, defaults to 50): timed calls per model and cell.
        threads (`int`, *optional*): intra-op threads of PyTorch and ONNX Runtime; library defaults when `None`.
        output_dir (`str` or `os.PathLike`, *optional*): where to write benchmark.json/.md/.png.
        onnx_cache_dir (`str` or `os.PathLike`, *optional*): where to export models without `model.onnx`;
            defaults to `output_dir/onnx`, or a temporary folder removed afterwards.
        reuse_onnx (`bool`, *optional*, defaults to `True`): use a folder's own `model.onnx` (or `onnx/model.onnx`)
            or a matching export in `onnx_cache_dir`; `False` exports and validates both models afresh, so that
            the export time in `models[name]["onnx_export"]` is measured by this run.
        energy_seconds (`float`, *optional*, defaults to 2.0): length of each energy window, spent only where a
            meter is available.
        ort_disabled_optimizers (`Sequence[str]`, *optional*): ONNX Runtime graph rewrites to leave off in both
            models' sessions; `None` means `ort_session_options`' default for each device
            (`default_disabled_optimizers`), `()` ONNX Runtime's stock behaviour.
        new_tokens (`int`, *optional*, defaults to 64): for a generative model (`text-generation`), the greedy
            decode steps each `decode` call runs after a prompt of `sequence_lengths` tokens; every cell is then
            timed twice, `prefill` (the prompt's forward) and `decode`.
        seed (`int`, *optional*, defaults to 0): seed of the random inputs and of the bootstrap.

    Returns:
        `BenchmarkReport`: machine, models (parameters, file sizes, FLOPs per example and, once an ONNX Runtime
        backend ran, `onnx_export`: the record of the export, `None` when the folder's own file was used), results,
        speed-ups, skips.

    Example:
    ```python
    >>> from optimum_rmtkd.benchmark import benchmark_models
    >>> report = benchmark_models("bert-base", "bert-rmtkd", backends=("pytorch", "onnxruntime-cpu"))
    >>> print(report.to_markdown())
    ```
    """
    original_dir, compressed_dir = Path(original_dir), Path(compressed_dir)
    backends = tuple(backends)
    unknown = [backend for backend in backends if backend not in BACKENDS]
    if not backends or unknown:
        raise ValueError(f"`backends` must be a non-empty subset of {BACKENDS}, got {backends!r}.")
    batch_sizes = _check_positive_ints("batch_sizes", batch_sizes)
    for name, value, minimum in (("warmup", warmup, 0), ("repeats", repeats, 2), ("new_tokens", new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` must be an int of at least {minimum}, got {value!r}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"`threads` must be None or a positive int, got {threads!r}.")
    if not energy_seconds > 0:
        raise ValueError(f"`energy_seconds` must be positive, got {energy_seconds!r}.")
    if ort_disabled_optimizers is not None:
        ort_disabled_optimizers = check_optimizer_names(ort_disabled_optimizers)
    # The report and the ONNX caches (exports and a file of absolute paths) are added to these folders: neither may
    # hold a model nor lie inside one. Files are added, not replaced, so a non-empty folder is fine.
    for name, folder in (("output_dir", output_dir), ("onnx_cache_dir", onnx_cache_dir)):
        if folder is not None:
            check_output_folder(folder, [original_dir, compressed_dir], overwrite=None, name=name)

    models = {
        "original": load_saved_model(original_dir),
        "compressed": load_saved_model(compressed_dir),
    }
    task = model_task(models["original"])
    if model_task(models["compressed"]) is not task:
        raise ValueError(
            f"`original_dir` and `compressed_dir` must hold models of the same task, got "
            f"{task.name!r} and {model_task(models['compressed']).name!r}."
        )
    size_key = task.size_name
    sizes = {"sequence_length": sequence_lengths, "image_size": image_sizes}[size_key]
    sizes = _check_positive_ints(size_key + "s", sizes)
    longest = max(sizes) + (new_tokens if task.is_generative else 0)
    for name, model in models.items():
        limit = task.max_size(model.config)
        if limit is not None and longest > limit:
            extra = f" plus `new_tokens` ({new_tokens})" if task.is_generative else ""
            raise ValueError(f"`{size_key}s`{extra} must not exceed the {name} model's limit ({limit}), got "
                             f"{sizes}.")
    dirs = {"original": original_dir, "compressed": compressed_dir}
    settings = {
        "backends": list(backends),
        "batch_sizes": list(batch_sizes),
        "size_key": size_key,
        "sizes": list(sizes),
        "warmup": warmup,
        "repeats": repeats,
        "threads": threads,
        "energy_seconds": energy_seconds,
        "reuse_onnx": reuse_onnx,
        "ort_disabled_optimizers": {
            backend: list(ort_disabled_optimizers if ort_disabled_optimizers is not None
                          else default_disabled_optimizers(_backend_device(backend)))
            for backend in backends
            if backend.startswith("onnxruntime")
        },
        "new_tokens": new_tokens if task.is_generative else None,
        "seed": seed,
        "order": "interleaved: original then compressed on even pairs, compressed then original on odd pairs",
        "flops": "torch.utils.flop_counter.FlopCounterMode, batch 1, 2 x multiply-accumulates",
        "peak_memory": "working memory one call adds above the loaded model (see optimum_rmtkd.benchmark)",
    }

    def feed_for(name: str, batch_size: int, size: int) -> dict[str, np.ndarray]:
        # Same seed for both models: identical inputs whenever their vocabularies and input names agree.
        model = models[name]
        return task.benchmark_inputs(model, batch_size, size, np.random.default_rng([seed, batch_size, size]))

    summaries = {}
    for name, model in models.items():
        weights = [p for p in dirs[name].iterdir() if p.is_file() and p.name.endswith(_PYTORCH_WEIGHT_SUFFIXES)]
        summaries[name] = {
            "path": str(dirs[name]),
            "model_type": model.config.model_type,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "file_size_bytes": {"pytorch": _files_size(weights)},
            "flops_per_example": {str(size): count_flops_per_example(model, feed_for(name, 1, size)) for size in sizes},
        }
        if task.is_generative:
            summaries[name]["flops_per_decode_step"] = {
                str(size): count_flops_per_example(model, task.decoder_inputs(
                    model, 1, 1, past_length=size, with_padding=False, rng=np.random.default_rng(seed)))
                for size in sizes
            }

    report = BenchmarkReport(machine=_machine_info(), models=summaries, settings=settings)
    previous_threads = torch.get_num_threads()
    temporary_cache = None
    if onnx_cache_dir is None:
        if output_dir is not None:
            onnx_cache_dir = Path(output_dir) / "onnx"
        else:
            temporary_cache = tempfile.TemporaryDirectory(prefix="rmtkd-benchmark-onnx-")
            onnx_cache_dir = temporary_cache.name
    onnx_paths: dict[str, Path] = {}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for backend in backends:
            reason = _backend_unavailable_reason(backend)
            if reason is not None:
                logger.warning("Skipping the %s backend: %s.", backend, reason)
                report.skipped.append({"backend": backend, "reason": reason})
                continue
            if backend.startswith("onnxruntime") and not onnx_paths:
                for name in MODEL_NAMES:
                    onnx_paths[name], summaries[name]["onnx_export"] = _onnx_model_path(
                        dirs[name], Path(onnx_cache_dir) / name, reuse=reuse_onnx, model=models[name]
                    )
                    summaries[name]["file_size_bytes"]["onnx"] = _files_size(_onnx_files(onnx_paths[name]))
            _benchmark_backend(report, backend, models, onnx_paths, feed_for, batch_sizes, sizes, threads)
    finally:
        torch.set_num_threads(previous_threads)
        if temporary_cache is not None:
            temporary_cache.cleanup()
    if output_dir is not None:
        report.save(output_dir)
    return report


def _benchmark_backend(
    report: BenchmarkReport,
    backend: str,
    models: dict[str, torch.nn.Module],
    onnx_paths: dict[str, Path],
    feed_for: Callable[[str, int, int], dict[str, np.ndarray]],
    batch_sizes: Sequence[int],
    sizes: Sequence[int],
    threads: Optional[int],
) -> None:
    settings = report.settings
    device = _backend_device(backend)
    new_tokens = settings.get("new_tokens")
    size_key = report.size_key
    meter = _energy_meter(backend)
    phases = ("prefill", "decode") if new_tokens is not None else (None,)
    for phase in phases:
        runners = _runners(backend, device, models, onnx_paths, settings, threads, phase, new_tokens)
        cells = [(batch_size, size) for batch_size in batch_sizes for size in sizes]
        description = f"Benchmarking {backend}" + (f" ({phase})" if phase else "")
        for batch_size, size in tqdm(cells, desc=description, disable=not progress_bars_enabled(), leave=False):
            logger.info("Benchmarking %s at batch %d, %s %d%s.", backend, batch_size, size_key, size,
                        f", {phase}" if phase else "")
            for name, runner in runners.items():
                runner.set_inputs(feed_for(name, batch_size, size))
            for _ in range(settings["warmup"]):
                for runner in runners.values():
                    runner()
            peaks = {name: runner.peak_memory_mb() for name, runner in runners.items()}
            seconds = _time_interleaved(runners, settings["repeats"])
            # Throughput counts examples, or tokens for a generative model: the prompt's, or the new ones.
            items = batch_size * {None: 1, "prefill": size, "decode": new_tokens}[phase]
            sizes_of_row = dict(sequence_length=size if size_key == "sequence_length" else None,
                                image_size=size if size_key == "image_size" else None)
            for name, runner in runners.items():
                report.results.append(
                    BenchmarkResult(
                        backend=backend,
                        model=name,
                        batch_size=batch_size,
                        **sizes_of_row,
                        **_latency_stats(seconds[name], items),
                        peak_memory_mb=peaks[name],
                        threads=runner.threads,
                        repeats=settings["repeats"],
                        energy=_measure_energy(meter, runner, batch_size, settings["energy_seconds"]),
                        phase=phase,
                    )
                )
            speedup, ci95 = _speedup_with_ci(seconds["original"], seconds["compressed"], settings["seed"])
            flops_key = "flops_per_decode_step" if phase == "decode" else "flops_per_example"
            flops = {name: report.models[name][flops_key][str(size)] for name in MODEL_NAMES}
            flop_ratio = flops["original"] / flops["compressed"]
            report.speedups.append(
                BenchmarkSpeedup(
                    backend=backend,
                    batch_size=batch_size,
                    **sizes_of_row,
                    speedup=speedup,
                    speedup_ci95=ci95,
                    flop_ratio=flop_ratio,
                    speedup_over_flop_ratio=speedup / flop_ratio,
                    phase=phase,
                )
            )
        del runners
        gc.collect()


def _runners(backend: str, device: str, models: dict[str, torch.nn.Module], onnx_paths: dict[str, Path],
             settings: dict[str, Any], threads: Optional[int], phase: Optional[str],
             new_tokens: Optional[int]) -> dict[str, _Runner]:
    """One runner per model for `backend`: a forward (a classifier's, or a causal LM's prefill) or, for `phase`
    `"decode"`, a loop of `new_tokens` greedy steps."""
    if backend.startswith("pytorch"):
        if phase == "decode":
            return {name: _PyTorchDecodeRunner(models[name], device, new_tokens) for name in MODEL_NAMES}
        return {name: _PyTorchRunner(models[name], device) for name in MODEL_NAMES}
    disabled = settings["ort_disabled_optimizers"][backend]
    if phase == "decode":
        return {name: _ONNXRuntimeDecodeRunner(onnx_paths[name], device, threads, disabled, new_tokens)
                for name in MODEL_NAMES}
    return {name: _ONNXRuntimeRunner(onnx_paths[name], device, threads, disabled) for name in MODEL_NAMES}
