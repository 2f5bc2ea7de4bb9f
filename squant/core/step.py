"""The step of a grid, ``1 / scale`` in float32: what squant and the runtimes dequantize with."""

from __future__ import annotations

import torch


def step_size(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` rounded once to float32 (a float32 division, correctly rounded on CPU and
    CUDA as IEEE 754 requires): the grid's step, the ``scale`` of ONNX ``DequantizeLinear`` and
    of the runtimes that compute ``(q - zero_point) * scale``. Dequantizing with it rather than
    dividing by ``scale`` makes squant's weights bit-identical to theirs
    (:func:`squant.core.tensor.dequantize_codes`)."""
    return torch.reciprocal(scale.float())
