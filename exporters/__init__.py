"""ONNX export and ONNX Runtime inspection (installed as ``ditq_compiler.exporters``)."""

from .onnx_export import export_onnx, save_onnx
from .ort_inspect import FUSED_INT8_OPS, FusionReport, fusion_report, optimized_model

__all__ = ["export_onnx", "save_onnx", "FUSED_INT8_OPS", "FusionReport", "fusion_report", "optimized_model"]
