"""The quantized ``nn.Linear``."""

from torch import nn

from .base import QuantizedModule, register


@register(nn.Linear)
class QuantizedLinear(QuantizedModule, nn.Linear):
    """``nn.Linear`` with an int weight."""
