"""``bias_correction=True``: remove the mean output shift that quantizing a weight causes.

A layer computes ``W x + b``; quantized, ``Q x + b``. Its output moves by ``(W - Q) x``, whose
mean for output channel ``o`` is ``sum_c mean_c * sum_k (W - Q)[o, c, k]`` when input channel
``c`` has mean ``mean_c`` at every kernel position. SQuant keeps each kernel's error sum within
about half a step, but behind a ReLU the inputs' means are large and positive, so what is left
still shifts every output channel, and the shifts add up layer after layer. Adding the shift to
the bias removes it, without data: the means come from the BatchNorms before the layer
(:func:`squant.ranges.batchnorm.bn_input_moments`), as in Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction" (ICCV 2019). Zero padding is ignored: border
outputs, which see fewer inputs, get the interior's correction.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import QuantizedModule


def expected_shift(weight: torch.Tensor, dequantized: torch.Tensor, mean: torch.Tensor,
                   groups: int) -> torch.Tensor:
    """Per output channel, the mean of ``(weight - dequantized) @ x`` (float64) for inputs
    whose channel ``c`` has mean ``mean[c]``; ``weight`` is ``(O, in/groups, *kernel)``."""
    out, inner = weight.shape[0], weight.shape[1]
    error = (weight.double() - dequantized.double()).reshape(out, inner, -1).sum(-1)
    means = mean.double().reshape(groups, inner).repeat_interleave(out // groups, dim=0)
    return (error * means).sum(1)


def correct_bias(qmodule: QuantizedModule, weight: torch.Tensor, mean: torch.Tensor) -> None:
    """Give ``qmodule`` (quantized from the float ``weight``) the bias plus the expected shift
    of its output, as a new Parameter (a bias-free layer gets one)."""
    shift = expected_shift(weight.detach().cpu(), qmodule.dequantize_weight().cpu(), mean,
                           getattr(qmodule, "groups", 1))
    bias = qmodule.bias
    dtype = qmodule.weight_dtype if bias is None else bias.dtype
    base = torch.zeros_like(shift) if bias is None else bias.detach().double().cpu()
    qmodule.bias = nn.Parameter((base + shift).to(device=qmodule.codes.device, dtype=dtype),
                                requires_grad=bias is None or bias.requires_grad)
