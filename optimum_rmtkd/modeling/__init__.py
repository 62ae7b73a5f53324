"""Registered `rmtkd_<base>` model types: stock modeling code whose layers take per-layer widths.

Saved with `output_format="per-layer"`. They load with the `AutoModelFor*` classes once this module is imported
(`import optimum_rmtkd.modeling`; `import optimum_rmtkd` does it when transformers is already imported, and the
compressor, saving and the exporter import it), or with `trust_remote_code=True` through the `auto_map` written
beside the weights. Importing this module imports transformers and torch.
"""
from .per_layer import PER_LAYER_TYPES, per_layer_classes_for, register_per_layer_types

register_per_layer_types()

__all__ = ["PER_LAYER_TYPES", "per_layer_classes_for", "register_per_layer_types"]
