"""Per-layer error statistics of a quantization, as an aligned table and as JSON.

For each layer: how far the rounding errors of each kernel and each output channel sum from
zero with plain rounding (EQ) and after SQuant's flips, and the largest weight error. With
group-wise grids a "channel" is a group: the one whose sum CQ drives to zero.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .groups import group_count
from .tensor import QuantizedTensor


def channel_parts(weight: torch.Tensor, qweight: QuantizedTensor
                  ) -> list[tuple[torch.Tensor, QuantizedTensor]]:
    """The weight and its quantized tensor as parts with one grid per output channel: itself if
    it has no ``group_size``; else each group as a channel, ``(channels, kernels, kernel)`` on
    axis 0: the whole groups as one part, the shorter last groups (if any) as another."""
    if qweight.group_size is None:
        return [(weight, qweight)]
    w = weight.detach().movedim(qweight.axis, 0)
    codes = qweight.codes.movedim(qweight.axis, 0)
    channels, ksize = w.shape[0], int(np.prod(w.shape[2:], dtype=np.int64))
    w, codes = w.reshape(channels, -1), codes.reshape(channels, -1)
    size, g = w.shape[1], qweight.group_size
    whole, count = size // g, group_count(size, g)
    scale = qweight.scale.reshape(channels, count)
    zero = qweight.zero_point.reshape(channels, count)
    parts = []
    for first, last, length in ((0, whole, g), (whole, count, size - whole * g)):
        if first == last:
            continue
        columns = slice(first * g, first * g + (last - first) * length)
        shape = (channels * (last - first), length // ksize, ksize)
        part = QuantizedTensor(codes[:, columns].reshape(shape),
                               scale[:, first:last].reshape(-1),
                               zero[:, first:last].reshape(-1), qweight.bits, qweight.mode, 0,
                               qweight.scheme, qweight.granularity, qweight.range)
        parts.append((w[:, columns].reshape(shape), part))
    return parts


@dataclass(frozen=True)
class LayerReport:
    """Statistics of one quantized weight. ``*_sum`` fields are ``|sum of (code - x)|`` over
    a kernel or a channel, with ``x`` the weight on the integer grid; ``eq`` is before the
    flips (round to nearest), ``squant`` after. ``act_*``: the layer's input quantization
    (bits, range, and the method that found the range: ``"paper"``, ``"bn"``, ``"minmax"``,
    ``"ema"``, ``"kl"``, ``"percentile"`` or ``"mse"``), None when its input stays float."""

    name: str
    kind: str
    shape: tuple[int, ...]
    bits: int
    mode: str
    kernel_sum_eq_mean: float
    kernel_sum_eq_max: float
    kernel_sum_squant_mean: float
    kernel_sum_squant_max: float
    channel_sum_eq_mean: float
    channel_sum_eq_max: float
    channel_sum_squant_mean: float
    channel_sum_squant_max: float
    max_abs_weight_error: float
    seconds: float
    act_bits: int | None = None
    act_lo: float | None = None
    act_hi: float | None = None
    act_method: str | None = None


def layer_report(name: str, kind: str, shape: torch.Size, blocks: list[torch.Tensor],
                 parts: list[QuantizedTensor], seconds: float,
                 module: nn.Module | None = None) -> LayerReport:
    """Statistics of a weight quantized as ``blocks`` (one per ConvTranspose group), with the
    activation quantization of the quantized ``module`` using it (if any)."""
    kernel_eq, kernel_sq, channel_eq, channel_sq, max_error = [], [], [], [], 0.0
    pairs = [pair for block, q in zip(blocks, parts) for pair in channel_parts(block, q)]
    for block, q in pairs:
        w = np.moveaxis(block.detach().cpu().float().numpy(), q.axis, 0)
        w = w.reshape(w.shape[0], w.shape[1], -1)
        scale = q.scale.numpy()[:, None, None]
        zero = q.zero_point.numpy()[:, None, None]
        codes = np.moveaxis(q.codes.numpy(), q.axis, 0).reshape(w.shape).astype(np.float64)
        x = (scale * w - zero).astype(np.float32).astype(np.float64)
        rounded = np.clip(np.rint(x), *q.code_range)
        kernel_eq.append(np.abs((rounded - x).sum(axis=2)).ravel())
        kernel_sq.append(np.abs((codes - x).sum(axis=2)).ravel())
        channel_eq.append(np.abs((rounded - x).sum(axis=(1, 2))))
        channel_sq.append(np.abs((codes - x).sum(axis=(1, 2))))
        dequantized = (codes + zero) / scale
        max_error = max(max_error, float(np.abs(dequantized - w).max()))
    stats = [f(np.concatenate(v)) for v in (kernel_eq, kernel_sq, channel_eq, channel_sq)
             for f in (np.mean, np.max)]
    act = ((int(module.act_bits), float(module.act_lo), float(module.act_hi),
            getattr(module, "act_range_method", None))
           if getattr(module, "act_enabled", False) else (None, None, None, None))
    return LayerReport(name, kind, tuple(shape), parts[0].bits, parts[0].mode,
                       *(float(s) for s in stats), max_error, seconds, *act)


@dataclass(frozen=True)
class QuantizationReport:
    """The per-layer statistics of one ``squant.quantize`` call and its total time.

    ``seconds`` is the batched quantization of all layers together; each layer's ``seconds``
    is that layer quantized alone (measured again for the report). ``left_float``: the
    floating tensors of 2 or more dims that stay float, as ``(name, reason)`` pairs.
    """

    layers: list[LayerReport]
    seconds: float
    left_float: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain data, ready for ``json.dump``."""
        return {"seconds": self.seconds, "layers": [asdict(layer) for layer in self.layers],
                "left_float": [{"name": name, "reason": reason}
                               for name, reason in self.left_float]}

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """An aligned text table, one row per layer."""
        header = ("layer", "kind", "shape", "bits", "mode", "kernel |sum| EQ mean/max",
                  "SQuant mean/max", "channel |sum| EQ mean/max", "SQuant mean/max",
                  "max |W-Q|", "ms", "input")
        rows = [header]
        for r in self.layers:
            rows.append((r.name, r.kind, "x".join(map(str, r.shape)), str(r.bits), r.mode,
                         f"{r.kernel_sum_eq_mean:.3f}/{r.kernel_sum_eq_max:.3f}",
                         f"{r.kernel_sum_squant_mean:.3f}/{r.kernel_sum_squant_max:.3f}",
                         f"{r.channel_sum_eq_mean:.2f}/{r.channel_sum_eq_max:.2f}",
                         f"{r.channel_sum_squant_mean:.2f}/{r.channel_sum_squant_max:.2f}",
                         f"{r.max_abs_weight_error:.3g}", f"{r.seconds * 1e3:.2f}",
                         _input_cell(r)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"{len(self.layers)} layers quantized in {self.seconds * 1e3:.1f} ms "
                     "(one batched call)")
        lines += [f"left in float: {name} ({reason})" for name, reason in self.left_float]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _input_cell(row: LayerReport) -> str:
    """``"A4 [0, 1.23] kl"`` for a quantized input (with the range's method), ``"float"``
    otherwise."""
    if row.act_bits is None:
        return "float"
    method = f" {row.act_method}" if row.act_method else ""
    return f"A{row.act_bits} [{row.act_lo:.3g}, {row.act_hi:.3g}]{method}"
