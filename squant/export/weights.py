"""squant's weight codes in the conventions of ONNX runtimes (DequantizeLinear, MatMulNBits).

squant stores ``w = (q + Z) / S`` per output channel (``q`` int8 codes, ``S`` the inverse step,
``Z`` an integer held in float32). ONNX's ``DequantizeLinear`` computes ``(q - zp) * s``, so the
codes map exactly with ``zp = -Z`` and ``s = fl32(1 / S)`` (DEPLOY_NOTES.md, "Mapping squant's
codes"); the only change is the float32 rounding of ``1 / S`` (about 1 ulp of the weight).

For codes of at most 6 bits the zero point folds away: ``c = q + Z`` lies in ``[-63, 63]``, an
exact symmetric int8 code with ``zp = 0`` (what zero-point-0 runtimes and NPUs want), small enough
that x86's U8S8 integer kernels cannot saturate. Wider codes keep ``zp = -Z``, which needs each
channel's range to contain 0 (``Z`` then fits int8).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import QuantizationError
from ..core.tensor import quantize_weight

FOLD_MAX_BITS = 6  # |q + Z| <= 2**6 - 1: exact in int8 and below x86's U8S8 saturation


@dataclass(frozen=True)
class WeightCodes:
    """One layer's weight as a runtime reads it: ``w = (codes - zero_point) * scale``
    (``widened``: how many channels were re-quantized on a range widened to include 0).

    ``codes``: int8, the weight's shape; ``scale``: float32 ``(channels,)``; ``zero_point``:
    int8 ``(channels,)``; ``axis``: the channel axis of ``codes``; ``folded``: whether squant's
    zero point was folded into the codes (``zero_point`` all 0).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    bits: int
    folded: bool
    widened: int = 0

    def dequantize(self) -> np.ndarray:
        """The float32 weight a runtime computes."""
        shape = [1] * self.codes.ndim
        shape[self.axis] = -1
        zero = self.zero_point.astype(np.float32).reshape(shape)
        return (self.codes.astype(np.float32) - zero) * self.scale.reshape(shape)


def weight_codes(name: str, module: torch.nn.Module) -> WeightCodes:
    """The runtime form of the quantized layer ``module`` (named ``name`` in messages).

    Channels of more than 6 bits whose range excludes 0 (their zero point fits no int8) are
    re-quantized on a range widened to include 0, with a warning naming the layer.

    Raises:
        QuantizationError: a layout ONNX's per-axis ``DequantizeLinear`` cannot hold (grouped
            ConvTranspose, group-wise grids).
    """
    if module.scale.dim() != 1:
        raise QuantizationError(
            f"layer '{name}': group-wise scales {tuple(module.scale.shape)} have no per-axis "
            "DequantizeLinear form")
    if module.groups_of_codes != 1:
        raise QuantizationError(
            f"layer '{name}': a grouped ConvTranspose's channels span two axes, which per-axis "
            "DequantizeLinear cannot hold")
    codes = module.codes.detach().cpu().to(torch.int16)
    scale_inv = module.scale.detach().cpu().double()
    zero = module.zero_point.detach().cpu().double().round().to(torch.int16)
    scale = (1.0 / scale_inv).float().numpy()
    shape = [1] * codes.dim()
    shape[module.axis] = -1
    if module.bits <= FOLD_MAX_BITS:
        folded = codes + zero.reshape(shape)
        return WeightCodes(folded.to(torch.int8).numpy(), scale,
                           np.zeros(len(scale), np.int8), module.axis, module.bits, True)
    outside = torch.nonzero((zero < -127) | (zero > 128)).flatten().tolist()
    if outside:
        codes, scale, zero = _widened(name, module, outside, codes, scale, zero)
    return WeightCodes(codes.to(torch.int8).numpy(), scale, (-zero).to(torch.int8).numpy(),
                       module.axis, module.bits, False, len(outside))


