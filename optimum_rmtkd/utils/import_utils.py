"""Availability checks for optional packages, and the one error message that names the extra to install."""
from __future__ import annotations

import importlib.util


def _is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def is_onnxruntime_available() -> bool:
    return _is_available("onnxruntime")


def is_onnx_available() -> bool:
    return _is_available("onnx")


def is_matplotlib_available() -> bool:
    return _is_available("matplotlib")


def is_pynvml_available() -> bool:
    return _is_available("pynvml")


def require(module: str, feature: str, extra: str) -> None:
    """Raise an `ImportError` naming the extra that provides `module` when it is not installed."""
    if not _is_available(module):
        raise ImportError(
            f"`{feature}` needs `{module}`: install it with `pip install optimum-rmtkd[{extra}]`."
        )
