"""The quantization grid and the element-wise EQ quantities (SQUANT_SPEC.md, 'Scale and zero
point', 'Other grids' and 'EQ').

Everything here is float32 exactly as the spec states it: each helper is a pure function of
scalars so that the passes in ``flip.py`` can recompute an element's state instead of storing it.
"""

import numpy as np
from numba import njit

_EPS = np.float32(1e-8)


@njit(cache=True)
def channel_min_max(w, start, stop):
    """Return (min, max) of ``w[start:stop]`` as float32 (the channel must be non-empty)."""
    lo = w[start]
    hi = w[start]
    for i in range(start + 1, stop):
        v = w[i]
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


@njit(cache=True)
def grid_params(lo, hi, bits, symmetric):
    """Scale, zero point and code range ``(S, Z, t_min, t_max)`` for a range ``[lo, hi]``.

    asymmetric: ``S = (2**b - 1) / max(hi - lo, 1e-8)``, ``Z = round(S * lo) + n``, codes in
    ``[-n, n-1]``; symmetric: ``S = (n - 1) / max(max(|lo|, |hi|), 1e-8)``, ``Z = 0``, codes in
    ``[-(n-1), n-1]``; ``n = 2**(b-1)``. All float32.
    """
    n = np.float32(2 ** (bits - 1))
    one = np.float32(1.0)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        scale = (n - one) / max(amax, _EPS)
        return scale, np.float32(0.0), one - n, n - one
    scale = np.float32(2**bits - 1) / max(hi - lo, _EPS)
    zero = np.rint(scale * lo) + n
    return scale, zero, -n, n - one


@njit(cache=True)
def has_candidate(x, up, t_min, t_max):
    """Whether the element on the grid at ``x`` has a flip candidate in the given direction.

    up: the error ``e = round(x) - x`` is negative and ``x < t_max``;
    down: ``e`` is positive and ``x > t_min``.
    """
    e = np.rint(x) - x
    if up:
        return (e < 0) & (x < t_max)
    return (e > 0) & (x > t_min)


@njit(cache=True)
def eq_priority(x, up, t_min, t_max):
    """EQ priority of an element in a direction: ``|e|`` where it has a candidate, else 0."""
    if has_candidate(x, up, t_min, t_max):
        return abs(np.rint(x) - x)
    return np.float32(0.0)


@njit(cache=True)
def current_error(x, state, t_min, t_max):
    """Rounding error of an element in ``state`` (0: EQ, +1: flipped up, -1: flipped down).

    A flip in a direction without a candidate leaves the value at ``round(x)`` and, as the spec
    says, sets the error to 0. The flipped errors ``e + 1`` and ``e - 1`` are float32.
    """
    e = np.rint(x) - x
    if state == 0:
        return e
    if has_candidate(x, state > 0, t_min, t_max):
        return e + np.float32(state)
    return np.float32(0.0)


@njit(cache=True)
def current_code(x, state, t_min, t_max):
    """Integer value of an element in ``state``, clamped to ``[t_min, t_max]``."""
    value = np.rint(x)
    if state != 0 and has_candidate(x, state > 0, t_min, t_max):
        value += np.float32(state)
    return min(max(value, t_min), t_max)
