"""ONNX export of a saved model, in the folder layout optimum's ONNX Runtime classes read, checked against PyTorch.

The export goes through `torch.onnx.export(..., dynamo=True)`, the default and maintained path since PyTorch 2.9:
`torch.export` traces with symbolic batch, sequence and image sizes, so the dynamic axes hold by construction, and
a model that would specialise one of them fails at export time instead of silently. The TorchScript tracer
(`dynamo=False`, deprecated) records Python values computed from shapes as constants: with transformers 5.24 it
warns about exactly that in `masking_utils` and the SDPA integration. Its file matched PyTorch on the tiny BERT
tested here only because those branches take the same side at every shape tried. It exports 20x faster (0.1 s
against 2-3 s), which does not outweigh a silent shape bug.

Written folder (what `ORTModelForSequenceClassification.from_pretrained(folder)` expects):
`model.onnx` (plus `model.onnx.data` above 2 GB), `config.json` and the tokenizer or image-processor files, and,
when a graph optimisation or float16 is asked for, `model_optimized.onnx` beside the plain export (optimum's name
for the output of its `ORTOptimizer`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from .. import modeling  # noqa: F401  (registers the per-layer types, so their folders load)
from ..tasks import get_task
from ..tasks.base import Task
from ..utils.import_utils import require
from .generation import ONNXCausalLM
from .session import (
    CPU_DISABLED_OPTIMIZERS,
    DEVICES,
    ONNX_WEIGHTS_NAME,
    check_device_name,
    check_optimizer_names,
    default_disabled_optimizers,
    ort_session_options,
)
from ..utils.io import atomic_directory, check_output_folder

logger = logging.get_logger(__name__)

PathLike = Union[str, os.PathLike]

ONNX_OPTIMIZED_NAME = "model_optimized.onnx"
MIN_OPSET = 18
# Opset 23 has the `Attention` op, which the exporter emits for scaled-dot-product attention and ONNX Runtime runs as
# one fused kernel. Below it, attention is lowered to MatMul/Softmax plus Where/IsNaN masking whose element-wise work
# over batch × heads × seq² does not shrink with a narrower hidden width: measured on the compressed MiniLM at batch
# 32 × 128 tokens (ORT 1.32, 2 CPU cores), those ops were 30% of the time, and opset 23 ran it 1.6x faster.
DEFAULT_OPSET = 23
OPTIMIZATION_LEVELS = ("basic", "extended", "all")
# float32 logits agree to ~1e-6 on the small models tested (a task may loosen it: `Task.onnx_atol`); float16 keeps ~3
# significant digits, so its default is looser.
DEFAULT_ATOL = Task.onnx_atol
DEFAULT_ATOL_FP16 = 1e-2
# Above this many bytes of weights a single protobuf would pass ONNX's 2 GB limit: write them as external data.
_EXTERNAL_DATA_BYTES = 1_800_000_000
# Files of the source folder that hold weights in another format; everything else (config, tokenizer,
# processor, custom modeling code, rmtkd metadata) is copied beside the ONNX file.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx.data")
_WEIGHT_INDEX_SUFFIX = ".index.json"


class RMTKDValidationError(ValueError):
    """Raised when `onnx.checker` rejects an ONNX file or ONNX Runtime's outputs differ from PyTorch's beyond `atol`."""


@dataclass
class ONNXExportResult:
    """What `export_onnx` wrote and how well it matched PyTorch.

    Args:
        onnx_path (`Path`): the ONNX file to load (`model_optimized.onnx` when optimised or converted to float16).
        max_abs_diff (`dict[str, float]`): max |ONNX Runtime − PyTorch| of the logits per validated shape
            (`"{batch}x{sequence length or image size}"`); empty when `validate=False`.
        passed (`bool` or `None`): whether every shape stayed within `atol`; `None` when not validated.
        opset (`int`): the ONNX opset of the default domain.
        atol (`float`): the tolerance the validation used.
        seconds (`float`): wall time of the whole export, validation included.
        timings (`dict[str, float]`): seconds of its parts: `export` (trace, graph passes, files), `validation`
            and, for a causal LM, `generation_check`.
        generation_checked (`bool`): whether a greedy generation with ONNX Runtime was checked against PyTorch's
            `generate` (causal LMs, when validated).
    """

    onnx_path: Path
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    passed: Optional[bool] = None
    opset: int = DEFAULT_OPSET
    atol: float = DEFAULT_ATOL
    seconds: float = 0.0
    generation_checked: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def read_config_dict(model_dir: PathLike) -> dict:
    """Read `config.json` of a saved model folder as a plain dict (no class lookup, so custom types need no code)."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"`model_dir` {str(model_dir)!r} has no config.json; pass a folder written by `save_pretrained`."
        )
    return json.loads(config_file.read_text(encoding="utf-8"))


