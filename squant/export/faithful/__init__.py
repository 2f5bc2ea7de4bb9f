"""The PyTorch model of a QDQ file written by ``squant.export_onnx``: torch's graph of the
float model, with onnxruntime's quantizers and fused integer kernels computed bit-exactly."""

from .simulate import bias_offsets, simulate

__all__ = ["bias_offsets", "simulate"]
