"""Architecture adapters. Importing this package registers every built-in adapter."""
from .base import Adapter, CapturePoint, Site, get_adapter, register_adapter, supported_model_types
from . import bert, distilbert, llama, resnet, roberta  # noqa: F401  (registration side effect)

__all__ = ["Adapter", "CapturePoint", "Site", "get_adapter", "register_adapter", "supported_model_types"]