def load_saved_model(model_dir: PathLike, *, device: str = "cpu") -> PreTrainedModel:
    """Load a saved model with its task's Auto class, in float32 and eval mode.

    The task comes from `config.json` (`optimum_rmtkd.tasks.get_task`); `trust_remote_code=True` is passed only
    when the config has an `auto_map` (a registered `rmtkd_*` type saved with its modeling code). Weights are cast
    to float32 so that an export, a validation and a benchmark compare the architectures, not the storage precision.
    """
    config = read_config_dict(model_dir)
    kwargs = {"trust_remote_code": True} if config.get("auto_map") else {}
    model = get_task(config).auto_model.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    return model.to(device).eval()


def model_task(model: PreTrainedModel) -> Task:
    """The task of a loaded model, read from its config."""
    return get_task(model.config)


def _weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _torch_export(model: PreTrainedModel, onnx_path: Path, opset: int) -> None:
    """Trace the task's `onnx_module(model)` with `torch.export`, optimise the graph (`_optimize_graph_ir`) and
    write it with its dynamic axes."""
    task = model_task(model)
    input_names = task.onnx_input_names(model)
    example = task.onnx_example_inputs(model, np.random.default_rng(0))
    kwargs = task.onnx_module_kwargs({name: torch.from_numpy(example[name]).to(model.device) for name in input_names})
    with warnings.catch_warnings():
        # Each input repeats the axis names "batch_size"/"sequence_length"; torch notes that it merges them.
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        # torch 2.13's exporter trips its own pytree deprecation (`LeafSpec`); nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            task.onnx_module(model),
            (),
            kwargs=kwargs,
            input_names=list(input_names),
            output_names=list(task.onnx_output_names(model)),
            opset_version=opset,
            dynamo=True,
            optimize=False,
            dynamic_shapes=task.onnx_module_kwargs(task.dynamic_axes(input_names)),
            verbose=False,
        )
    _optimize_graph_ir(program.model)
    program.save(str(onnx_path), external_data=_weights_bytes(model) > _EXTERNAL_DATA_BYTES)


def _optimize_graph_ir(model) -> None:
    """onnxscript's optimisation as `torch.onnx.export(optimize=True)` runs it (`optimize_ir`, then the ONNX
    fusions: RMSNormalization, RotaryEmbedding), after a cheap first pass of constant folding and common
    subexpression elimination. The rewrite rules of `optimize_ir` are matched against every node; the first pass
    shrinks a 30-layer decoder's fresh graph 2.8× (6,835 → 2,421 nodes on SmolLM2-135M, every layer recomputes the
    same rotary tables), so the optimisation takes 25 s instead of 75–88 s on 2 cores and ends at the same graph
    (same 1,658 nodes)."""
    import onnxscript.optimizer
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass
    from onnxscript.rewriter import onnx_fusions

    onnxscript.optimizer.inline(model)
    onnxscript.optimizer.fold_constants_ir(model, onnx_shape_inference=True)
    onnxscript.optimizer.remove_unused_nodes(model)
    CommonSubexpressionEliminationPass()(model)
    onnxscript.optimizer.optimize_ir(model)
    onnx_fusions.fuse(model)


