"""onnxruntime's fused integer kernels, computed bit-exactly in PyTorch.

onnxruntime's CPU provider fuses ``DequantizeLinear → op → QuantizeLinear`` groups of a QDQ
file into integer kernels that round differently from a float op between fake-quantizers.
Each module here takes and returns *dequantized* float32 tensors, ``(code - zero_point) *
scale`` exactly as ``DequantizeLinear`` computes them, so it replaces a fused group inside the
faithful model's float graph. The formulas, from onnxruntime's and its MLAS library's
documented behaviour (checked value for value against onnxruntime 1.32 in
``tests/test_export_faithful.py``):

* ``QLinearConv``, ``QGemm``, ``QLinearMatMul``: integer accumulation
  ``acc = sum((x - x_zp) * (w - w_zp)) + bias_int32``, then ``y = fl32(acc) * m`` in float32
  with the float32 multiplier ``m = fl32(fl32(x_scale * w_scale[c]) / y_scale)``, rounded half
  to even, plus ``y_zp``, saturated to uint8. ``QGemm`` with a float output returns
  ``fl32(acc) * fl32(x_scale * w_scale[c])``. The sums are exact here: float64 over integer
  codes, or float32 where every partial sum stays below ``2**24``.
* ``QLinearAdd`` (x86 AVX2 kernel): ``rA = fl32(sA / sC)``, ``rB = fl32(sB / sC)``,
  ``f = fl32(zC - fma(rA, zA, fl32(rB * zB)))`` (its build contracts the sum), then per
  element ``fma(a, rA, fma(b, rB, f))`` on the raw uint8 codes, rounded half to even and
  saturated.

* ``ReduceMean`` over the trailing axes (a global average pool between a ``DequantizeLinear``
  and a ``QuantizeLinear``): float32, each row summed in Eigen's order for SSE packets of 4
  floats (from the row's first 16-byte aligned element: two packet accumulators, their sum
  reduced as ``(p0 + p2) + (p1 + p3)``, then the unaligned head and tail one by one), then
  divided by the row's length.

Weights with 8-bit codes on x86 without VNNI need ``session.x64quantprecision=1`` for
onnxruntime to compute these sums exactly (``squant.onnx_session_options`` sets it); without
it its U8S8 kernels saturate and no exact model of the file exists.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_EXACT_FLOAT32 = 2.0**24  # integers below this, and their sums below it, are exact in float32


def centered(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The codes minus zero point, ``q - zp``, of ``x = fl32((q - zp) * scale)`` (a
    ``DequantizeLinear`` output), as float64: exact for any uint8 or int8 code."""
    return torch.round(x.double() / scale)


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, zero: int, low: int, high: int,
               scale: float) -> torch.Tensor:
    """MLAS's requantization of integer sums ``acc`` (float64 holding integers), then
    ``DequantizeLinear``: ``(clamp(round_half_even(fl32(acc) * multiplier) + zero, low, high) -
    zero) * scale`` in float32."""
    y = acc.float() * multiplier
    code = torch.round(y).clamp_(low - zero, high - zero)
    return code * torch.tensor(scale, dtype=torch.float32)


def multiplier(x_scale: float, w_scale: np.ndarray, y_scale: float | None) -> np.ndarray:
    """onnxruntime's per-channel float32 output scale: ``fl32(x_scale * w_scale)``, divided by
    ``y_scale`` in float32 when the output is quantized."""
    m = np.float32(x_scale) * np.asarray(w_scale, np.float32).reshape(-1)
    return m if y_scale is None else m / np.float32(y_scale)


