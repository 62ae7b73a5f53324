"""optimum-rmtkd: Random-Matrix-Theory guided knowledge distillation (RMT-KD) for Hugging Face models.

Importing the package is light: it loads neither torch, transformers nor scipy, so `optimum-cli` (which imports
every plugin's register module for every command) and `rmtkd --help` start fast. The public names below are
imported on first use.

Per-layer model types: the `rmtkd_<base>` types (`output_format="per-layer"`) are registered with transformers'
Auto classes by importing `optimum_rmtkd.modeling`, which every module that builds or saves models does (the
compressor, saving, the exporter). `import optimum_rmtkd` registers them too when transformers is already imported
(then it costs little), so the usual order works:

>>> from transformers import AutoModelForSequenceClassification
>>> import optimum_rmtkd  # registers the rmtkd_<base> types, transformers being loaded
>>> model = AutoModelForSequenceClassification.from_pretrained("bert-rmtkd-per-layer")

When `optimum_rmtkd` is imported first, `import optimum_rmtkd.modeling` is the explicit route. The heavy optional
dependencies (onnxruntime, NVML, matplotlib) are only imported by the functions that need them.
"""
import sys
from typing import TYPE_CHECKING

from .version import __version__

if TYPE_CHECKING:
    from .compressor import RMTKDCompressor, RMTKDResult
    from .configuration import RMTKDConfig

if "transformers" in sys.modules:
    from . import modeling  # noqa: F401  (registers the rmtkd_<base> per-layer types with the Auto classes)

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
