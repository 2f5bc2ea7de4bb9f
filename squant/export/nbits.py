"""squant's <= 4-bit Linear weights as onnxruntime's ``com.microsoft.MatMulNBits`` inputs.

The contrib op computes ``A @ W.T`` with ``W[n, k] = (u[n, k] - zero_point[n, b]) * scale[n, b]``
for the block ``b = k // block_size`` (onnxruntime's ContribOperators doc; DEPLOY_NOTES.md B4):
squant's ``w = (q + Z) / S`` maps exactly with ``u = q + 2**(bits-1)``, ``zero_point =
2**(bits-1) - Z``, ``scale = fl32(1 / S)``. Per channel, one block spans the row; with
group-wise grids a block is a group (``block_size = group_size``, a power of two >= 16); per
channel, blocks of up to 256 repeat the row's scale and zero point (one block spanning a padded
row would cost up to 2x the codes).
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.step import step_size


def matmul_nbits_weight(module: torch.nn.Module
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int] | None:
    """``MatMulNBits`` inputs for a quantized Linear, or None when it has no exact form: a zero
    point outside the container (a range excluding 0), or groups whose size is not a power of
    two >= 16.

    Returns ``(B, scales, zero_points, block_size, bits)``: ``B`` uint8
    ``(N, n_blocks, block_size * bits / 8)`` of unsigned codes packed low bits first (padding
    dequantizes to 0), ``scales`` float32 ``(N * n_blocks,)``, ``zero_points`` uint8 packed
    per row (``ceil(n_blocks * bits / 8)`` bytes each); 3-bit codes use the 4-bit container,
    5- to 7-bit codes the 8-bit one.
    """
    codes = module.codes.detach().cpu().to(torch.int16).numpy()
    n, k = codes.shape
    group_size = getattr(module, "group_size", None)
    if group_size is None:  # the row's scale repeated over blocks of up to 256 (exact)
        block = max(16, min(256, 1 << (k.bit_length() - 1)))
    elif group_size >= 16 and group_size & (group_size - 1) == 0:
        block = group_size
    else:
        return None
    bits = 2 if module.bits <= 2 else 4 if module.bits <= 4 else 8
    offset = 2 ** (bits - 1)
    zero_point = module.zero_point.detach().cpu().double().round().numpy().astype(np.int64)
    zero = (offset - zero_point).reshape(n, -1)
    if zero.min() < 0 or zero.max() >= 2 ** bits:
        return None
    blocks = -(-k // block)
    scale = step_size(module.scale.detach().cpu()).numpy().reshape(n, -1)
    if group_size is None:
        zero, scale = np.repeat(zero, blocks, axis=1), np.repeat(scale, blocks, axis=1)
    unsigned = np.repeat(zero, block, axis=1).astype(np.uint8)  # padding: u == zero point
    unsigned[:, :k] = codes + offset
    packed = _pack(unsigned, bits).reshape(n, blocks, block * bits // 8)
    per_byte = 8 // bits
    zeros = np.zeros((n, -(-blocks // per_byte) * per_byte), dtype=np.uint8)
    zeros[:, :blocks] = zero
    return packed, scale.reshape(-1), _pack(zeros, bits).reshape(-1), block, bits


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Rows of ``bits``-bit unsigned values packed into bytes, the first value in the low bits."""
    per_byte = 8 // bits
    grouped = values.reshape(values.shape[0], -1, per_byte).astype(np.uint8)
    packed = np.zeros(grouped.shape[:2], dtype=np.uint8)
    for index in range(per_byte):
        packed |= grouped[:, :, index] << (bits * index)
    return packed
