"""The flip step of SQUANT_SPEC.md on one group (a kernel for KQ, a channel for CQ).

A group's order is encoded in one int64 key per element: the float32 priority's bit pattern
(order-preserving for priorities >= 0) in the high half, ``0xFFFFFFFF - index`` in the low half.
The largest key is then the largest priority with the lowest index on ties, exactly the spec's
stable sort of ``-priority``, and the first ``k`` of the order are the ``k`` largest keys: no
full sort is needed for the small ``k`` that groups nearly always have.
"""

import numpy as np
from numba import njit

_LOW_MASK = np.int64(0xFFFFFFFF)
_INSERTION_LIMIT = 64  # above this many, a full sort beats insertion into the top buffer


@njit(cache=True)
def make_key(priority_bits, index):
    """Order key of an element from its priority's float32 bits and its index in the group."""
    return (np.int64(priority_bits) << 32) | (_LOW_MASK - index)


@njit(cache=True)
def key_index(key):
    """Index in the group of the element that ``key`` was made for."""
    return _LOW_MASK - (key & _LOW_MASK)


@njit(cache=True)
def select_top(keys, count, m, top):
    """Write the ``m`` largest of ``keys[:count]`` (distinct) into ``top[:m]``, largest first."""
    if m > _INSERTION_LIMIT:
        ordered = np.sort(keys[:count])
        for t in range(m):
            top[t] = ordered[count - 1 - t]
        return
    filled = 0
    for c in range(count):
        key = keys[c]
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


@njit(cache=True)
def flip_step(error_sum, keys, size, top, state, base):
    """Steps 2-5 of the flip step on the group ``state[base:base+size]``.

    ``keys[:size]`` hold the order keys for the direction that ``error_sum`` chooses (step 1:
    up if the sum is negative, else down). Flips the first ``k = round(|sum|)`` of the order by
    setting their state to the direction (+1 up, -1 down). Returns the element handed on (step
    5) as ``(index in the group, direction of the priority to set)``; the caller sets that
    priority from the element's current error.
    """
    direction = 1 if error_sum < 0 else -1
    magnitude = abs(error_sum)
    k = min(np.int64(np.rint(magnitude)), size)
    overshoot = k >= magnitude
    if overshoot and k == 0:
        # order[-1]: the smallest key.
        smallest = keys[0]
        for c in range(1, size):
            smallest = min(smallest, keys[c])
        return key_index(smallest), -direction
    needed = k if overshoot else k + 1  # k < |sum| < size: the errors are below 1
    select_top(keys, size, needed, top)
    for t in range(k):
        state[base + key_index(top[t])] = direction
    if overshoot:
        return key_index(top[k - 1]), -direction
    return key_index(top[k]), direction
