"""EQ, KQ and CQ over one channel, and the parallel loop over a ragged batch of channels.

One channel at a time, fused: grid, EQ, KQ over its kernels, CQ, clamp, so its data stays in
cache. The batch is described by flat per-channel tables, so one ``prange`` covers every
channel of every weight; the caller groups channels into blocks of similar work, and a block
allocates its scratch once. Each channel's result depends on that channel alone: the codes are
the same for any number of threads.
"""

import numpy as np
from numba import njit, prange

from .exact_sum import error_sum
from .flip import (
    LARGEST_KEY,
    SMALLEST_KEY,
    flip_count,
    flip_first,
    key_index,
    make_key,
    select_top,
)
from .grid import channel_range, flip, grid_params

KERNEL_PASS = 1  # run KQ (on weights whose kernels have more than one element)
CHANNEL_PASS = 2  # run CQ
SYMMETRIC = 4  # symmetric grid instead of the asymmetric default
GIVEN_RANGE = 8  # use the caller's per-channel [lo, hi] instead of the channel's min and max


@njit(cache=True, inline="always")
def _eq_key(x, err, i, up, t_min, t_max):
    """Order key of element ``i`` by its EQ priority in one direction: ``|e|`` where it has a
    candidate, else 0 (``err[i]`` still holds its EQ error ``e``)."""
    e = err[i]
    xi = x[i]
    zero = np.float32(0.0)
    candidate = (up & (e < zero) & (xi < t_max)) | (~up & (e > zero) & (xi > t_min))
    return make_key(abs(e) * np.float32(candidate), i)


@njit(cache=True, inline="always")
def _eq_keys(x, err, up, t_min, t_max, keys):
    """Order keys of a group (``x``, ``err`` its slices) by EQ priority in one direction."""
    for i in range(x.shape[0]):
        keys[i] = _eq_key(x, err, i, up, t_min, t_max)


