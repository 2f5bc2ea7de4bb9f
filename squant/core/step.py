"""The step of a grid, ``1 / scale`` in float32: what squant and the runtimes dequantize with."""

from __future__ import annotations

import torch


def step_size(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` rounded once to float32 (the reciprocal taken in float64, which rounds the
    same as a float32 division): the grid's step, the ``scale`` of ONNX ``DequantizeLinear``
    and of the runtimes that compute ``(q - zero_point) * scale``. Dequantizing with it rather
    than dividing makes squant's weights bit-identical to theirs
    (:func:`squant.core.tensor.dequantize_codes`)."""
    return (1.0 / scale.double()).float()
