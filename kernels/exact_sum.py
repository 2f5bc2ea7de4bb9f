"""Sum of a group's rounding errors 'as exactly as float64 allows' (SQUANT_SPEC.md, flip step 1).

The result is the exact sum of the float32 errors, rounded once to float64. The fast path adds
the errors as integers in units of 2**-40, which is exact, order-independent and vectorises: every
float32 error of magnitude >= 2**-17 (and every flipped error ``e +- 1``) is such a multiple.
Groups holding a finer error (a weight sitting almost exactly on the grid) take an exact
Shewchuk-style summation instead.
"""

import numpy as np
from numba import njit

from .grid import current_error

_FIXED_ONE = 2.0**40
_FIXED_UNIT = 2.0**-40
_MAX_PARTIALS = 64  # non-overlapping float64 partials of float32 inputs: a handful at most


@njit(cache=True)
def group_error_sum(x, state, start, stop, t_min, t_max):
    """Exact sum, rounded to float64, of the current errors of elements ``start..stop-1``."""
    acc = np.int64(0)
    exact = True
    for i in range(start, stop):
        scaled = np.float64(current_error(x[i], state[i], t_min, t_max)) * _FIXED_ONE
        units = np.int64(scaled)
        exact &= np.float64(units) == scaled
        acc += units
    if exact:
        return np.float64(acc) * _FIXED_UNIT
    return _exact_sum_slow(x, state, start, stop, t_min, t_max)


@njit(cache=True)
def _exact_sum_slow(x, state, start, stop, t_min, t_max):
    """Exact float64 rounding of the sum via non-overlapping partials (Shewchuk's method)."""
    partials = np.empty(_MAX_PARTIALS, np.float64)
    count = 0
    for i in range(start, stop):
        value = np.float64(current_error(x[i], state[i], t_min, t_max))
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
    if top > 0 and ((low < 0.0 and partials[top - 1] < 0.0) or (low > 0.0 and partials[top - 1] > 0.0)):
        doubled = low * 2.0
        candidate = high + doubled
        if doubled == candidate - high:
            high = candidate
    return high
