"""Registered `rmtkd_<base>` model types: stock modeling code whose layers take per-layer widths.

Saved with `output_format="per-layer"`. They load with the `AutoModelFor*` classes after `import optimum_rmtkd`,
or with `trust_remote_code=True` through the `auto_map` written beside the weights.
"""
from .per_layer import PER_LAYER_TYPES, per_layer_classes_for, register_per_layer_types

register_per_layer_types()

__all__ = ["PER_LAYER_TYPES", "per_layer_classes_for", "register_per_layer_types"]
