"""The error statistics of ``squant quantize --report``: the ones of ``squant.core.report``
(per kernel and per channel, ``|sum of (code - x)|`` with plain rounding and after SQuant's
flips, and the largest weight error), computed in blocks of channels with few passes over the
data, and merged over the blocks (which may come from row blocks of one tensor).

``x = scale * w - zero_point`` is evaluated in float32 as ``squant.core.report`` does. A kernel's
sums are taken as ``sum(codes) - sum(x)`` and ``sum(round(x) - x)``, with ``sum(x)`` in
float64 (``codes`` and ``round(x)`` are integers, summed exactly), or for one-element kernels
as the differences (``round(x) - x`` is exact in float32): the same values as the report's
float64 sums of the differences up to float64 rounding. The largest weight error
``|(codes + zero_point) / scale - w|`` is bounded per channel in float32 on the grid and
evaluated in float64 on the few channels that can hold it, so it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.report import channel_parts
from ..core.tensor import QuantizedTensor

STAT_FIELDS = ("kernel_sum_eq_mean", "kernel_sum_eq_max", "kernel_sum_squant_mean",
               "kernel_sum_squant_max", "channel_sum_eq_mean", "channel_sum_eq_max",
               "channel_sum_squant_mean", "channel_sum_squant_max", "max_abs_weight_error")
_STATS_ELEMENTS = 1 << 18  # elements per block: its float32 temporaries stay in the cache
_SUMS = ("kernel_sum_eq", "kernel_sum_squant", "channel_sum_eq", "channel_sum_squant")


class _Workspace:
    """Buffers for the blocks, reused from block to block and tensor to tensor (fresh ones
    cost a page fault per 4 kB)."""

    def __init__(self) -> None:
        self._narrow = torch.empty(0)
        self._wide = torch.empty(0, dtype=torch.float64)

    def buffers(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two float32 tensors and a float64 one, of ``shape`` (overwritten by the next
        call)."""
        count = shape.numel()
        if self._wide.numel() < count:
            self._narrow = torch.empty(2 * count)
            self._wide = torch.empty(count, dtype=torch.float64)
        return (self._narrow[:count].view(shape), self._narrow[count : 2 * count].view(shape),
                self._wide[:count].view(shape))


@dataclass
class _Totals:
    """Sums and maxima of the absolute sums, and the counts they are over."""

    kernels: int = 0
    channels: int = 0
    max_abs_weight_error: float = 0.0

    def __post_init__(self) -> None:
        self.total = dict.fromkeys(_SUMS, 0.0)
        self.largest = dict.fromkeys(_SUMS, 0.0)

    def add(self, what: str, sums: torch.Tensor) -> None:
        """Add signed sums (overwritten by their absolute values)."""
        sums = sums.abs_()
        self.total[what] += float(sums.sum(dtype=torch.float64))
        self.largest[what] = max(self.largest[what], float(sums.max()))

    def fields(self) -> dict[str, float]:
        out = {}
        for what in _SUMS:
            count = self.kernels if what.startswith("kernel") else self.channels
            out[f"{what}_mean"] = self.total[what] / count
            out[f"{what}_max"] = self.largest[what]
        out["max_abs_weight_error"] = self.max_abs_weight_error
        return {field: out[field] for field in STAT_FIELDS}


def _kernel_sums(values: torch.Tensor) -> torch.Tensor:
    """Sums over the last dim, by a matrix-vector product (a reduction over a short last dim is
    several times slower): exact for the float32 integers (codes, rounded values) of kernels of
    up to 65536 elements (longer ones are summed in float64), float64 for float64 values."""
    flat = values.reshape(-1, values.shape[2])
    if flat.dtype == torch.float32 and flat.shape[1] * 256 > 2**24:  # integers past float32's
        flat = flat.double()
    return torch.mv(flat, torch.ones(flat.shape[1], dtype=flat.dtype)).view(values.shape[:2])


