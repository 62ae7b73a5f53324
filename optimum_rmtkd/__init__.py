"""optimum-rmtkd: Random-Matrix-Theory guided knowledge distillation (RMT-KD) for Hugging Face models.

Importing the package registers the per-layer model types with transformers' Auto classes; the heavy optional
dependencies (onnxruntime, NVML, matplotlib) are only imported by the functions that need them.
"""
from typing import TYPE_CHECKING

from . import modeling  # noqa: F401  (registers the rmtkd_<base> per-layer types with the Auto classes)
from .version import __version__

if TYPE_CHECKING:
    from .compressor import RMTKDCompressor, RMTKDResult
    from .configuration import RMTKDConfig

__all__ = ["RMTKDConfig", "RMTKDCompressor", "RMTKDResult", "__version__"]


def __getattr__(name: str):
    # Lazy public names keep `import optimum_rmtkd` light for the CLI's register module.
    if name == "RMTKDConfig":
        from .configuration import RMTKDConfig

        return RMTKDConfig
    if name in ("RMTKDCompressor", "RMTKDResult"):
        from . import compressor

        return getattr(compressor, name)
    raise AttributeError(f"module 'optimum_rmtkd' has no attribute {name!r}")
