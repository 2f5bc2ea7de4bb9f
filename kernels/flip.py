"""The flip step of SQUANT_SPEC.md on one group (a kernel for KQ, a channel for CQ).

A group's order (a stable sort of ``-priority``) is encoded in one int64 key per element: the
float32 priority's bit pattern (order-preserving for priorities >= 0) in the high half and
``0xFFFFFFFF - index`` in the low half. The largest key is the largest priority with the lowest
index on ties, so the first ``m`` of the order are the ``m`` largest keys. Only the first
``k + 1`` are ever needed (``k = round(|sum of errors|)``, nearly always 0 to 2), so they are
found by one scan keeping a short sorted list of the best so far, not by sorting the group.
"""

import numpy as np
from numba import njit

from .grid import flip, has_candidate

_LOW = np.int64(0xFFFFFFFF)
_INSERTION_LIMIT = 64  # above this many: a heap
SMALLEST_KEY = np.iinfo(np.int64).min
LARGEST_KEY = np.iinfo(np.int64).max


@njit(cache=True, inline="always")
def make_key(priority, index):
    """Order key of an element from its float32 priority (>= 0) and its index in the group."""
    return (np.int64(np.float32(priority).view(np.int32)) << 32) | (_LOW - index)


@njit(cache=True, inline="always")
def eq_key(e, x, index, up, t_min, t_max):
    """Order key of an element by its EQ priority in one direction: ``|e|`` where it has a
    candidate (up: ``e < 0`` and ``x < t_max``; down: ``e > 0`` and ``x > t_min``), else 0."""
    return make_key(abs(e) * np.float32(has_candidate(e, x, up, t_min, t_max)), index)


@njit(cache=True, inline="always")
def key_index(key):
    """Index in the group of the element a key was made for."""
    return _LOW - (key & _LOW)


@njit(cache=True, inline="always")
def select_top(keys, size, m, top):
    """Write the ``m`` largest of the distinct ``keys[:size]`` into ``top[:m]``, largest first."""
    if m == 0:
        return
    if m <= _INSERTION_LIMIT:
        for i in range(m):  # the first m, sorted, then each larger key is inserted
            key = keys[i]
            pos = i
            while pos > 0 and top[pos - 1] < key:
                top[pos] = top[pos - 1]
                pos -= 1
            top[pos] = key
        threshold = top[m - 1]  # a local: the scan below is a tight compare loop
        for i in range(m, size):
            key = keys[i]
            if key <= threshold:
                continue
            pos = m - 1
            while pos > 0 and top[pos - 1] < key:
                top[pos] = top[pos - 1]
                pos -= 1
            top[pos] = key
            threshold = top[m - 1]
    else:
        _select_top_by_heap(keys, size, m, top)


@njit(cache=True)
def _select_top_by_heap(keys, size, m, top):
    """``select_top`` for large ``m``: a min-heap of the ``m`` largest keys seen so far in
    ``top[:m]``, then sorted in place (heapsort), largest first. No allocation, no np.sort
    (whose generic code costs seconds of compile time)."""
    for i in range(m):
        top[i] = keys[i]
    for start in range(m // 2 - 1, -1, -1):
        _sift_down(top, start, m)
    for i in range(m, size):
        if keys[i] > top[0]:
            top[0] = keys[i]
            _sift_down(top, 0, m)
    for end in range(m - 1, 0, -1):  # the smallest goes last, so top ends largest first
        top[0], top[end] = top[end], top[0]
        _sift_down(top, 0, end)


@njit(cache=True, inline="always")
def _sift_down(heap, position, length):
    """Restore the min-heap order of ``heap[:length]`` below ``position``."""
    while True:
        child = 2 * position + 1
        if child >= length:
            return
        if child + 1 < length and heap[child + 1] < heap[child]:
            child += 1
        if heap[position] <= heap[child]:
            return
        heap[position], heap[child] = heap[child], heap[position]
        position = child


@njit(cache=True, inline="always")
def flip_count(error_sum):
    """Steps 1-2: ``(up, k, overshoot)``: the direction (up if the sum is negative), how many
    to flip (``round(|sum|)``) and whether ``k >= |sum|`` (step 5's first case)."""
    magnitude = abs(error_sum)
    # a grid on which x overflows gives NaN sums: no flips (never an index out of bounds)
    k = np.int64(np.rint(magnitude)) if magnitude < 2.0**62 else np.int64(0)
    return error_sum < 0, k, k >= magnitude


@njit(cache=True, inline="always")
def flip_first(top, k, up, x, err, value, t_min, t_max):
    """Step 4: flip the elements of the first ``k`` keys of the order in the direction."""
    for t in range(k):
        flip(key_index(top[t]), up, x, err, value, t_min, t_max)
