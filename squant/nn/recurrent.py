"""The quantized recurrent layers: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``.

Every ``weight_ih_l<k>`` and ``weight_hh_l<k>`` (``_reverse`` ones too, and the projections
``weight_hr_l<k>`` of an LSTM with ``proj_size``) is quantized per row, as a Linear's weight;
biases stay float. ``forward`` is torch's own recurrent kernel, run on the dequantized weights:
the layer gathers them (its ``_flat_weights``) by name, and gathers them again whenever they
change (``.to()``, ``load_state_dict``: torch's own ``_update_flat_weights``).
"""

from torch import nn

from .base import register
from .multi_weight import QuantizedMultiWeight


class _QuantizedRNNBase(QuantizedMultiWeight):
    """What the three recurrent layers share: which weights, and gathering them again."""

    @classmethod
    def weight_names(cls, module: nn.Module) -> list[str]:
        """Every weight matrix of the layer (``weight_ih_l0``, ``weight_hh_l0_reverse``,
        ``weight_hr_l0``, ...), in torch's order."""
        return [name for name in module._flat_weights_names if name.startswith("weight_")]

    @staticmethod
    def _after_copy(module: nn.Module) -> None:
        module._init_flat_weights()


@register(nn.LSTM)
class QuantizedLSTM(_QuantizedRNNBase, nn.LSTM):
    """``nn.LSTM`` with int weight matrices."""


@register(nn.GRU)
class QuantizedGRU(_QuantizedRNNBase, nn.GRU):
    """``nn.GRU`` with int weight matrices."""


@register(nn.RNN)
class QuantizedRNN(_QuantizedRNNBase, nn.RNN):
    """``nn.RNN`` with int weight matrices."""
