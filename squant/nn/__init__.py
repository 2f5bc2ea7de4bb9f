"""Quantized modules: one class per float layer kind, registered against that class.

``squant.nn.QuantizedLinear`` and the others are the public names; ``layers`` holds them,
``module_tree`` swaps them into a model. Imports :mod:`squant.core` only.
"""

from .layers import (
    QUANTIZED_CLASSES,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedConv3d,
    QuantizedConvTranspose1d,
    QuantizedConvTranspose2d,
    QuantizedConvTranspose3d,
    QuantizedLinear,
    QuantizedModule,
    register,
)

__all__ = [
    "QUANTIZED_CLASSES",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedConv3d",
    "QuantizedConvTranspose1d",
    "QuantizedConvTranspose2d",
    "QuantizedConvTranspose3d",
    "QuantizedLinear",
    "QuantizedModule",
    "register",
]
