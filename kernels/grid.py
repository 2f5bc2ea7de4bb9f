"""The quantization grid and the element-wise EQ quantities (SQUANT_SPEC.md, 'Scale and zero
point', 'Other grids' and 'EQ'). Everything is float32, exactly as the spec states it.
"""

import numpy as np
from numba import njit

from .constants import RANGE_FLOOR

_MAGNITUDE = np.int32(0x7FFFFFFF)
_EXPONENT = np.int32(0x7F800000)


@njit(cache=True, inline="always")
def _ordered(bits):
    """Map float32 bit patterns to int32s in the floats' order (an involution)."""
    return bits ^ ((bits >> 31) & _MAGNITUDE)


@njit(cache=True)
def channel_range(w_bits, out):
    """Min and max of the float32 values whose bit patterns are ``w_bits`` (non-empty).

    Compares order-preserving integer images of the floats, which vectorises where float
    min/max reductions do not. Writes the min and max bit patterns to ``out[0]``, ``out[1]``;
    returns False if a value is NaN or Inf (then the range is meaningless).
    """
    lo = np.int32(0x7FFFFFFF)
    hi = np.int32(-0x80000000)
    special = np.int32(0)
    for i in range(w_bits.shape[0]):  # from 0, so that LLVM sees no negative index
        bits = w_bits[i]
        key = _ordered(bits)
        lo = min(lo, key)
        hi = max(hi, key)
        special |= np.int32((bits & _EXPONENT) == _EXPONENT)
    out[0] = _ordered(lo)
    out[1] = _ordered(hi)
    return special == 0


@njit(cache=True)
def grid_params(lo, hi, bits, symmetric):
    """Scale, zero point and code range ``(S, Z, t_min, t_max)`` for a range ``[lo, hi]``.

    asymmetric: ``S = (2**b - 1) / max(hi - lo, 1e-8)``, ``Z = round(S * lo) + n``, codes in
    ``[-n, n-1]``; symmetric: ``S = (n - 1) / max(max(|lo|, |hi|), 1e-8)``, ``Z = 0``, codes in
    ``[-(n-1), n-1]``; ``n = 2**(b-1)``. All float32.

    ``S = 0`` says that the grid overflows float32: ``hi - lo`` is not finite, or ``Z`` is not
    (``S * lo`` overflows: a channel of nearly equal huge values); the caller reports it, and
    the passes do not run on such a grid.
    """
    n = np.float32(2 ** (bits - 1))
    one = np.float32(1.0)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        scale = (n - one) / max(amax, RANGE_FLOOR)
        return scale, np.float32(0.0), one - n, n - one
    scale = np.float32(2**bits - 1) / max(hi - lo, RANGE_FLOOR)
    zero = np.rint(scale * lo) + n
    if not abs(zero) < np.float32(np.inf):
        scale = np.float32(0.0)
    return scale, zero, -n, n - one


@njit(cache=True, inline="always")
def has_candidate(e, x, up, t_min, t_max):
    """Whether the element at ``x`` on the grid, with EQ error ``e = round(x) - x``, has a flip
    candidate in a direction: up if ``e < 0`` and ``x < t_max``, down if ``e > 0`` and
    ``x > t_min``. Without branches."""
    zero = np.float32(0.0)
    return (up & (e < zero) & (x < t_max)) | ((not up) & (e > zero) & (x > t_min))


@njit(cache=True, inline="always")
def flipped(x, up, t_min, t_max):
    """``(value, error)`` of the element at ``x`` flipped in a direction, without branches:
    ``round(x) +- 1`` and the float32 ``e +- 1`` where it has a candidate, else ``round(x)``
    and 0, as the spec says."""
    r = np.rint(x)
    e = r - x
    step = np.float32(1.0) if up else np.float32(-1.0)
    candidate = has_candidate(e, x, up, t_min, t_max)
    return (r + step if candidate else r), (e + step if candidate else np.float32(0.0))


@njit(cache=True, inline="always")
def flip(i, up, x, err, value, t_min, t_max):
    """Flip element ``i`` in a direction: its value and current error become that direction's
    candidate value and error (see ``flipped``)."""
    value[i], err[i] = flipped(x[i], up, t_min, t_max)
