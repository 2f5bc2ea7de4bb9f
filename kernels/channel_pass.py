"""CQ: the flip step on a whole channel (SQUANT_SPEC.md, 'KQ then CQ').

Only the first ``k`` of the channel's order are flipped: the channel's hand-on (step 5) has no
next level and is skipped.
"""

import numpy as np
from numba import njit

from .exact_sum import error_sum
from .flip import eq_key, flip_count, key_index, make_key, select_top
from .grid import flip, flipped
from .kernel_pass import transposed_position


@njit(cache=True)
def channel_pass_eq(w, scale, zero, t_min, t_max, codes, x, err, keys, top, partials):
    """EQ, then CQ with the EQ priorities (no KQ ran: mode C, or kernels of one element), straight
    into the channel's clamped ``codes``: EQ writes every code, the flips rewrite theirs.

    ``x`` and ``err`` (the EQ errors; not updated by the flips), ``keys``, ``top`` and
    ``partials`` are scratch.
    """
    size = w.shape[0]
    for i in range(size):  # EQ
        xi = scale * w[i] - zero
        r = np.rint(xi)
        x[i] = xi
        err[i] = r - xi
        codes[i] = np.int8(min(max(r, t_min), t_max))
    up, k, _ = flip_count(error_sum(err, partials))
    if k == 0:
        return
    for i in range(size):
        keys[i] = eq_key(err[i], x[i], i, up, t_min, t_max)
    select_top(keys, size, k, top)
    for t in range(k):
        i = key_index(top[t])
        flipped_value, _ = flipped(x[i], up, t_min, t_max)
        codes[i] = np.int8(min(max(flipped_value, t_min), t_max))


@njit(cache=True)
def channel_pass_after_kernels(x, err, value, inner, ksize, t_min, t_max, scratch, error_total):
    """CQ after KQ, on a channel held transposed (see ``kernel_pass``). ``error_total``: the
    channel's error sum after KQ (what ``error_sum`` gives).

    The only non-zero priorities are the ones the kernels handed on in the chosen direction:
    they come first in the order, and every other element follows in index order.
    """
    keys, top, hand_index, hand_up, hand_priority = scratch[:5]
    up, k, _ = flip_count(error_total)
    if k == 0:
        return
    count = np.int64(0)  # not a literal 0: that would compile select_top's heap twice
    for i in range(inner):
        if (hand_up[i] == up) & (hand_priority[i] > 0):
            keys[count] = make_key(hand_priority[i], count)
            hand_index[count] = hand_index[i]  # compacted in place: i >= count
            count += 1
    first = min(k, count)
    select_top(keys, count, first, top)
    for t in range(first):
        element = hand_index[key_index(top[t])]
        flip(transposed_position(element, inner, ksize), up, x, err, value, t_min, t_max)
    candidate = 0
    element = 0
    for _ in range(k - first):
        while candidate < count and hand_index[candidate] == element:
            candidate += 1
            element += 1
        flip(transposed_position(element, inner, ksize), up, x, err, value, t_min, t_max)
        element += 1
