"""squant: data-free SQuant weight quantization (Guo et al., ICLR 2022).

Weights are rounded per output channel, then flipped so that the rounding errors of every
kernel and every output channel sum to as close to zero as possible: no data, no training.
"""

from . import (
    _compat,
    _environment,  # noqa: F401  (first: it sets the process up)
    nn,
)
from ._version import __version__
from .core.errors import QuantizationError
from .core.options import ActivationOptions, QuantOptions
from .core.report import LayerReport, QuantizationReport
from .core.tensor import QuantizedTensor, quantize_weight, quantize_weights
from .export import (
    ExportReport,
    export_faithful,
    export_onnx,
    onnx_session_options,
    quantize_onnx,
)
from .io.storage import load, save
from .model import dequantize, quantize

_compat.install()

__all__ = [
    "ActivationOptions",
    "ExportReport",
    "LayerReport",
    "QuantOptions",
    "QuantizationReport",
    "QuantizationError",
    "QuantizedTensor",
    "__version__",
    "dequantize",
    "export_faithful",
    "export_onnx",
    "load",
    "nn",
    "onnx_session_options",
    "quantize",
    "quantize_onnx",
    "quantize_weight",
    "quantize_weights",
    "save",
]
