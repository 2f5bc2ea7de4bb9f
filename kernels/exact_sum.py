"""Sum of a group's rounding errors 'as exactly as float64 allows' (SQUANT_SPEC.md, flip step 1).

The result is the exact sum of the float32 errors, rounded once to float64. The plain float64
sum of all but the finest errors is exact by construction (see ``error_sum``); the rare finer
errors (a weight sitting almost exactly on the grid) are added to it with an exact Shewchuk-style
summation, as is everything in a group too large for the fast path.
"""

import numpy as np
from numba import njit

FINE = 2.0**-17  # float32 values at least this large are multiples of 2**-40
EXACT_BOUND = 8000.0  # below 2**13: sums of multiples of 2**-40 are exact in float64


@njit(cache=True, fastmath={"reassoc"})  # not inline="always": that would drop the flag
def error_sum(err, partials):
    """Exact sum of the float32 errors ``err``, rounded to float64 (``partials``: scratch of
    ``MAX_PARTIALS`` float64).

    Fast path: errors of magnitude >= ``FINE`` are multiples of 2**-40; while their magnitudes
    sum to less than 2**13 every partial sum of them, in any order, is exact in float64, so their
    plain sum is exact and may be reassociated (vectorised) safely. The rare finer errors are
    then added exactly to it.
    """
    total = 0.0
    magnitude = 0.0
    fine = 0
    for i in range(err.shape[0]):
        e = np.float64(err[i])
        a = abs(e)
        coarse = a >= FINE
        total += e if coarse else 0.0
        magnitude += a
        fine += (not coarse) & (e != 0.0)
    return complete_sum(total, magnitude, fine, err, partials)


@njit(cache=True, inline="always")
def complete_sum(coarse_total, magnitude, fine, err, partials):
    """The exact sum of ``err`` from its coarse part's plain sum (see ``error_sum``)."""
    whole = magnitude >= EXACT_BOUND  # else only the fine errors are added to the coarse sum
    if not whole and fine == 0:
        return coarse_total
    # One call with a run-time flag: constant flags would compile exact_sum twice.
    return exact_sum(err, 0.0 if whole else coarse_total, not whole, partials)


@njit(cache=True)
def exact_sum(err, start, fine_only, partials):
    """Exact float64 rounding of ``start`` plus the errors (only those below ``FINE`` if
    ``fine_only``), by non-overlapping partials (Shewchuk's method) kept in ``partials``
    (scratch of ``MAX_PARTIALS`` float64: float32 inputs need a handful at most)."""
    partials[0] = start
    count = np.int64(1)  # not a literal 1: that would compile _round_partials twice
    for i in range(err.shape[0]):
        value = np.float64(err[i])
        if fine_only and abs(value) >= FINE:
            continue
        kept = 0
        for p in range(count):
            other = partials[p]
            if abs(value) < abs(other):
                value, other = other, value
            high = value + other
            low = other - (high - value)
            if low != 0.0:
                partials[kept] = low
                kept += 1
            value = high
        partials[kept] = value
        count = kept + 1
    return _round_partials(partials, count)


@njit(cache=True)
def _round_partials(partials, count):
    """Round the exact sum of increasing, non-overlapping partials to the nearest float64."""
    if count == 0:
        return 0.0
    top = count - 1
    high = partials[top]
    low = 0.0
    while top > 0:
        value = high
        top -= 1
        other = partials[top]
        high = value + other
        low = other - (high - value)
        if low != 0.0:
            break
    # A half-way case that the partials below would break: round it the correct way.
    below = partials[top - 1] if top > 0 else 0.0
    if (low < 0.0 and below < 0.0) or (low > 0.0 and below > 0.0):
        doubled = low * 2.0
        candidate = high + doubled
        if doubled == candidate - high:
            high = candidate
    return high
