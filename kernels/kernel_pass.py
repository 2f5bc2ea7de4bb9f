"""KQ: the flip step on every kernel of a channel (SQUANT_SPEC.md, 'KQ then CQ').

A channel's kernels are short (9 elements for 3x3) and many, so they are processed side by side:
the channel is held kernel-major transposed (element ``j`` of kernel ``i`` at ``j * inner + i``)
and the error sums and the first two and last keys of every kernel's order are computed in loops
that run across kernels, which vectorise. Only the decisions and the few flips are per kernel.
"""

import numpy as np
from numba import njit

from .exact_sum import EXACT_BOUND, FINE, complete_sum
from .flip import (
    LARGEST_KEY,
    SMALLEST_KEY,
    eq_key,
    flip_count,
    key_index,
    select_top,
)
from .grid import flip, flipped


@njit(cache=True, inline="always")
def transposed_position(index, inner, ksize):
    """Position in the transposed layout of the channel's element ``index`` (= i*ksize + j)."""
    return (index % ksize) * inner + index // ksize


@njit(cache=True)
def _eq_and_kernel_sums(x, err, value, inner, ksize, total, magnitude, fine, group, partials):
    """EQ (``value = round(x)``, ``err = value - x``) and step 1 for every kernel: the exact sum
    of its errors, rounded to float64, in ``total`` (``magnitude``, ``fine``, ``group`` and
    ``partials`` are scratch)."""
    total[:inner] = 0.0
    magnitude[:inner] = 0.0
    fine[:inner] = 0
    for j in range(ksize):
        x_row = x[j * inner : (j + 1) * inner]
        err_row = err[j * inner : (j + 1) * inner]
        value_row = value[j * inner : (j + 1) * inner]
        for i in range(inner):  # across kernels: each kernel's own sum stays in order
            r = np.rint(x_row[i])
            e = r - x_row[i]
            value_row[i] = r
            err_row[i] = e
            e64 = np.float64(e)
            a = abs(e64)
            coarse = a >= FINE
            total[i] += e64 if coarse else 0.0
            magnitude[i] += a
            fine[i] += (not coarse) & (e64 != 0.0)
    for i in range(inner):
        if fine[i] != 0 or magnitude[i] >= EXACT_BOUND:  # the fast sum is not exact
            for j in range(ksize):
                group[j] = err[j * inner + i]
            total[i] = complete_sum(total[i], magnitude[i], fine[i], group[:ksize], partials)


@njit(cache=True)
def _kernel_order_heads(x, err, inner, ksize, total, t_min, t_max, first, second, last):
    """The two largest and the smallest EQ-priority key of every kernel, in its direction."""
    first[:inner] = SMALLEST_KEY
    second[:inner] = SMALLEST_KEY
    last[:inner] = LARGEST_KEY
    for j in range(ksize):
        x_row = x[j * inner : (j + 1) * inner]
        err_row = err[j * inner : (j + 1) * inner]
        for i in range(inner):  # across kernels
            key = eq_key(err_row[i], x_row[i], j, total[i] < 0, t_min, t_max)
            second[i] = max(second[i], min(key, first[i]))
            first[i] = max(first[i], key)
            last[i] = min(last[i], key)


@njit(cache=True)
def _kernel_decisions(total, first, second, last, inner, ksize, flips, hand_index, hand_up):
    """Steps 2 and 5 for every kernel whose order's first two keys suffice (nearly all), side by
    side: how many to flip (``flips``, -1 where the general selection is needed) and the element
    handed on with its direction."""
    for i in range(inner):
        up, k, overshoot = flip_count(total[i])
        place = k - 1 if overshoot else k  # place in the order of the element handed on
        handed = last[i] if place < 0 else (first[i] if place == 0 else second[i])
        flips[i] = k if place < 2 else -1
        hand_index[i] = i * ksize + key_index(handed)
        hand_up[i] = up ^ overshoot  # overshoot: the opposite direction


@njit(cache=True, inline="always")
def flip_by_order(x, err, value, i, inner, ksize, up, k, overshoot, t_min, t_max, keys, top):
    """Steps 3-5 on kernel ``i`` of a channel held transposed when the first two of its order do
    not suffice: select the first ``k`` (``k + 1`` without overshoot) of its order (``keys`` and
    ``top`` are scratch), flip the first ``k`` and return the index in the kernel of the element
    handed on."""
    for j in range(ksize):
        keys[j] = eq_key(err[j * inner + i], x[j * inner + i], j, up, t_min, t_max)
    select_top(keys, ksize, k if overshoot else k + 1, top)
    for t in range(k):
        flip(key_index(top[t]) * inner + i, up, x, err, value, t_min, t_max)
    return key_index(top[k - 1] if overshoot else top[k])


@njit(cache=True)
def kernel_pass(x, err, value, inner, ksize, t_min, t_max, scratch):
    """EQ and KQ on a channel held transposed (``x`` filled by ``transpose_in``); records what
    each kernel hands on to CQ.

    Every priority of the layer is reset to 0 before the kernels run, so afterwards the only
    non-zero priority of kernel ``i`` is the one its step 5 set: ``hand_priority[i]`` in the up
    (``hand_up[i]``) or down direction of the channel's element ``hand_index[i]``.

    (The native library's C code does this for 3x3 kernels: :mod:`kernels.native_passes`.)
    """
    (keys, top, hand_index, hand_up, hand_priority,
     total, magnitude, flips, first, second, last, group, partials) = scratch[:13]
    _eq_and_kernel_sums(x, err, value, inner, ksize, total, magnitude, flips, group, partials)
    _kernel_order_heads(x, err, inner, ksize, total, t_min, t_max, first, second, last)
    _kernel_decisions(total, first, second, last, inner, ksize, flips, hand_index, hand_up)
    for i in range(inner):  # step 4 with the first two of the order, without branches
        up = total[i] < 0
        for place, key in ((1, first[i]), (2, second[i])):
            p = key_index(key) * inner + i
            flipped_value, flipped_err = flipped(x[p], up, t_min, t_max)
            chosen = flips[i] >= place
            value[p] = flipped_value if chosen else value[p]
            err[p] = flipped_err if chosen else err[p]
    for i in range(inner):  # more than two of the order needed (rare): select, flip, hand on
        if flips[i] < 0:
            up, k, overshoot = flip_count(total[i])
            hand_index[i] = i * ksize + flip_by_order(x, err, value, i, inner, ksize, up, k,
                                                      overshoot, t_min, t_max, keys, top)
    for i in range(inner):  # the priority handed on is the element's current error
        j = hand_index[i] - i * ksize
        hand_priority[i] = abs(err[j * inner + i])


@njit(cache=True)
def transpose_in(w, scale, zero, inner, ksize, x):
    """A channel ``w`` (``i*ksize + j`` order) on the grid, ``x = S*w - Z``, transposed."""
    for i in range(inner):
        kernel = w[i * ksize : (i + 1) * ksize]  # read in order, write strided
        for j in range(ksize):
            x[j * inner + i] = scale * kernel[j] - zero


@njit(cache=True)
def transpose_out(value, inner, ksize, t_min, t_max, codes):
    """Clamp the transposed values into the channel's codes (``i*ksize + j`` order)."""
    for j in range(ksize):
        column = codes[j::ksize]
        row = value[j * inner : (j + 1) * inner]
        for i in range(inner):
            column[i] = np.int8(min(max(row[i], t_min), t_max))
