"""Sum of a group's rounding errors 'as exactly as float64 allows' (SQUANT_SPEC.md, flip step 1).

The result is the exact sum of the float32 errors, rounded once to float64. Nearly always the
plain float64 sum is already exact (see ``error_sum``); groups holding a finer error (a weight
sitting almost exactly on the grid) or a huge one take an exact Shewchuk-style summation.
"""

import numpy as np
from numba import njit

FINE = 2.0**-17  # float32 values at least this large are multiples of 2**-40
_EXACT_BOUND = 8000.0  # below 2**13: sums of multiples of 2**-40 are exact in float64
_MAX_PARTIALS = 64  # non-overlapping float64 partials of float32 inputs: a handful at most


@njit(cache=True, inline="always", fastmath={"reassoc"})
def error_sum(err):
    """Exact sum of the float32 errors ``err``, rounded to float64.

    Fast path: when every non-zero error is a multiple of 2**-40 (``|e| >= 2**-17``) and the sum
    of their magnitudes stays below 2**13, every partial sum in any order is exact in float64,
    so the plain sum is the exact one and may be reassociated (vectorised) safely.
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
    if sum_is_exact(fine, magnitude):
        return total
    return exact_sum_slow(err)


@njit(cache=True, inline="always")
def sum_is_exact(fine, magnitude):
    """Whether a plain float64 sum is exact: no error below ``FINE`` (``fine`` counts them) and
    the magnitudes summing to less than 2**13."""
    return (fine == 0) & (magnitude < _EXACT_BOUND)


@njit(cache=True)
def exact_sum_slow(err):
    """Exact float64 rounding of the sum via non-overlapping partials (Shewchuk's method)."""
    partials = np.empty(_MAX_PARTIALS, np.float64)
    count = 0
    for i in range(err.shape[0]):
        value = np.float64(err[i])
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
