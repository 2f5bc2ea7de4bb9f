"""squant: data-free SQuant weight quantization (Guo et al., ICLR 2022).

Weights are rounded per output channel, then flipped so that the rounding errors of every
kernel and every output channel sum to as close to zero as possible: no data, no training.
"""

from .errors import QuantizationError
from .options import QuantOptions
from .tensor import QuantizedTensor, quantize_weight, quantize_weights

__version__ = "0.1.0"

__all__ = [
    "QuantOptions",
    "QuantizationError",
    "QuantizedTensor",
    "__version__",
    "quantize_weight",
    "quantize_weights",
]
