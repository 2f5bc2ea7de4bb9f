"""ONNX export: squant's codes as an ONNX model onnxruntime runs with integer kernels.

Needs the ``onnx`` extra (``pip install "squant[onnx]"``); nothing here imports onnx until
called.
"""

from .onnx_export import export_onnx, optimized_ops
from .onnx_quantize import quantize_onnx
from .report import ExportReport, LayerExport
from .session import export_faithful, onnx_session_options

__all__ = ["ExportReport", "LayerExport", "export_faithful", "export_onnx", "onnx_session_options",
           "optimized_ops", "quantize_onnx"]
