"""Group-wise grids: where each group of a weight lies, and how its scale and zero point apply.

With ``group_size=g`` a weight viewed as ``(O, I, K)`` (output channels, inputs, kernel) has each
output channel's ``n = I * K`` elements cut into ``ceil(n / g)`` groups of ``g`` consecutive
elements (whole kernels: ``g`` is a multiple of ``K``), the last one shorter when ``g`` does not
divide ``n``. Each group is a "channel" for the kernels: its own grid, EQ, KQ over its kernels and
CQ over the group. Scale and zero point are laid out ``(O, n_groups)``.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import QuantizationError
from .step import step_size


def group_count(size: int, group_size: int | None) -> int:
    """Groups of ``group_size`` elements in a channel of ``size`` (1 per channel for None)."""
    if group_size is None:
        return 1
    return -(-size // group_size)


def check_whole_kernels(group_size: int | None, ksize: int, name: str) -> None:
    """Raise ``QuantizationError`` naming the weight if ``group_size`` is not a multiple of its
    kernel size ``ksize`` (groups hold whole kernels, so that KQ sees each kernel whole)."""
    if group_size is not None and group_size % ksize:
        raise QuantizationError(
            f"{name}: group_size {group_size} is not a multiple of its kernel size {ksize}; "
            f"groups hold whole kernels: use a multiple of {ksize}, or give this layer its own "
            "group_size through layer_options")


def group_rows(channels: int, size: int, ksize: int, group_size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """For a weight ``(channels, size // ksize, ksize)``: each group's first element (its offset
    in the weight, in elements) and its number of kernels, both int64 ``(channels * n_groups,)``,
    channel by channel, groups in order."""
    count = group_count(size, group_size)
    starts = np.arange(count, dtype=np.int64) * group_size
    lengths = np.minimum(group_size, size - starts) // ksize
    offsets = (np.arange(channels, dtype=np.int64)[:, None] * size + starts).reshape(-1)
    return offsets, np.tile(lengths, channels)


def group_moments(moments: np.ndarray, inputs: int, kernels_per_group: int) -> np.ndarray:
    """Input moments ``(G, 2, I)`` (variances, means) rearranged per group: ``(G, 2 * I)`` in which
    group ``j`` (inputs ``j*m .. j*m + len_j - 1``, ``m = kernels_per_group``) holds its ``len_j``
    variances then its ``len_j`` means from ``2 * j * m`` on: the layout the kernels read a
    channel's moments in."""
    c = np.arange(inputs, dtype=np.int64)
    group = c // kernels_per_group
    start = 2 * group * kernels_per_group
    length = np.minimum(kernels_per_group, inputs - group * kernels_per_group)
    within = c - group * kernels_per_group
    out = np.empty((moments.shape[0], 2 * inputs), np.float64)
    out[:, start + within] = moments[:, 0]
    out[:, start + length + within] = moments[:, 1]
    return out


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      axis: int, groups: int, group_size: int) -> torch.Tensor:
    """``(codes + zero_point) * fl32(1 / scale)`` in float32 for a grouped grid: ``scale`` and
    ``zero_point`` hold ``(groups * shape[axis], n_groups)`` values, the groups running along each
    output channel's elements (inputs, then kernel positions) in C order. The same float32
    addition and multiplication by the step as per channel
    (:func:`squant.core.tensor.dequantize_codes`), so both give the same bits for the same
    grid."""
    # A copy of our own (codes are integers): the arithmetic below may work in place on it.
    blocks = codes.to(torch.float32, copy=True).reshape(groups, -1, *codes.shape[1:])
    moved = blocks.movedim(axis + 1, 1)
    flat = moved.reshape(moved.shape[0], moved.shape[1], -1)  # (blocks, channels, n)
    size = flat.shape[2]
    count = group_count(size, group_size)
    step = step_size(scale).reshape(flat.shape[0], flat.shape[1], count)
    zero_point = zero_point.float().reshape(flat.shape[0], flat.shape[1], count)
    whole = size // group_size
    parts = []
    if whole:
        full = flat[..., : whole * group_size].reshape(*flat.shape[:2], whole, group_size)
        shared = full.untyped_storage().data_ptr() == blocks.untyped_storage().data_ptr()
        if whole == count and shared:
            # Every group whole and ``full`` a view of our copy: the same two operations in
            # place (the same bits), without two more weight-sized tensors.
            full.add_(zero_point[..., None]).mul_(step[..., None])
            return blocks.reshape(codes.shape)
        parts.append(((full + zero_point[..., :whole, None]) * step[..., :whole, None])
                     .reshape(*flat.shape[:2], -1))
    if whole < count:
        tail = flat[..., whole * group_size :]
        parts.append((tail + zero_point[..., whole:]) * step[..., whole:])
    weight = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return weight.reshape(moved.shape).movedim(1, axis + 1).reshape(codes.shape)
