"""squant: data-free SQuant weight quantization (Guo et al., ICLR 2022).

Weights are rounded per output channel, then flipped so that the rounding errors of every
kernel and every output channel sum to as close to zero as possible: no data, no training.
"""

from . import (
    _environment,  # noqa: F401  (first: it sets the process up)
    nn,
)
from .errors import QuantizationError
from .model import dequantize, quantize
from .options import QuantOptions
from .report import LayerReport, QuantizationReport
from .storage import load, save
from .tensor import QuantizedTensor, quantize_weight, quantize_weights

__version__ = "0.1.0"

__all__ = [
    "LayerReport",
    "QuantOptions",
    "QuantizationReport",
    "QuantizationError",
    "QuantizedTensor",
    "__version__",
    "dequantize",
    "load",
    "nn",
    "quantize",
    "quantize_weight",
    "quantize_weights",
    "save",
]