class _Fused(nn.Module):
    """Shared parts: the input grid, the output grid (``y_scale`` None: float output) and the
    centered weight codes and int32 bias as buffers."""

    def __init__(self, x_scale: float, weight: np.ndarray, w_zero: np.ndarray,
                 w_scale: np.ndarray, bias: np.ndarray | None, y_scale: float | None,
                 y_zero: int, y_range: tuple[int, int], channel_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.x_scale = float(x_scale)
        self.y_scale = None if y_scale is None else float(y_scale)
        self.y_zero, (self.low, self.high) = int(y_zero), y_range
        zero = np.asarray(w_zero, np.float64).reshape(-1)
        shape = [-1] + [1] * (weight.ndim - 1)
        self.register_buffer("weight", torch.from_numpy(
            weight.astype(np.float64) - zero.reshape(shape)))
        channels = weight.shape[0]
        bias = np.zeros(channels) if bias is None else np.asarray(bias, np.float64)
        self.register_buffer("bias", torch.from_numpy(bias.reshape(channel_shape)))
        self.register_buffer("multiplier", torch.from_numpy(
            np.broadcast_to(multiplier(x_scale, w_scale, y_scale), (channels,)).copy()
            .reshape(channel_shape)))
        # the largest partial sum any output can reach: below 2**24, float32 sums are exact
        span = float(self.weight.abs().flatten(1).sum(1).max()) if channels else 0.0
        self.exact_in_float32 = span * 255.0 < _EXACT_FLOAT32

    def output(self, acc: torch.Tensor) -> torch.Tensor:
        acc = acc.double() + self.bias
        if self.y_scale is None:
            return acc.float() * self.multiplier
        return requantize(acc, self.multiplier, self.y_zero, self.low, self.high, self.y_scale)


class QLinearConv(_Fused):
    """``QLinearConv`` (2-D, NCHW): see the module docstring. ``weight``: int codes
    ``(out, in/groups, kh, kw)``; ``w_zero``, ``w_scale``: per channel or one value;
    ``bias``: int32 codes or None; attributes as the ONNX ``Conv`` node's."""

    def __init__(self, x_scale, weight, w_zero, w_scale, bias, y_scale, y_zero, y_range, *,
                 strides, pads, dilations, group) -> None:
        super().__init__(x_scale, weight, w_zero, w_scale, bias, y_scale, y_zero, y_range,
                         (1, -1, 1, 1))
        self.strides, self.dilations, self.group = tuple(strides), tuple(dilations), group
        self.pads = tuple(pads)  # (top, left, bottom, right)
        self.depthwise = group == weight.shape[0] and weight.shape[1] == 1 and group > 1

        self.chunks = _exact_chunks(self.weight) if group == 1 else None
        if self.chunks is not None:
            self.register_buffer("weight32", self.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = F.pad(centered(x, self.x_scale),  # padding is the zero point: centered 0
                      (self.pads[1], self.pads[3], self.pads[0], self.pads[2]))
        if self.depthwise:
            return self.output(self._depthwise(codes))
        if self.chunks is None:
            return self.output(F.conv2d(codes, self.weight, None, self.strides, 0,
                                        self.dilations, self.group))
        # float32 over input-channel chunks whose sums stay exact (no Winograd: NNPACK off),
        # added in float64: the integer sums, at float32 speed
        codes, acc = codes.float(), None
        with torch.backends.nnpack.flags(enabled=False):
            for lo, hi in self.chunks:
                part = F.conv2d(codes[:, lo:hi], self.weight32[:, lo:hi], None, self.strides,
                                0, self.dilations).double()
                acc = part if acc is None else acc.add_(part)
        return self.output(acc)

    def _depthwise(self, codes: torch.Tensor) -> torch.Tensor:
        """A depthwise conv as a sum of shifted slices: exact, and faster than float64
        grouped convolution."""
        dtype = torch.float32 if self.exact_in_float32 else torch.float64
        codes, weight = codes.to(dtype), self.weight.to(dtype)
        kh, kw = weight.shape[2:]
        (sh, sw), (dh, dw) = self.strides, self.dilations
        height = (codes.shape[2] - dh * (kh - 1) - 1) // sh + 1
        width = (codes.shape[3] - dw * (kw - 1) - 1) // sw + 1
        acc = None
        for i in range(kh):
            for j in range(kw):
                tap = codes[:, :, i * dh:i * dh + sh * (height - 1) + 1:sh,
                            j * dw:j * dw + sw * (width - 1) + 1:sw]
                term = tap * weight[:, 0, i, j].reshape(1, -1, 1, 1)
                acc = term if acc is None else acc.add_(term)
        return acc


def _exact_chunks(weight: torch.Tensor) -> list[tuple[int, int]]:
    """Input-channel ranges ``[lo, hi)`` of ``weight`` (centered codes, ``(out, in, ...)``)
    over which any partial sum of ``x * w`` with ``|x| <= 255`` stays below ``2**24``."""
    per_input = weight.abs().flatten(2).sum(2) * 255.0  # (out, in)
    chunks, lo, total = [], 0, torch.zeros(weight.shape[0], dtype=weight.dtype)
    for i in range(weight.shape[1]):
        if i > lo and float((total + per_input[:, i]).max()) >= _EXACT_FLOAT32:
            chunks.append((lo, i))
            lo, total = i, torch.zeros_like(total)
        total += per_input[:, i]
    return [*chunks, (lo, weight.shape[1])]


class QGemm(_Fused):
    """``QGemm`` / ``QLinearMatMul`` on the last axis: ``x @ W.T`` with ``weight`` int codes
    ``(out, in)`` (see the module docstring); ``y_scale`` None gives the float output."""

    def __init__(self, x_scale, weight, w_zero, w_scale, bias, y_scale, y_zero,
                 y_range) -> None:
        super().__init__(x_scale, weight, w_zero, w_scale, bias, y_scale, y_zero, y_range,
                         (-1,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(centered(x, self.x_scale) @ self.weight.T)


class QLinearAdd(nn.Module):
    """``QLinearAdd`` of two uint8 tensors (onnxruntime's AVX2 kernel; see the module
    docstring): inputs and output dequantized."""

    def __init__(self, a: tuple[float, int], b: tuple[float, int], y: tuple[float, int],
                 y_range: tuple[int, int]) -> None:
        super().__init__()
        (sa, self.za), (sb, self.zb), (sy, self.zy) = a, b, y
        self.sa, self.sb, self.sy = float(sa), float(sb), float(sy)
        self.low, self.high = y_range
        ra, rb = np.float32(sa) / np.float32(sy), np.float32(sb) / np.float32(sy)
        # onnxruntime's build contracts ``rA * zA + rB * zB`` into fma(rA, zA, fl32(rB * zB))
        inner = np.float32(float(ra) * self.za + float(np.float32(rb * np.float32(self.zb))))
        fixed = np.float32(self.zy) - inner
        self.ra, self.rb, self.fixed = float(ra), float(rb), float(fixed)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        codes_a = centered(a, self.sa) + self.za  # the raw uint8 codes
        codes_b = centered(b, self.sb) + self.zb
        # fma: the float64 product and sum are exact, so one rounding to float32
        inner = (codes_b * self.rb + self.fixed).float().double()
        y = (codes_a * self.ra + inner).float()
        code = torch.round(y).clamp_(self.low, self.high)
        return (code - self.zy) * torch.tensor(self.sy, dtype=torch.float32)


class ReduceMean(nn.Module):
    """onnxruntime's float ``ReduceMean`` over ``axes`` (see the module docstring): exact when
    they are the trailing axes of a contiguous input (its fast path), else torch's mean."""

    _PACKET = 4  # floats per SSE packet; buffers are aligned to at least 16 bytes

    def __init__(self, axes: list[int], keepdims: bool) -> None:
        super().__init__()
        self.axes, self.keepdims = list(axes), bool(keepdims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = sorted(a % x.dim() for a in self.axes)
        if axes != list(range(x.dim() - len(axes), x.dim())) or x.dtype != torch.float32:
            return x.mean(axes, keepdim=self.keepdims)
        kept = x.shape[:x.dim() - len(axes)]
        rows = x.contiguous().reshape(-1, int(np.prod(x.shape[x.dim() - len(axes):])))
        sums = torch.empty(rows.shape[0], dtype=torch.float32)
        first = (torch.arange(rows.shape[0]) * rows.shape[1]) % self._PACKET  # row's offset
        for offset in range(self._PACKET):
            chosen = first == offset
            if bool(chosen.any()):
                sums[chosen] = self._row_sums(rows[chosen], (-offset) % self._PACKET)
        mean = sums / torch.tensor(float(rows.shape[1]), dtype=torch.float32)
        shape = [*kept, *([1] * len(axes))] if self.keepdims else list(kept)
        return mean.reshape(shape)

    def _row_sums(self, rows: torch.Tensor, start: int) -> torch.Tensor:
        """Eigen's vectorized sum of each row, its first aligned element at ``start``."""
        size, p = rows.shape[1], self._PACKET
        start = min(start, size)
        end2 = start + (size - start) // (2 * p) * 2 * p
        end = start + (size - start) // p * p
        if end == start:  # too short to vectorize: left to right
            total = rows[:, 0].clone()
            for i in range(1, size):
                total += rows[:, i]
            return total
        packet = rows[:, start:start + p].clone()
        if end - start > p:
            second = rows[:, start + p:start + 2 * p].clone()
            for i in range(start + 2 * p, end2, 2 * p):
                packet += rows[:, i:i + p]
                second += rows[:, i + p:i + 2 * p]
            packet += second
            if end > end2:
                packet += rows[:, end2:end2 + p]
        pair = packet[:, :2] + packet[:, 2:]
        total = pair[:, 0] + pair[:, 1]
        for i in [*range(start), *range(end, size)]:
            total += rows[:, i]
        return total
