"""squant's weight codes in the conventions of ONNX runtimes (DequantizeLinear, MatMulNBits).

squant stores ``w = (q + Z) / S`` per output channel (``q`` int8 codes, ``S`` the inverse step,
``Z`` an integer held in float32). ONNX's ``DequantizeLinear`` computes ``(q - zp) * s``, so the
codes map exactly with ``zp = -Z`` and ``s = fl32(1 / S)`` (DEPLOY_NOTES.md, "Mapping squant's
codes"). squant dequantizes with that same float32 step (``squant.core.step.step_size``), so the
runtime's weights equal squant's bit for bit.

For codes of at most 6 bits the zero point folds away: ``c = q + Z`` lies in ``[-63, 63]``, an
exact symmetric int8 code with ``zp = 0`` (what zero-point-0 runtimes and NPUs want), small enough
that x86's U8S8 integer kernels cannot saturate. Wider codes keep ``zp = -Z``, which needs each
channel's range to contain 0 (``Z`` then fits int8).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.errors import QuantizationError
from ..core.step import step_size
from ..core.tensor import quantize_weight

FOLD_MAX_BITS = 6  # |q + Z| <= 2**6 - 1: exact in int8 and below x86's U8S8 saturation


@dataclass(frozen=True)
class WeightCodes:
    """One layer's weight as a runtime reads it: ``w = (codes - zero_point) * scale``.

    ``codes``: int8, the weight's shape; ``axis``: its channel axis; ``scale`` (float32) and
    ``zero_point`` (int8): ``(channels,)`` per channel, or with group-wise grids 2-D over the
    channel axis and ``block_axis`` (in axis order), one per block of ``block_size`` entries
    along ``block_axis`` (the last block shorter when it does not divide the axis): ONNX's
    blocked ``DequantizeLinear`` (opset 21). ``folded``: squant's zero point was folded into the
    codes (``zero_point`` all 0); ``widened``: channels re-quantized on a range widened to
    include 0.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    bits: int
    folded: bool
    widened: int = 0
    block_axis: int | None = None
    block_size: int | None = None

    def expanded(self, values: np.ndarray) -> np.ndarray:
        """``scale`` or ``zero_point`` laid over every element of ``codes``."""
        shape = [1] * self.codes.ndim
        if self.block_size is None:
            shape[self.axis] = -1
            return values.reshape(shape)
        for index in sorted((self.axis, self.block_axis)):
            shape[index] = values.shape[sorted((self.axis, self.block_axis)).index(index)]
        blocks = np.repeat(values.reshape(shape), self.block_size, axis=self.block_axis)
        return np.take(blocks, range(self.codes.shape[self.block_axis]), axis=self.block_axis)

    def onnx_params(self) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """``(scale, zero_point, attributes)`` of the ``DequantizeLinear`` that reads ``codes``:
        per axis, or blocked (scale of ``codes``' rank, ``block_size`` along ``block_axis``)."""
        if self.block_size is None:
            return self.scale, self.zero_point, {"axis": self.axis}
        shape = list(self.codes.shape)
        shape[self.block_axis] = -(-shape[self.block_axis] // self.block_size)
        kept = [1] * self.codes.ndim
        for position, index in enumerate(sorted((self.axis, self.block_axis))):
            kept[index] = self.scale.shape[position]
        scale = np.broadcast_to(self.scale.reshape(kept), shape).copy()
        zero = np.broadcast_to(self.zero_point.reshape(kept), shape).copy()
        return scale, zero, {"axis": self.block_axis, "block_size": self.block_size}

    def transposed(self) -> WeightCodes:
        """The same codes for the weight's transpose (2-D), as exporters fold ``x @ W.T``."""
        swap = {0: 1, 1: 0}
        return replace(self, codes=self.codes.T.copy(), axis=swap[self.axis],
                       scale=self.scale.T.copy(), zero_point=self.zero_point.T.copy(),
                       block_axis=None if self.block_axis is None else swap[self.block_axis])

    def dequantize(self) -> np.ndarray:
        """The float32 weight a runtime computes."""
        zero = self.expanded(self.zero_point).astype(np.float32)
        return (self.codes.astype(np.float32) - zero) * self.expanded(self.scale)


def weight_codes(name: str, module: torch.nn.Module) -> WeightCodes:
    """The runtime form of the quantized layer ``module`` (named ``name`` in messages).

    Channels of more than 6 bits whose range excludes 0 (their zero point fits no int8) are
    re-quantized on a range widened to include 0, with a warning naming the layer.

    Raises:
        QuantizationError: a grouped ConvTranspose (its channels span two axes, which no
            ``DequantizeLinear`` holds), or a group-wise grid of more than 6 bits whose range
            excludes 0 (named).
    """
    if module.groups_of_codes != 1:
        raise QuantizationError(
            f"layer '{name}': a grouped ConvTranspose's channels span two axes, which ONNX's "
            "DequantizeLinear cannot hold")
    codes = module.codes.detach().cpu().to(torch.int16)
    zero = module.zero_point.detach().cpu().double().round().to(torch.int16)
    scale = step_size(module.scale.detach().cpu()).numpy()
    grouped = dict(zip(("block_axis", "block_size"), _blocks(name, module)))
    layout = WeightCodes(codes.numpy(), scale, zero.numpy(), module.axis, module.bits, False,
                         **grouped)
    expanded_zero = torch.from_numpy(np.ascontiguousarray(layout.expanded(zero.numpy())))
    if module.bits <= FOLD_MAX_BITS:
        return replace(layout, codes=(codes + expanded_zero).to(torch.int8).numpy(),
                       zero_point=np.zeros_like(zero.numpy(), np.int8), folded=True)
    outside = (zero < -127) | (zero > 128)
    if grouped and bool(outside.any()):
        raise QuantizationError(
            f"layer '{name}': {int(outside.sum())} group(s) have {module.bits}-bit ranges that "
            "exclude 0, which no int8 zero point holds: quantize with bits <= 6 or "
            "scheme='symmetric' for ONNX export")
    channels = torch.nonzero(outside).flatten().tolist()
    if channels:
        codes, scale, zero = _widened(name, module, channels, codes, scale, zero)
    return WeightCodes(codes.to(torch.int8).numpy(), scale, (-zero).to(torch.int8).numpy(),
                       module.axis, module.bits, False, len(channels), **grouped)


def _blocks(name: str, module: torch.nn.Module) -> tuple[int, int] | tuple[()]:
    """``(block_axis, block_size)`` of a group-wise grid in the weight's own layout (groups of
    ``group_size`` elements: whole kernels of a conv, so ``group_size / kernel size`` input
    channels), or ``()`` per channel."""
    group_size = getattr(module, "group_size", None)
    if group_size is None:
        return ()
    if module.axis != 0:
        raise QuantizationError(f"layer '{name}': group-wise grids of a transposed layout have "
                                "no DequantizeLinear form")
    kernel = int(np.prod(module.codes.shape[2:], dtype=np.int64))
    return 1, group_size // kernel


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
    scale[channels] = step_size(again.scale[index]).numpy()
    zero = zero.clone()
    zero[index] = new_zero[index]
    warnings.warn(
        f"layer '{name}': {len(channels)} channel(s) ({_some(channels)}) have "
        f"{module.bits}-bit ranges that exclude 0, which no int8 zero point holds: re-quantized "
        "with SQuant on ranges widened to include 0, from their dequantized weights (quantize "
        "with bits <= 6 or scheme='symmetric' to export them unchanged)", stacklevel=5)
    return moved.movedim(0, module.axis), scale, zero


def _some(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:5]))
    return shown + (", ..." if len(indices) > 5 else "")
