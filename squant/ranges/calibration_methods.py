"""The maths of the data-driven activation ranges: histograms and the thresholds chosen on them.

Pure functions on numpy arrays (float64), no modules and no hooks
(:mod:`squant.ranges.calibration` feeds them). A layer's input is summarised by a
:class:`Histogram` of ``BINS`` equal bins per side: over ``[0, M]`` when the input is never
negative, else over ``[-M, M]`` (``2 * BINS`` bins, so 0 is an edge), with ``M`` the largest
``|x|`` seen in the first calibration pass. Every range returned contains 0, as every range
squant makes does: the fake quantizer then represents 0 (ReLU's zeros) exactly.

- :func:`percentile_range`: the ``p`` and ``100 - p`` percentiles, interpolated in their bin.
- :func:`kl_threshold`: TensorRT's entropy calibration (Migacz, "8-bit Inference with
  TensorRT", GTC 2017), written from that description: for each candidate threshold ``i``
  bins, ``P`` is the first ``i`` bins with the mass beyond added to the last, ``Q`` those same
  ``i`` bins (without the outliers) merged into ``levels`` groups and spread back evenly over
  each group's non-empty bins; the threshold minimises ``KL(P || Q)``. A non-negative input
  gets ``[0, T]`` with ``levels = 2**bits`` (the fake quantizer's unsigned grid); a signed one
  the ``|x|`` histogram and ``[-T, T]`` with ``levels = 2**(bits-1)`` (TensorRT's symmetric
  int8 uses 128). ``T`` is the upper edge of the last bin kept (the slides' ``m + 0.5`` bins
  puts it half a bin further; the edge is where ``P`` stops). Exact zeros are left out (they
  sit on every grid; ReLU's spike at 0 would otherwise force the smallest threshold).
- :func:`mse_range`: the ``(lo, hi)`` on bin edges with the least expected squared error of
  the fake quantizer, each bin's mass spread evenly over it: a value outside the range costs its
  squared distance to the nearer end, one inside ``step**2 / 12`` (uniform rounding noise,
  ``step = (hi - lo) / (2**bits - 1)``), an exact zero nothing (0 is on every grid). Every
  pair of edges is tried (``[0, T]`` only, for a non-negative input).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 2048
DEFAULT_PERCENTILE = 99.99


@dataclass
class Histogram:
    """Counts of one layer's input values in equal bins over ``[-limit, limit]`` (``signed``,
    ``2 * bins`` bins) or ``[0, limit]`` (``bins`` bins), and how many were exactly 0.

    ``counts``: float64 ``(bins,)`` or ``(2 * bins,)``; values beyond the span count in the
    end bins. ``limit`` > 0.
    """

    counts: np.ndarray
    limit: float
    signed: bool
    zeros: float = 0.0

    @classmethod
    def empty(cls, limit: float, signed: bool, bins: int = BINS) -> Histogram:
        """No counts yet, over the span ``limit`` and ``signed`` give."""
        return cls(np.zeros(2 * bins if signed else bins), float(limit), bool(signed))

    @property
    def edges(self) -> np.ndarray:
        """The ``len(counts) + 1`` bin edges, float64."""
        low = -self.limit if self.signed else 0.0
        return np.linspace(low, self.limit, len(self.counts) + 1)

    @property
    def width(self) -> float:
        """One bin's width."""
        return (2 if self.signed else 1) * self.limit / len(self.counts)


def percentile_range(hist: Histogram, percentile: float = DEFAULT_PERCENTILE
                     ) -> tuple[float, float]:
    """``(lo, hi)``: the ``100 - percentile`` and ``percentile`` percentiles of the counted
    values (linear inside a bin), widened to contain 0; ``lo = 0`` for a non-negative input.
    ``percentile`` in (50, 100]."""
    hi = _quantile(hist, percentile / 100.0)
    lo = _quantile(hist, 1.0 - percentile / 100.0) if hist.signed else 0.0
    return min(lo, 0.0), max(hi, 0.0)


