"""ONNX Runtime sessions of exported files: the file name they open and the session options to serve them with.

The options are ONNX Runtime's defaults less the graph rewrites measured to slow a device down; the exporter's ahead
of time optimisation, the benchmark and the generation driver all open sessions with them.
"""
from __future__ import annotations

from typing import Optional, Sequence

ONNX_WEIGHTS_NAME = "model.onnx"
DEVICES = ("cpu", "cuda")
# ONNX Runtime graph rewrites left off on the CPU execution provider because the fused kernel is slower than the ops
# it replaces. `SkipLayerNormFusion`: ORT's CPU `SkipLayerNormalization` kernel ran 3.4-5x slower than the Add, Add,
# LayerNormalization it fuses (ORT 1.32, AVX-512 Xeon, 4096 rows of 192 or 384, 1 or 2 threads), 11-17% of a BERT
# forward; leaving it off made the original MiniLM 5% and the compressed one 11% faster at batch 32 x 128 tokens.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def check_device_name(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"`device` must be one of {DEVICES}, got {device!r}.")


def check_optimizer_names(names: Sequence[str]) -> list[str]:
    """`names` as a list, after checking that they can be ONNX Runtime graph transformer names."""
    if isinstance(names, str) or any(not isinstance(name, str) or not name or ";" in name for name in names):
        raise ValueError(
            f"Disabled optimizers must be a sequence of ONNX Runtime graph transformer names such as "
            f"['SkipLayerNormFusion'], got {names!r}."
        )
    return list(names)


def default_disabled_optimizers(device: str) -> tuple[str, ...]:
    """The ONNX Runtime rewrites `ort_session_options` leaves off on `device` unless told otherwise."""
    return CPU_DISABLED_OPTIMIZERS if device == "cpu" else ()


def ort_session_options(device: str = "cpu", disabled_optimizers: Optional[Sequence[str]] = None):
    """ONNX Runtime's default session options, less the graph rewrites known to slow `device` down.

    Hand them to whatever runs the exported file: `onnxruntime.InferenceSession(path, ort_session_options())`, or
    the `session_options` argument of optimum's ONNX Runtime model classes. The benchmark and the
    `optimization_level` export use the same, so their figures are what such a session gets.

    Args:
        device (`str`, *optional*, defaults to `"cpu"`): `"cpu"` or `"cuda"`, the execution provider the session
            will run on.
        disabled_optimizers (`Sequence[str]`, *optional*): ONNX Runtime graph transformers to leave off, by name;
            `None` means `CPU_DISABLED_OPTIMIZERS` on CPU and none on CUDA, `()` ONNX Runtime's stock behaviour.

    Returns:
        `onnxruntime.SessionOptions`
    """
    import onnxruntime as ort

    check_device_name(device)  # only the name: options for a GPU can be built on a machine without one
    names = check_optimizer_names(default_disabled_optimizers(device) if disabled_optimizers is None
                                  else disabled_optimizers)
    options = ort.SessionOptions()
    if names:
        options.add_session_config_entry("optimization.disable_specified_optimizers", ";".join(names))
    return options
