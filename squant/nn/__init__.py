"""Quantized modules: one class per float layer kind, registered against that class.

``squant.nn.QuantizedLinear`` and the others are the public names. ``base`` holds what they
share and the registry, one module per layer kind holds its classes (``linear``, ``conv``,
``embedding``, ``attention``, ``recurrent``; ``multi_weight`` what layers with several weights
share), ``selection`` picks a model's layers to quantize and ``module_tree`` swaps
the quantized ones in.
Imports :mod:`squant.core` only.
"""

from .attention import QuantizedMultiheadAttention
from .base import QUANTIZED_CLASSES, QuantizedModule, register
from .conv import (
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedConv3d,
    QuantizedConvTranspose1d,
    QuantizedConvTranspose2d,
    QuantizedConvTranspose3d,
)
from .embedding import QuantizedEmbedding, QuantizedEmbeddingBag
from .linear import QuantizedLinear
from .multi_weight import QuantizedMultiWeight, QuantizedWeight
from .recurrent import QuantizedGRU, QuantizedLSTM, QuantizedRNN

__all__ = [
    "QUANTIZED_CLASSES",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedConv3d",
    "QuantizedConvTranspose1d",
    "QuantizedConvTranspose2d",
    "QuantizedConvTranspose3d",
    "QuantizedEmbedding",
    "QuantizedEmbeddingBag",
    "QuantizedGRU",
    "QuantizedLSTM",
    "QuantizedLinear",
    "QuantizedModule",
    "QuantizedMultiWeight",
    "QuantizedMultiheadAttention",
    "QuantizedRNN",
    "QuantizedWeight",
    "register",
]