def _quantile(hist: Histogram, q: float) -> float:
    counts = hist.counts
    total = counts.sum()
    if total <= 0:
        return 0.0
    cumulative = np.cumsum(counts)
    target = q * total
    index = int(np.searchsorted(cumulative, target, side="left"))
    index = min(index, len(counts) - 1)
    before = cumulative[index - 1] if index else 0.0
    inside = (target - before) / counts[index] if counts[index] > 0 else 1.0
    return float(hist.edges[index] + min(max(inside, 0.0), 1.0) * hist.width)


def kl_divergences(counts: np.ndarray, levels: int) -> np.ndarray:
    """``KL(P || Q)`` for each candidate threshold of ``i = levels .. len(counts)`` bins (entry
    ``i - levels``), as :mod:`this module <squant.ranges.calibration_methods>` describes.

    ``counts``: float ``(n,)``, ``n >= levels``. Bin ``k`` of the first ``i`` falls in group
    ``floor(k * levels / i)``. A candidate whose last bin is empty but receives outliers has no
    ``Q`` mass there: its divergence is ``inf`` (never chosen). All-zero counts give zeros.
    Every candidate at once, from prefix sums: ``(n - levels + 1, levels + 1)`` arrays.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = len(counts)
    if n < levels:
        raise ValueError(f"{n} bins cannot be merged into {levels} levels")
    total = counts.sum()
    if total <= 0:
        return np.zeros(n - levels + 1)
    mass = np.concatenate([[0.0], np.cumsum(counts)])
    nonzero = np.concatenate([[0.0], np.cumsum(counts > 0)])
    safe = np.where(counts > 0, counts, 1.0)
    c_log_c = np.concatenate([[0.0], np.cumsum(counts * np.log(safe))])
    i = np.arange(levels, n + 1)
    # Group g of candidate i holds bins [ceil(g * i / levels), ceil((g + 1) * i / levels)).
    bounds = (np.arange(levels + 1)[None, :] * i[:, None] + levels - 1) // levels
    group_mass = np.diff(mass[bounds], axis=1)
    group_average = np.divide(group_mass, np.diff(nonzero[bounds], axis=1),
                              out=np.zeros_like(group_mass), where=group_mass > 0)
    last = counts[i - 1]
    group_mass[:, -1] -= last  # the last bin's own term is written apart: P gets the outliers
    log_average = np.log(np.where(group_average > 0, group_average, 1.0))
    p_last = last + (total - mass[i])
    q_last = np.where(last > 0, group_average[:, -1], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        last_term = np.where(p_last > 0, p_last * np.log(p_last / q_last), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # no Q mass at all: -inf + inf
        divergence = ((c_log_c[i - 1] - (group_mass * log_average).sum(axis=1) + last_term)
                      / total + np.log(mass[i] / total))
    return np.where(np.isfinite(divergence), np.maximum(divergence, 0.0), np.inf)


def kl_threshold(counts: np.ndarray, width: float, levels: int) -> float:
    """The threshold ``T = i * width`` of the candidate ``i`` bins with the least
    :func:`kl_divergences` (the first of equals); ``counts`` start at 0."""
    divergences = kl_divergences(counts, levels)
    return float((int(np.argmin(divergences)) + levels) * width)


def kl_range(hist: Histogram, bits: int) -> tuple[float, float]:
    """``(lo, hi)`` by entropy calibration: ``[0, T]`` on a non-negative input with
    ``2**bits`` levels, else ``[-T, T]`` on the ``|x|`` histogram with ``2**(bits-1)``.

    The exact zeros are taken out of the first bin first: every candidate represents them
    exactly, but left in, ReLU's spike at 0 (often half the values) would make ``Q`` spread
    it over its group and force the smallest threshold (MobileNetV2 W8A8, 16 images: 31.9%
    top-1 agreement with FP32 instead of 91.9%)."""
    if not hist.signed:
        counts = hist.counts.copy()
        counts[0] = max(counts[0] - hist.zeros, 0.0)
        return 0.0, kl_threshold(counts, hist.width, 2**bits)
    half = len(hist.counts) // 2
    folded = hist.counts[half:] + hist.counts[:half][::-1]
    folded[0] = max(folded[0] - hist.zeros, 0.0)
    threshold = kl_threshold(folded, hist.width, 2 ** (bits - 1))
    return -threshold, threshold


def mse_errors(hist: Histogram, bits: int, lo_index: np.ndarray, hi_index: np.ndarray
               ) -> np.ndarray:
    """The expected squared error (in count units) of the fake quantizer on ``[edges[a],
    edges[b]]`` for every ``a`` of ``lo_index`` (rows) and ``b`` of ``hi_index`` (columns),
    ``a < b`` (other pairs: ``inf``)."""
    edges, counts, width = hist.edges, hist.counts, hist.width
    centres = (edges[:-1] + edges[1:]) / 2
    # Prefix sums over bins [0, k): mass, first and second moments (spread evenly in each bin).
    mass = np.concatenate([[0.0], np.cumsum(counts)])
    first = np.concatenate([[0.0], np.cumsum(counts * centres)])
    second = np.concatenate([[0.0], np.cumsum(counts * (centres**2 + width**2 / 12))])

    def clipped(start: np.ndarray, stop: np.ndarray, end: np.ndarray) -> np.ndarray:
        """sum over bins [start, stop) of mass * E[(x - end)**2]."""
        m, f, s = mass[stop] - mass[start], first[stop] - first[start], second[stop] - second[start]
        return s - 2 * end * f + end**2 * m

    n = len(counts)
    lo_index, hi_index = np.asarray(lo_index), np.asarray(hi_index)
    left = clipped(np.zeros_like(lo_index), lo_index, edges[lo_index])
    right = clipped(hi_index, np.full_like(hi_index, n), edges[hi_index])
    zero_bin = int(np.searchsorted(edges, 0.0, side="right")) - 1  # the bin holding exact zeros
    inside = mass[hi_index][None, :] - mass[lo_index][:, None]
    holds_zero = (lo_index[:, None] <= zero_bin) & (hi_index[None, :] > zero_bin)
    inside = inside - np.where(holds_zero, min(hist.zeros, counts[min(zero_bin, n - 1)]), 0.0)
    step = (edges[hi_index][None, :] - edges[lo_index][:, None]) / (2**bits - 1)
    errors = left[:, None] + right[None, :] + step**2 / 12 * inside
    return np.where(hi_index[None, :] > lo_index[:, None], errors, np.inf)


def mse_range(hist: Histogram, bits: int) -> tuple[float, float]:
    """``(lo, hi)`` on bin edges with the least :func:`mse_errors`: ``[0, T]`` over every
    edge ``T`` for a non-negative input, every pair ``lo <= 0 <= hi`` of edges for a signed one
    (``(2 * BINS + 1)**2 / 4`` pairs, in blocks of rows to bound memory)."""
    edges, n = hist.edges, len(hist.counts)
    zero_edge = n // 2 if hist.signed else 0
    highs = np.arange(zero_edge + 1, n + 1)
    lows = np.arange(0, zero_edge + 1)
    best, best_pair = np.inf, (zero_edge, n)
    for block in np.array_split(lows, max(1, len(lows) // 256)):
        errors = mse_errors(hist, bits, block, highs)
        flat = int(np.argmin(errors))
        if errors.flat[flat] < best:
            best = float(errors.flat[flat])
            best_pair = (int(block[flat // len(highs)]), int(highs[flat % len(highs)]))
    return float(edges[best_pair[0]]), float(edges[best_pair[1]])


def ema_update(previous: tuple[float, float] | None, batch: tuple[float, float],
               momentum: float) -> tuple[float, float]:
    """The moving-average ``(min, max)`` after one more batch: the first batch's own
    ``(min, max)``, then ``momentum * previous + (1 - momentum) * batch``, end by end."""
    if previous is None:
        return batch
    return (momentum * previous[0] + (1 - momentum) * batch[0],
            momentum * previous[1] + (1 - momentum) * batch[1])