def _fold_attention_layouts(onnx_path: Path) -> None:
    """Rewrite the written graph's `Attention` nodes to the 3-D layout (`graph_passes`); weights are not touched."""
    import onnx

    from .graph_passes import fold_attention_head_transposes

    # External weights stay where they are: only the graph protobuf is read and rewritten.
    model_proto = onnx.load(str(onnx_path), load_external_data=False)
    if fold_attention_head_transposes(model_proto):
        onnx.save(model_proto, str(onnx_path))


def _copy_model_files(model_dir: Path, output_dir: Path, config_updates: dict) -> None:
    """Copy the config, tokenizer/processor, generation config and metadata beside the graph; `config_updates` are
    written into the copied `config.json` (what the runtimes that read it need, e.g. a decoder's `head_dim`)."""
    for source in sorted(model_dir.iterdir()):
        name = source.name
        if not source.is_file() or name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES + (_WEIGHT_INDEX_SUFFIX,)):
            continue
        shutil.copy2(source, output_dir / name)
    if config_updates:
        config = {**read_config_dict(output_dir), **config_updates}
        (output_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _execution_providers(device: str) -> list[str]:
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _convert_to_fp16(source: Path, destination: Path) -> None:
    """Cast the weights and activations of an ONNX graph to float16, keeping float32 inputs and outputs.

    Uses ONNX Runtime's own converter (`onnxruntime.transformers.onnx_model.OnnxModel`), which also keeps in
    float32 the ops that have no float16 kernel and re-sorts the graph after inserting its casts.
    """
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    onnx_model = OnnxModel(onnx.load(str(source)))
    onnx_model.convert_float_to_float16(keep_io_types=True)
    large = onnx_model.model.ByteSize() > _EXTERNAL_DATA_BYTES
    onnx_model.save_model_to_file(str(destination), use_external_data_format=large)


def _optimize_graph(source: Path, destination: Path, optimization_level: str, device: str) -> None:
    """Let an ONNX Runtime session apply its graph optimisations and serialise the result.

    The session is built with the providers the model will run on, because fusions above `basic` are chosen per
    execution provider. `all` adds layout transforms tuned to this CPU: that file is for this machine only.
    """
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort_session_options(device)
    options.graph_optimization_level = levels[optimization_level]
    options.optimized_model_filepath = str(destination)
    ort.InferenceSession(str(source), options, providers=_execution_providers(device))


def _check_device(device: str) -> None:
    check_device_name(device)
    if device == "cuda":
        import onnxruntime as ort

        providers = ort.get_available_providers()
        if not torch.cuda.is_available() or "CUDAExecutionProvider" not in providers:
            raise ValueError(
                f"`device`='cuda' needs a GPU visible to PyTorch and onnxruntime's CUDAExecutionProvider "
                f"(install `onnxruntime-gpu`), got torch.cuda.is_available()={torch.cuda.is_available()} "
                f"and providers {providers}."
            )


def export_onnx(
    model_dir: PathLike,
    output_dir: PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    atol: Optional[float] = None,
    optimization_level: Optional[str] = None,
    fp16: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
) -> ONNXExportResult:
    """Export a saved classifier or causal LM to ONNX and check it against PyTorch with ONNX Runtime.

    A causal LM (`text-generation`) is exported as one graph with a key/value cache (`past_key_values.{i}.key/value`
    in, `present.{i}.key/value` out; an empty past is the prefill), traced with eager attention, validated with and
    without a cache and by a greedy generation of 32 tokens that must equal `generate`'s; `head_dim` and
    `use_cache` are written into the exported `config.json`. `exporters.generation.generate_onnx` runs it.

    Args:
        model_dir (`str` or `os.PathLike`): a `save_pretrained` folder (stock or registered `rmtkd_*` type).
        output_dir (`str` or `os.PathLike`): the folder to write; neither `model_dir`, a parent of it nor a folder
            inside it other than `<model_dir>/onnx`. It is written atomically: on any error (a failed validation
            included) nothing is left behind.
        opset (`int`, *optional*, defaults to 23): ONNX opset, at least 18 (the dynamo exporter's lowest); 23 and
            above export attention as the fused `Attention` op.
        validate (`bool`, *optional*, defaults to `True`): run `validate_onnx` on the written file.
        atol (`float`, *optional*): tolerance on max |Δ| of the outputs; defaults to the task's `onnx_atol` (1e-4;
            1e-3 for causal LMs), or 1e-2 with `fp16`.
        optimization_level (`str`, *optional*): `"basic"`, `"extended"` or `"all"`: ONNX Runtime graph
            optimisations applied ahead of time, with the session options of `ort_session_options(device)`, and
            saved as `model_optimized.onnx`.
        fp16 (`bool`, *optional*, defaults to `False`): convert weights and activations to float16 (inputs and
            logits stay float32); needs `device="cuda"`, since the CPU execution provider lacks float16 kernels.
        device (`str`, *optional*, defaults to `"cpu"`): where validation runs (`"cpu"`: CPU execution provider;
            `"cuda"`: CUDA execution provider and the PyTorch reference on the GPU). Tracing is always on CPU.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir`.

    Returns:
        `ONNXExportResult`: the ONNX path, max |Δ| per validated shape, whether it passed, the opset and the time.

    Example:
    ```python
    >>> from optimum_rmtkd.exporters.onnx import export_onnx
    >>> result = export_onnx("bert-rmtkd", "bert-rmtkd-onnx")
    >>> from optimum.onnxruntime import ORTModelForSequenceClassification  # optimum-onnx, when installed
    >>> model = ORTModelForSequenceClassification.from_pretrained("bert-rmtkd-onnx")
    ```
    """
    start = time.perf_counter()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"`opset` must be an int, got {type(opset).__name__}.")
    if opset < MIN_OPSET:
        raise ValueError(f"`opset` must be at least {MIN_OPSET} (the dynamo exporter's lowest), got {opset}.")
    if optimization_level is not None and optimization_level not in OPTIMIZATION_LEVELS:
        raise ValueError(
            f"`optimization_level` must be None or one of {OPTIMIZATION_LEVELS}, got {optimization_level!r}."
        )
    # `output_dir` is replaced as a whole: it must neither hold `model_dir` nor lie inside it, apart from
    # `<model_dir>/onnx`, the export's own folder that `push_to_hub` uploads.
    check_output_folder(output_dir, [model_dir], overwrite=overwrite, name="output_dir", allowed=[model_dir / "onnx"])
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "export_onnx", "onnx")
    if fp16 and device != "cuda":
        raise ValueError(
            f"`fp16=True` needs `device='cuda'`, got `device`={device!r}: the CPU execution provider has few float16 "
            f"kernels, so a float16 graph runs slower there than float32; export in float32 for CPU."
        )
    _check_device(device)
    if atol is not None and not atol > 0:
        raise ValueError(f"`atol` must be positive, got {atol}.")

    model = load_saved_model(model_dir)
    task = model_task(model)
    if atol is None:
        atol = DEFAULT_ATOL_FP16 if fp16 else task.onnx_atol
    if task.onnx_attn_implementation is not None:
        model.set_attn_implementation(task.onnx_attn_implementation)
    providers = _execution_providers(device)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp_dir:
        onnx_path = tmp_dir / ONNX_WEIGHTS_NAME
        _torch_export(model, onnx_path, opset)
        _fold_attention_layouts(onnx_path)
        _copy_model_files(model_dir, tmp_dir, task.onnx_config_updates(model))
        if fp16 or optimization_level is not None:
            optimized_path = tmp_dir / ONNX_OPTIMIZED_NAME
            if fp16 and optimization_level is not None:
                # The session reads its source before writing; keep the two files apart, then drop the float16 one.
                fp16_path = tmp_dir / f".fp16.{ONNX_OPTIMIZED_NAME}"
                _convert_to_fp16(onnx_path, fp16_path)
                _optimize_graph(fp16_path, optimized_path, optimization_level, device)
                for stale in tmp_dir.glob(f"{fp16_path.name}*"):
                    stale.unlink()
            elif fp16:
                _convert_to_fp16(onnx_path, optimized_path)
            else:
                _optimize_graph(onnx_path, optimized_path, optimization_level, device)
            onnx_path = optimized_path
        timings = {"export": time.perf_counter() - start}
        max_abs_diff: dict[str, float] = {}
        if validate:
            max_abs_diff = validate_onnx(onnx_path, model.to(device), atol=atol, providers=providers)
            timings["validation"] = time.perf_counter() - start - sum(timings.values())
            if task.is_generative:
                check_onnx_generation(onnx_path, model, atol=atol, providers=providers)
                timings["generation_check"] = time.perf_counter() - start - sum(timings.values())
        final_path = output_dir / onnx_path.name
    seconds = time.perf_counter() - start
    logger.info("Exported %s to %s in %.1f s (max |Δ| %s).", model_dir, final_path, seconds, max_abs_diff)
    return ONNXExportResult(
        onnx_path=final_path,
        max_abs_diff=max_abs_diff,
        passed=True if validate else None,
        opset=opset,
        atol=atol,
        seconds=seconds,
        generation_checked=validate and task.is_generative,
        timings=timings,
    )


