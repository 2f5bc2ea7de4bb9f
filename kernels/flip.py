"""The flip step of SQUANT_SPEC.md on one group (a kernel for KQ, a channel for CQ).

A group's order (a stable sort of ``-priority``) is encoded in one int64 key per element: the
float32 priority's bit pattern (order-preserving for priorities >= 0) in the high half and
``0xFFFFFFFF - index`` in the low half. The largest key is the largest priority with the lowest
index on ties, so the first ``m`` of the order are the ``m`` largest keys. Only the first
``k + 1`` are ever needed (``k = round(|sum of errors|)``, nearly always 0 to 2), so they are
found by a few vectorised max scans, not a sort.
"""

import numpy as np
from numba import njit

from .grid import flip

_LOW = np.int64(0xFFFFFFFF)
_SCAN_LIMIT = 4  # up to this many: one max scan each; above: insertion into the top list
_INSERTION_LIMIT = 64  # above this many: a full sort


@njit(cache=True, inline="always")
def fill_keys(priority_bits, size, keys):
    """Order keys of the group from its priorities' float32 bit patterns."""
    for i in range(size):
        keys[i] = (np.int64(priority_bits[i]) << 32) | (_LOW - i)


@njit(cache=True, inline="always")
def key_index(key):
    """Index in the group of the element a key was made for."""
    return _LOW - (key & _LOW)


@njit(cache=True, inline="always")
def select_top(keys, size, m, top):
    """Write the ``m`` largest of the distinct ``keys[:size]`` into ``top[:m]``, largest first."""
    if m <= _SCAN_LIMIT:
        below = np.iinfo(np.int64).max
        for t in range(m):
            best = np.iinfo(np.int64).min
            for i in range(size):
                key = keys[i]
                best = key if (key > best) & (key < below) else best
            top[t] = best
            below = best
    elif m <= _INSERTION_LIMIT:
        filled = 0
        for i in range(size):
            key = keys[i]
            if filled < m:
                pos = filled
                filled += 1
            elif key > top[m - 1]:
                pos = m - 1
            else:
                continue
            while pos > 0 and top[pos - 1] < key:
                top[pos] = top[pos - 1]
                pos -= 1
            top[pos] = key
    else:
        ordered = np.sort(keys[:size])
        for t in range(m):
            top[t] = ordered[size - 1 - t]


@njit(cache=True, inline="always")
def flip_step(error_sum, keys, size, top, base, x, err, value, t_min, t_max):
    """Steps 2-5 of the flip step on the group of ``size`` elements starting at ``base``.

    ``error_sum`` is step 1's sum; ``keys[:size]`` encode the group's order in the direction it
    chooses (up if the sum is negative, else down). Flips the first ``k = round(|sum|)`` of the
    order in that direction and returns the element handed on by step 5 as
    ``(index in the group, True if its up priority is to be set)``.
    """
    up = error_sum < 0
    magnitude = abs(error_sum)
    k = np.int64(np.rint(magnitude))
    if k >= magnitude:  # flipped a little too much: the last flipped may flip back
        if k == 0:  # order[-1]: the smallest key
            smallest = keys[0]
            for i in range(1, size):
                smallest = min(smallest, keys[i])
            return key_index(smallest), not up
        select_top(keys, size, k, top)
        handed, handed_up = top[k - 1], not up
    else:  # a little too little: the next in line may flip
        select_top(keys, size, k + 1, top)  # k < |sum| < size, as every |error| < 1
        handed, handed_up = top[k], up
    for t in range(k):
        flip(base + key_index(top[t]), up, x, err, value, t_min, t_max)
    return key_index(handed), handed_up
