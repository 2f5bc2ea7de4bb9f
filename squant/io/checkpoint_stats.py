"""The error statistics of ``squant quantize --report``: the ones of ``squant.core.report``
(per kernel and per channel, ``|sum of (code - x)|`` with plain rounding and after SQuant's
flips, and the largest weight error), computed in one numba pass over each block of channels
(``squant.kernels.error_stats``: the same values up to float64 rounding, the largest weight
error exactly), and merged over the blocks (which may come from row blocks of one tensor).
"""

from __future__ import annotations

import numpy as np
import torch

from ..core import batch
from ..core.report import channel_parts
from ..core.tensor import QuantizedTensor
from ..kernels.constants import STAT_COUNT, error_stats_scratch

STAT_FIELDS = ("kernel_sum_eq_mean", "kernel_sum_eq_max", "kernel_sum_squant_mean",
               "kernel_sum_squant_max", "channel_sum_eq_mean", "channel_sum_eq_max",
               "channel_sum_squant_mean", "channel_sum_squant_max", "max_abs_weight_error")
# Elements per block of channels: bounds the float32 copy of a weight stored in another dtype,
# and is the unit of work of the threads.
_STATS_ELEMENTS = 1 << 20


class _Totals:
    """The kernels' accumulated statistics (``kernels.constants.STAT_COUNT`` float64) and the counts
    of kernels and channels they are over."""

    def __init__(self) -> None:
        self.values = np.zeros(STAT_COUNT)
        self.kernels = 0
        self.channels = 0

    def fields(self) -> dict[str, float]:
        sums, largest, weight_error = self.values[:4], self.values[4:8], self.values[8]
        counts = (self.kernels, self.kernels, self.channels, self.channels)
        out = {}
        for i, what in enumerate(("kernel_sum_eq", "kernel_sum_squant", "channel_sum_eq",
                                  "channel_sum_squant")):
            out[f"{what}_mean"] = float(sums[i]) / counts[i]
            out[f"{what}_max"] = float(largest[i])
        out["max_abs_weight_error"] = float(weight_error)
        return {field: out[field] for field in STAT_FIELDS}


def _add(totals: _Totals, weight: torch.Tensor, qweight: QuantizedTensor) -> None:
    """Add a tensor (or block of output channels) with one grid per channel, in blocks of
    channels on squant's threads (each range of blocks into its own accumulator)."""
    t_min, t_max = qweight.code_range
    w = weight.detach().movedim(qweight.axis, 0)
    codes = qweight.codes.movedim(qweight.axis, 0)
    channels = w.shape[0]
    kernel = int(np.prod(w.shape[2:], dtype=np.int64))
    scale = qweight.scale.float().contiguous().numpy()
    zero = qweight.zero_point.float().contiguous().numpy()
    step = max(1, _STATS_ELEMENTS * channels // max(1, w.numel()))
    starts = list(range(0, channels, step))
    partial = []
    add_error_stats = batch.kernel("add_error_stats")

    def task(first: int, last: int) -> None:
        out = np.zeros(STAT_COUNT)
        scratch = np.empty(error_stats_scratch(step, w.shape[1], kernel))
        for start in starts[first:last]:
            stop = min(start + step, channels)
            shape = (stop - start, w.shape[1], kernel)
            block = w[start:stop].float().reshape(shape).contiguous().numpy()
            block_codes = codes[start:stop].reshape(shape).contiguous().numpy()
            add_error_stats(block, block_codes, scale[start:stop], zero[start:stop], t_min,
                            t_max, out, scratch)
        partial.append(out)  # list.append is atomic under the GIL

    batch.run_in_threads(task, len(starts), w.numel())
    for out in partial:
        totals.values[:4] += out[:4]
        totals.values[4:] = np.maximum(totals.values[4:], out[4:])
    totals.kernels += channels * w.shape[1]
    totals.channels += channels


def _add_parts(totals: _Totals, weight: torch.Tensor, qweight: QuantizedTensor) -> None:
    """Add a tensor; with group-wise grids each group counts as a channel."""
    for part_weight, part in channel_parts(weight, qweight):
        _add(totals, part_weight, part)


def tensor_stats(name: str, weight: torch.Tensor, qweight: QuantizedTensor) -> dict[str, float]:
    """``squant.core.report``'s error statistics of one tensor ``name``."""
    totals = _Totals()
    _add_parts(totals, weight, qweight)
    return totals.fields()


class Statistics:
    """The statistics of the tensors of a checkpoint, which may arrive in blocks of rows."""

    def __init__(self) -> None:
        self._totals: dict[str, _Totals] = {}

    def add(self, name: str, weight: torch.Tensor, qweight: QuantizedTensor) -> None:
        """Add a tensor, or a block of its output channels (blocks come in any order)."""
        _add_parts(self._totals.setdefault(name, _Totals()), weight, qweight)

    def merged(self) -> dict[str, dict[str, float]]:
        """Each tensor's statistics, merged over its blocks."""
        return {name: totals.fields() for name, totals in self._totals.items()}