def _resolve_onnx_path(onnx_dir_or_path: PathLike) -> Path:
    path = Path(onnx_dir_or_path)
    if path.is_dir():
        path = path / ONNX_WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(
            f"`onnx_dir_or_path` {str(onnx_dir_or_path)!r} is neither an ONNX file nor a folder with "
            f"{ONNX_WEIGHTS_NAME}."
        )
    return path


def validate_onnx(
    onnx_dir_or_path: PathLike,
    model: Union[PreTrainedModel, PathLike],
    *,
    atol: Optional[float] = None,
    shapes: Optional[Sequence[tuple[int, int]]] = None,
    with_padding: bool = True,
    providers: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> dict[str, float]:
    """Check an ONNX file with `onnx.checker`, then compare ONNX Runtime's logits with PyTorch's.

    Fresh random inputs at each `(batch_size, size)` shape (`size` is the sequence length, or the height and width
    of an image), with padded rows when `with_padding`: two shapes other than the traced one show that the dynamic
    axes really are dynamic, and the padded rows check the attention mask. A causal LM is compared at each shape
    without and with a key/value cache, on the logits and every `present` output.

    Args:
        onnx_dir_or_path (`str` or `os.PathLike`): an ONNX file, or a folder holding `model.onnx`.
        model (`PreTrainedModel`, `str` or `os.PathLike`): the PyTorch reference, or its `save_pretrained` folder.
        atol (`float`, *optional*): largest allowed max |Δ| of the outputs; defaults to the task's `onnx_atol`.
        shapes (`Sequence[tuple[int, int]]`, *optional*): the `(batch_size, size)` pairs to compare at; defaults to
            the task's `validation_shapes`.
        with_padding (`bool`, *optional*, defaults to `True`): pad all text rows but the first.
        providers (`Sequence[str]`, *optional*): ONNX Runtime execution providers; defaults to the CPU one.
        seed (`int`, *optional*, defaults to 0): seed of the random inputs.

    Returns:
        `dict[str, float]`: max |Δ| over the outputs per shape, keyed `"{batch_size}x{size}"` (a causal LM adds
        `"{batch_size}x{size}+past{n}"` entries).

    Raises:
        `RMTKDValidationError`: when `onnx.checker` rejects the file (unreadable protobuf, malformed graph), an
            output has the wrong shape, or max |Δ| exceeds `atol` (or is not finite).
    """
    import onnx
    import onnxruntime as ort

    path = _resolve_onnx_path(onnx_dir_or_path)
    try:
        # The path form also checks models with external data and above 2 GB.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        reason = " ".join(str(error).split())  # the checker's text spans lines; keep the message on one
        raise RMTKDValidationError(
            f"`onnx.checker` rejects {str(path)!r} ({reason}); the file is damaged or the export is wrong: export again."
        ) from error
    if not isinstance(model, torch.nn.Module):
        model = load_saved_model(model)
    task = model_task(model)
    atol = task.onnx_atol if atol is None else atol
    session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
    max_abs_diff: dict[str, float] = {}
    cases = task.onnx_validation_inputs(model, shapes or task.validation_shapes, with_padding=with_padding,
                                        rng=np.random.default_rng(seed))
    for key, feed in cases:
        reference = task.onnx_reference_outputs(model, feed)
        outputs = dict(zip(reference, session.run(list(reference), feed)))
        diffs = []
        for name, expected in reference.items():
            if outputs[name].shape != expected.shape:
                raise RMTKDValidationError(
                    f"ONNX Runtime's `{name}` has shape {outputs[name].shape} at inputs {key}, PyTorch's "
                    f"{expected.shape}."
                )
            diffs.append(float(np.max(np.abs(outputs[name].astype(np.float64) - expected), initial=0.0)))
        max_abs_diff[key] = max(diffs)
    failing = {key: diff for key, diff in max_abs_diff.items() if not diff <= atol}  # NaN fails too
    if failing:
        worst = max(failing, key=lambda key: np.nan_to_num(failing[key], nan=np.inf))
        raise RMTKDValidationError(
            f"ONNX Runtime and PyTorch outputs differ by max |Δ| = {failing[worst]:.3e} at inputs {worst}, above "
            f"`atol` = {atol:.1e} (max |Δ| per shape: {max_abs_diff}); the export is wrong or `atol` is too tight."
        )
    logger.info("ONNX validation of %s passed: max |Δ| %s (atol %.1e).", path, max_abs_diff, atol)
    return max_abs_diff


def check_onnx_generation(onnx_path: PathLike, model, *, atol: float, providers: Optional[Sequence[str]] = None,
                          max_new_tokens: int = 32, seed: int = 0) -> None:
    """Greedy generation with ONNX Runtime must give PyTorch's `generate(do_sample=False)` tokens.

    Two random prompts of 8 tokens, the second left-padded by 3, so the cache, the positions and the padding mask
    are all exercised over `max_new_tokens` steps. A different token where PyTorch's top two logits lie within
    `atol` of each other is a tie that float32 round-off may break either way: a warning, not a failure.

    Raises:
        `RMTKDValidationError`: at the first step where the tokens differ without such a tie.
    """
    generation_config = model.generation_config
    eos = generation_config.eos_token_id
    pad = generation_config.pad_token_id
    pad = pad if pad is not None else (eos if isinstance(eos, int) else (eos or [0])[0])
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, model.config.vocab_size, size=(2, 8), dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    input_ids[1, :3], attention_mask[1, :3] = pad, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        output = model.generate(input_ids=torch.from_numpy(input_ids).to(device),
                                attention_mask=torch.from_numpy(attention_mask).to(device), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=pad, return_dict_in_generate=True,
                                output_logits=True)
    expected = output.sequences.cpu().numpy()
    actual = ONNXCausalLM.from_file(onnx_path, providers=providers).greedy(
        input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    if actual.shape == expected.shape and np.array_equal(actual, expected):
        return
    width = min(actual.shape[1], expected.shape[1])
    differ = np.argwhere(actual[:, :width] != expected[:, :width])
    if len(differ) == 0:
        raise RMTKDValidationError(
            f"ONNX Runtime generated {actual.shape[1] - 8} tokens where PyTorch generated {expected.shape[1] - 8}.")
    row, column = differ[np.argmin(differ[:, 1])]
    logits = output.logits[column - 8][row].float().cpu().numpy()
    gap = float(logits[expected[row, column]] - logits[actual[row, column]])
    message = (f"greedy generation differs at new token {column - 8} of prompt {row}: PyTorch {expected[row, column]},"
               f" ONNX Runtime {actual[row, column]}, PyTorch's logits of the two {gap:.2e} apart")
    if gap <= atol:
        logger.warning(f"A tie broken differently: {message}, within `atol` {atol:.1e}.")
        return
    raise RMTKDValidationError(f"ONNX Runtime and PyTorch {message}; the export is wrong.")
