"""The quantized convolutions: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``."""

from torch import nn

from .base import QuantizedModule, register


@register(nn.Conv1d)
class QuantizedConv1d(QuantizedModule, nn.Conv1d):
    """``nn.Conv1d`` with an int weight."""


@register(nn.Conv2d)
class QuantizedConv2d(QuantizedModule, nn.Conv2d):
    """``nn.Conv2d`` with an int weight."""


@register(nn.Conv3d)
class QuantizedConv3d(QuantizedModule, nn.Conv3d):
    """``nn.Conv3d`` with an int weight."""


class _QuantizedConvTranspose(QuantizedModule):
    """ConvTranspose weights are ``(in, out/groups, *kernel)``: output channels on axis 1, and
    with groups each group's block has its own ``out/groups`` channels. ``scale`` and
    ``zero_point`` list all ``out`` channels, group by group."""

    @property
    def groups_of_codes(self) -> int:
        return self.groups


@register(nn.ConvTranspose1d)
class QuantizedConvTranspose1d(_QuantizedConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with an int weight."""


@register(nn.ConvTranspose2d)
class QuantizedConvTranspose2d(_QuantizedConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with an int weight."""


@register(nn.ConvTranspose3d)
class QuantizedConvTranspose3d(_QuantizedConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with an int weight."""