@njit(cache=True)
def _kernel_pass(x, err, value, ksize, t_min, t_max, scratch):
    """KQ: the flip step on every kernel, ordered by EQ priorities; records what each hands on.

    Every priority of the layer is reset to 0 before the kernels run, so afterwards the only
    non-zero priority of a kernel is the one its step 5 set: ``hand_priority`` in the up
    (``hand_up``) or down direction of element ``hand_index``. The first two and the last of a
    kernel's order come from one pass; only kernels needing more take the general selection.
    """
    keys, top, hand_index, hand_up, hand_priority, _ = scratch
    for i in range(x.shape[0] // ksize):
        base = i * ksize
        kx, kerr, kvalue = x[base : base + ksize], err[base : base + ksize], value[base : base + ksize]
        up, k, overshoot = flip_count(error_sum(kerr))
        first = SMALLEST_KEY
        second = SMALLEST_KEY
        last = LARGEST_KEY
        for j in range(ksize):
            key = _eq_key(kx, kerr, j, up, t_min, t_max)
            second = max(second, min(key, first))
            first = max(first, key)
            last = min(last, key)
        needed = k if overshoot else k + 1  # k < |sum| <= ksize / 2 when not overshooting
        if needed > 2:
            _eq_keys(kx, kerr, up, t_min, t_max, keys)
            select_top(keys, ksize, needed, top)
        else:
            top[0] = first
            top[1] = second
        flip_first(top, k, up, kx, kerr, kvalue, t_min, t_max)
        if overshoot:  # flipped a little too much: the last flipped may flip back
            handed, handed_up = (top[k - 1] if k > 0 else last), not up
        else:  # a little too little: the next in line may flip
            handed, handed_up = top[k], up
        j = key_index(handed)
        hand_index[i] = base + j
        hand_up[i] = handed_up
        hand_priority[i] = abs(kerr[j])


@njit(cache=True)
def _channel_pass(x, err, value, inner, after_kernels, t_min, t_max, scratch):
    """CQ: the flip step on the whole channel, with the priorities that KQ left (or EQ's).

    Only the first ``k`` of the order are flipped; the channel's hand-on (step 5) has no next
    level and is skipped.
    """
    keys, top, hand_index, hand_up, hand_priority, _ = scratch
    up, k, _ = flip_count(error_sum(err))
    if k == 0:
        return
    if not after_kernels:
        _eq_keys(x, err, up, t_min, t_max, keys)
        select_top(keys, x.shape[0], k, top)
        flip_first(top, k, up, x, err, value, t_min, t_max)
        return
    # After KQ the non-zero priorities are the ones the kernels handed on in this direction,
    # ordered first; every other element follows in index order.
    count = 0
    for i in range(inner):
        if (hand_up[i] == up) & (hand_priority[i] > 0):
            keys[count] = make_key(hand_priority[i], count)
            hand_index[count] = hand_index[i]  # compacted in place: i >= count
            count += 1
    first = min(k, count)
    select_top(keys, count, first, top)
    for t in range(first):
        flip(hand_index[key_index(top[t])], up, x, err, value, t_min, t_max)
    candidate = 0
    element = 0
    for _ in range(k - first):
        while candidate < count and hand_index[candidate] == element:
            candidate += 1
            element += 1
        flip(element, up, x, err, value, t_min, t_max)
        element += 1


@njit(cache=True)
def _allocate_scratch(max_size, max_inner):
    return (
        np.empty(max_size, np.int64),  # order keys of the group being flipped
        np.empty(max(max_size, 2), np.int64),  # the first keys of its order
        np.empty(max_inner, np.int64),  # per kernel: the element handed on,
        np.empty(max_inner, np.bool_),  # whether its up (or down) priority was set,
        np.empty(max_inner, np.float32),  # and that priority;
        np.empty(2, np.int32),  # a channel's range, as float32 bit patterns
    )


@njit(cache=True)
def _round_only(w, scale, zero, t_min, t_max, codes):
    """Mode E: round to nearest, half to even, and clamp."""
    for i in range(w.shape[0]):
        r = np.rint(scale * w[i] - zero)
        codes[i] = np.int8(min(max(r, t_min), t_max))


@njit(cache=True)
def quantize_channel(w, w_bits, inner, ksize, bits, flags, lo, hi, codes, x, err, value, scratch):
    """Quantize one channel ``w`` (its slice; ``w_bits`` the same memory as int32) into its
    slice of ``codes``. ``x``, ``err``, ``value`` and ``scratch`` are scratch space.

    Returns ``(S, Z, finite)``; with a NaN or Inf in the channel (``finite`` False) nothing is
    written.
    """
    size = w.shape[0]
    if not flags & GIVEN_RANGE:
        range_bits = scratch[-1]
        if not channel_range(w_bits, range_bits):
            return np.float32(0.0), np.float32(0.0), False
        range_floats = range_bits.view(np.float32)
        lo, hi = range_floats[0], range_floats[1]
    scale, zero, t_min, t_max = grid_params(lo, hi, bits, flags & SYMMETRIC != 0)
    after_kernels = (flags & KERNEL_PASS != 0) and ksize > 1
    channel_pass = flags & CHANNEL_PASS != 0
    if not (after_kernels or channel_pass):
        _round_only(w, scale, zero, t_min, t_max, codes)
        return scale, zero, True
    x, err, value = x[:size], err[:size], value[:size]
    for i in range(size):  # EQ
        xi = scale * w[i] - zero
        r = np.rint(xi)
        x[i] = xi
        err[i] = r - xi
        value[i] = r
    if after_kernels:
        _kernel_pass(x, err, value, ksize, t_min, t_max, scratch)
    if channel_pass:
        _channel_pass(x, err, value, inner, after_kernels, t_min, t_max, scratch)
    for i in range(size):
        codes[i] = np.int8(min(max(value[i], t_min), t_max))
    return scale, zero, True


@njit(cache=True, parallel=True)
def quantize_batch(w, ch_start, ch_inner, ch_ksize, ch_bits, ch_flags, ch_lo, ch_hi,
                   block_start, codes, scale, zero, finite):
    """Quantize every channel of a ragged batch in one parallel loop.

    ``w`` is the flat float32 buffer of all weights, each laid out ``(O, I, K)``; channel ``c``
    is ``w[ch_start[c] : ch_start[c] + ch_inner[c] * ch_ksize[c]]`` with its bits and flags
    (``KERNEL_PASS | CHANNEL_PASS | SYMMETRIC | GIVEN_RANGE``) and, with ``GIVEN_RANGE``, its
    range ``[ch_lo[c], ch_hi[c]]``. Blocks ``block_start[b] .. block_start[b+1]-1`` of channels
    are the parallel work items. Writes ``codes`` (int8, like ``w``), ``scale`` and ``zero``
    (float32, one per channel) and ``finite`` (False for a channel holding a NaN or Inf, whose
    other outputs are then meaningless).
    """
    w_bits = w.view(np.int32)
    for b in prange(block_start.shape[0] - 1):
        first, last = block_start[b], block_start[b + 1]
        max_size = 1
        max_inner = 1
        for c in range(first, last):
            max_size = max(max_size, ch_inner[c] * ch_ksize[c])
            max_inner = max(max_inner, ch_inner[c])
        x = np.empty(max_size, np.float32)
        err = np.empty(max_size, np.float32)
        value = np.empty(max_size, np.float32)
        scratch = _allocate_scratch(max_size, max_inner)
        for c in range(first, last):
            start = ch_start[c]
            stop = start + ch_inner[c] * ch_ksize[c]
            scale[c], zero[c], finite[c] = quantize_channel(
                w[start:stop], w_bits[start:stop], ch_inner[c], ch_ksize[c], ch_bits[c],
                ch_flags[c], ch_lo[c], ch_hi[c], codes[start:stop], x, err, value, scratch)
