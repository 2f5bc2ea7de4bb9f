"""The error statistics of ``squant quantize --report``: ``squant.core.report``'s, computed on
blocks of channels (the float64 temporaries stay small) and merged over the blocks of a tensor,
means weighted by channel count.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from ..core.report import layer_report
from ..core.tensor import QuantizedTensor

STAT_FIELDS = ("kernel_sum_eq_mean", "kernel_sum_eq_max", "kernel_sum_squant_mean",
               "kernel_sum_squant_max", "channel_sum_eq_mean", "channel_sum_eq_max",
               "channel_sum_squant_mean", "channel_sum_squant_max", "max_abs_weight_error")
_STATS_ELEMENTS = 1 << 20  # elements per block of the statistics (float64 temporaries)


def _block_stats(name: str, weight: torch.Tensor, qweight: QuantizedTensor
                 ) -> list[tuple[dict[str, float], int]]:
    """The statistics of blocks of channels of one tensor, each with its channel count."""
    axis, channels = qweight.axis, weight.shape[qweight.axis]
    step = max(1, _STATS_ELEMENTS * channels // weight.numel())
    rows = []
    for start in range(0, channels, step):
        n = min(step, channels - start)
        part = QuantizedTensor(qweight.codes.narrow(axis, start, n),
                               qweight.scale[start : start + n],
                               qweight.zero_point[start : start + n], qweight.bits, qweight.mode,
                               axis, qweight.scheme, qweight.granularity, qweight.range)
        block = weight.narrow(axis, start, n)
        rows.append((asdict(layer_report(name, "", block.shape, [block], [part], 0.0)), n))
    return rows


def _merge(rows: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    channels = sum(n for _, n in rows)
    merged = {}
    for field in STAT_FIELDS:
        if field.endswith("_max") or field.startswith("max_"):
            merged[field] = max(row[field] for row, _ in rows)
        else:
            merged[field] = sum(row[field] * n for row, n in rows) / channels
    return merged


def tensor_stats(name: str, weight: torch.Tensor, qweight: QuantizedTensor) -> dict[str, float]:
    """``squant.core.report``'s error statistics of one tensor, computed block by block."""
    return _merge(_block_stats(name, weight, qweight))


class Statistics:
    """The statistics of the tensors of a checkpoint, which may arrive in blocks of rows."""

    def __init__(self) -> None:
        self._rows: dict[str, list[tuple[dict[str, float], int]]] = {}

    def add(self, name: str, weight: torch.Tensor, qweight: QuantizedTensor) -> None:
        """Add a tensor, or a block of its output channels (blocks come in any order)."""
        self._rows.setdefault(name, []).extend(_block_stats(name, weight, qweight))

    def merged(self) -> dict[str, dict[str, float]]:
        """Each tensor's statistics, merged over its blocks."""
        return {name: _merge(rows) for name, rows in self._rows.items()}
