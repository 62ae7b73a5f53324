"""Exporters of compressed (or any saved) classifiers to deployment formats."""
from .onnx import ONNXExportResult, RMTKDValidationError, export_onnx, ort_session_options, validate_onnx

__all__ = ["ONNXExportResult", "RMTKDValidationError", "export_onnx", "ort_session_options", "validate_onnx"]