def _widened(name: str, module: torch.nn.Module, channels: list[int], codes: torch.Tensor,
             scale: np.ndarray, zero: torch.Tensor):
    """Re-quantize ``channels`` (whose range excludes 0) with SQuant on a range widened to
    include 0, from their dequantized weights; warn naming the layer.

    A kernel of zeros appended to every channel widens its range to include 0 without touching
    SQuant's passes: 0 lies exactly on the grid (integer ``Z``), so the added elements have no
    rounding error and are never flipped.
    """
    weight = module.dequantize_weight().detach().cpu().float().movedim(module.axis, 0)
    padded = torch.cat([weight, torch.zeros_like(weight[:, :1])], dim=1)
    again = quantize_weight(padded, module.bits, module.mode, 0, scheme=module.scheme,
                            granularity=module.granularity, range=module.range)
    new_zero = again.zero_point.double().round().to(torch.int16)
    if bool(((new_zero < -127) | (new_zero > 128))[channels].any()):
        raise QuantizationError(f"layer '{name}': channels {_some(channels)} keep a zero point "
                                "outside int8 after widening their ranges to include 0")
    index = torch.tensor(channels)
    moved = codes.movedim(module.axis, 0).clone()
    moved[index] = again.codes[:, :-1].to(torch.int16)[index]
    scale = scale.copy()
    scale[channels] = (1.0 / again.scale.double()[index]).float().numpy()
    zero = zero.clone()
    zero[index] = new_zero[index]
    warnings.warn(
        f"layer '{name}': {len(channels)} channel(s) ({_some(channels)}) have "
        f"{module.bits}-bit ranges that exclude 0, which no int8 zero point holds: re-quantized "
        "with SQuant on ranges widened to include 0, from their dequantized weights (quantize "
        "with bits <= 6 or scheme='symmetric' to export them unchanged)", stacklevel=5)
    return moved.movedim(0, module.axis), scale, zero


def matmul_nbits_weight(module: torch.nn.Module
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int] | None:
    """``com.microsoft.MatMulNBits`` inputs for a quantized Linear of at most 4 bits, one block
    per row (the smallest power of two >= max(K, 16)); None when a channel's zero point does not
    fit the container (its range excludes 0).

    Returns ``(B, scales, zero_points, block_size, container_bits)``: ``B`` uint8
    ``(N, 1, block * bits / 8)`` of unsigned codes ``u = q + 2**(bits-1)`` packed low bits first
    (padding dequantizes to 0), ``scales`` float32 ``(N,)`` = ``fl32(1 / S)``, ``zero_points``
    uint8 ``2**(bits-1) - Z`` one byte per row (onnxruntime's contrib op: the weight is
    ``(u - zero_point) * scale``). 3-bit codes use the 4-bit container.
    """
    codes = module.codes.detach().cpu().to(torch.int16).numpy()
    n, k = codes.shape
    bits = 2 if module.bits <= 2 else 4
    offset = 2 ** (bits - 1)
    zero = offset - module.zero_point.detach().cpu().double().round().numpy().astype(np.int64)
    if zero.min() < 0 or zero.max() >= 2 ** bits:
        return None
    block = max(16, 1 << (k - 1).bit_length())
    unsigned = np.full((n, block), 0, dtype=np.uint8)
    unsigned[:, :k] = codes + offset
    unsigned[:, k:] = zero[:, None]  # padding: u == zero point, weight 0
    packed = _pack(unsigned, bits).reshape(n, 1, block * bits // 8)
    zeros = np.zeros((n, 8 // bits), dtype=np.uint8)
    zeros[:, 0] = zero
    scale = (1.0 / module.scale.detach().cpu().double()).float().numpy()
    return packed, scale, _pack(zeros, bits).reshape(-1), block, bits


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Rows of ``bits``-bit unsigned values packed into bytes, the first value in the low bits."""
    per_byte = 8 // bits
    grouped = values.reshape(values.shape[0], -1, per_byte).astype(np.uint8)
    packed = np.zeros(grouped.shape[:2], dtype=np.uint8)
    for index in range(per_byte):
        packed |= grouped[:, :, index] << (bits * index)
    return packed


def _some(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:5]))
    return shown + (", ..." if len(indices) > 5 else "")
