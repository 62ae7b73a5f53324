"""Availability checks for optional packages, and the one error message that names the extra to install."""
from __future__ import annotations

import importlib.util
from typing import Optional


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


def require(module: str, feature: str, extra: Optional[str] = None) -> None:
    """Raise an `ImportError` naming what to install when `module` is missing: the extra that provides it, or the
    package itself for a required dependency that was removed."""
    if not _is_available(module):
        target = f"optimum-rmtkd[{extra}]" if extra else module
        raise ImportError(f"`{feature}` needs `{module}`: install it with `pip install {target}`.")