def _add_block(totals: _Totals, work: _Workspace, w: torch.Tensor, q: QuantizedTensor,
               codes: torch.Tensor) -> None:
    """Add a block of channels: ``w`` float32 and ``codes`` as (channels, kernels, kernel)."""
    scale = q.scale.float().view(-1, 1, 1)
    zero = q.zero_point.float().view(-1, 1, 1)
    n = 2 ** (q.bits - 1)
    x, rounded, wide = work.buffers(w.shape)
    torch.mul(w, scale, out=x).sub_(zero)
    torch.round(x, out=rounded).clamp_(-(n - 1) if q.scheme == "symmetric" else -n, n - 1)
    if w.shape[2] == 1:  # one-element kernels: the sums are the elements
        # round(x) - x is exact in float32 (|round(x) - x| <= |x|, on x's ulp grid)
        kernel_eq = rounded.sub_(x).view(w.shape[:2])
        totals.add("channel_sum_eq", kernel_eq.sum(1, dtype=torch.float64))
        totals.add("kernel_sum_eq", kernel_eq)
        kernel_squant = wide.view(w.shape[:2]).copy_(codes.view(w.shape[:2]))
        kernel_squant.sub_(x.view(w.shape[:2]))
        totals.add("channel_sum_squant", kernel_squant.sum(1))
        totals.add("kernel_sum_squant", kernel_squant)  # now |codes - x|, exact
        largest = kernel_squant.amax(1)
    else:  # codes and round(x) are integers: sum(codes - x) = sum(codes) - sum(x)
        sum_x = _kernel_sums(wide.copy_(x))
        kernel_eq = _kernel_sums(rounded).double().sub_(sum_x)
        kernel_squant = _kernel_sums(rounded.copy_(codes)).double().sub_(sum_x)
        for what, sums in (("eq", kernel_eq), ("squant", kernel_squant)):
            totals.add(f"channel_sum_{what}", sums.sum(1))
            totals.add(f"kernel_sum_{what}", sums)
        largest = rounded.sub_(x).abs_().amax(dim=(1, 2)).double()  # rounded holds the codes
    totals.kernels += w.shape[0] * w.shape[1]
    totals.channels += w.shape[0]
    # Each channel's largest |codes - x| on the grid, in float32 for kernels of several
    # elements, is within `margin` of the exact one (x's rounding: a few float32 ulps of
    # |x| <= n + the error, and |zero_point|); the weight error (|codes - x| / scale) is then
    # evaluated exactly, in float64, on the channels whose upper bound reaches the largest
    # lower bound.
    margin = 2.0 ** -20 * (3 * n + float(largest.max()) + float(zero.abs().max()))
    scale64 = scale.view(-1).double()
    lower, upper = (largest - margin) / scale64, (largest + margin) / scale64
    channels = (upper >= lower.max()).nonzero().view(-1)
    exact = ((codes[channels].double() + zero[channels].double()) / scale[channels].double()
             - w[channels].double()).abs().max()
    totals.max_abs_weight_error = max(totals.max_abs_weight_error, float(exact))


def _add(totals: _Totals, work: _Workspace, weight: torch.Tensor, qweight: QuantizedTensor
         ) -> None:
    """Add a tensor (or block of output channels), block by block of channels."""
    axis = qweight.axis
    w = weight.detach().movedim(axis, 0)
    codes = qweight.codes.movedim(axis, 0)
    channels = w.shape[0]
    step = max(1, _STATS_ELEMENTS * channels // max(1, w.numel()))
    for start in range(0, channels, step):
        n = min(step, channels - start)
        block = w[start : start + n].float().reshape(n, w.shape[1], -1)
        part = QuantizedTensor(codes[start : start + n], qweight.scale[start : start + n],
                               qweight.zero_point[start : start + n], qweight.bits,
                               qweight.mode, 0, qweight.scheme, qweight.granularity,
                               qweight.range)
        _add_block(totals, work, block, part, part.codes.reshape(block.shape))


def tensor_stats(name: str, weight: torch.Tensor, qweight: QuantizedTensor) -> dict[str, float]:
    """``squant.core.report``'s error statistics of one tensor ``name``."""
    totals = _Totals()
    _add_parts(totals, _Workspace(), weight, qweight)
    return totals.fields()


def _add_parts(totals: _Totals, work: _Workspace, weight: torch.Tensor,
               qweight: QuantizedTensor) -> None:
    """Add a tensor; with group-wise grids each group counts as a channel."""
    for part_weight, part in channel_parts(weight, qweight):
        _add(totals, work, part_weight, part)


class Statistics:
    """The statistics of the tensors of a checkpoint, which may arrive in blocks of rows."""

    def __init__(self) -> None:
        self._totals: dict[str, _Totals] = {}
        self._work = _Workspace()

    def add(self, name: str, weight: torch.Tensor, qweight: QuantizedTensor) -> None:
        """Add a tensor, or a block of its output channels (blocks come in any order)."""
        _add_parts(self._totals.setdefault(name, _Totals()), self._work, weight, qweight)

    def merged(self) -> dict[str, dict[str, float]]:
        """Each tensor's statistics, merged over its blocks."""
        return {name: totals.fields() for name, totals in self._totals.items()}
