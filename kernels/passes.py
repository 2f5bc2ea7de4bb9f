"""KQ and CQ over one channel, and the parallel loop over a ragged batch of channels.

One channel at a time, fused: grid, EQ, KQ over its kernels, CQ, clamp, so its data stays in
cache. The batch is described by flat per-channel tables, so one ``prange`` covers every
channel of every weight; channels are grouped by the caller into blocks of similar work, and a
block allocates its scratch once. Each channel's result depends on that channel alone: the codes
are the same for any number of threads.
"""

import numpy as np
from numba import njit, prange

from .exact_sum import group_error_sum
from .flip import flip_step, make_key
from .grid import channel_min_max, current_code, current_error, eq_priority, grid_params

KERNEL_PASS = 1  # run KQ (on weights whose kernels have more than one element)
CHANNEL_PASS = 2  # run CQ
SYMMETRIC = 4  # symmetric grid instead of the asymmetric default
GIVEN_RANGE = 8  # use the caller's per-channel [lo, hi] instead of the channel's min and max


@njit(cache=True)
def _fill_eq_keys(x, base, size, up, t_min, t_max, priority, priority_bits, keys):
    """Order keys of ``x[base:base+size]`` from their EQ priorities in one direction."""
    for i in range(size):
        priority[i] = eq_priority(x[base + i], up, t_min, t_max)
        keys[i] = make_key(priority_bits[i], i)


@njit(cache=True)
def _kernel_pass(x, state, inner, ksize, t_min, t_max, scratch):
    """KQ: the flip step on every kernel, ordered by EQ priorities; records what each hands on."""
    keys, top, priority, priority_bits, hand_index, hand_direction, hand_priority = scratch
    for i in range(inner):
        base = i * ksize
        error_sum = group_error_sum(x, state, base, base + ksize, t_min, t_max)
        _fill_eq_keys(x, base, ksize, error_sum < 0, t_min, t_max, priority, priority_bits, keys)
        j, direction = flip_step(error_sum, keys, ksize, top, state, base)
        hand_index[i] = base + j
        hand_direction[i] = direction
        hand_priority[i] = abs(current_error(x[base + j], state[base + j], t_min, t_max))


@njit(cache=True)
def _channel_pass(x, state, inner, ksize, after_kernels, t_min, t_max, scratch):
    """CQ: the flip step on the whole channel.

    After KQ the only non-zero priorities are the ones each kernel handed on; otherwise they are
    EQ's. The channel's own hand-on has no next level and is dropped.
    """
    keys, top, priority, priority_bits, hand_index, hand_direction, hand_priority = scratch
    size = inner * ksize
    error_sum = group_error_sum(x, state, 0, size, t_min, t_max)
    up = error_sum < 0
    if after_kernels:
        direction = 1 if up else -1
        for i in range(size):
            keys[i] = make_key(0, i)
        for i in range(inner):
            if hand_direction[i] == direction:
                priority[0] = hand_priority[i]
                keys[hand_index[i]] = make_key(priority_bits[0], hand_index[i])
    else:
        _fill_eq_keys(x, 0, size, up, t_min, t_max, priority, priority_bits, keys)
    flip_step(error_sum, keys, size, top, state, 0)


@njit(cache=True)
def _allocate_scratch(max_size, max_inner):
    priority = np.empty(max_size, np.float32)
    return (
        np.empty(max_size, np.int64),  # keys
        np.empty(max_size, np.int64),  # top of the order
        priority,
        priority.view(np.int32),  # the same memory as bits, for the keys
        np.empty(max_inner, np.int64),  # per kernel: the element handed on,
        np.empty(max_inner, np.int8),  # the direction of its priority,
        np.empty(max_inner, np.float32),  # and the priority
    )


@njit(cache=True)
def quantize_channel(w, start, inner, ksize, bits, flags, lo, hi, codes, x, state, scratch):
    """Quantize one channel ``w[start:start + inner*ksize]`` into ``codes``; returns (S, Z)."""
    size = inner * ksize
    if not flags & GIVEN_RANGE:
        lo, hi = channel_min_max(w, start, start + size)
    scale, zero, t_min, t_max = grid_params(lo, hi, bits, flags & SYMMETRIC != 0)
    for i in range(size):
        x[i] = scale * w[start + i] - zero
        state[i] = 0
    after_kernels = (flags & KERNEL_PASS != 0) and ksize > 1
    if after_kernels:
        _kernel_pass(x, state, inner, ksize, t_min, t_max, scratch)
    if flags & CHANNEL_PASS:
        _channel_pass(x, state, inner, ksize, after_kernels, t_min, t_max, scratch)
    for i in range(size):
        codes[start + i] = np.int8(current_code(x[i], state[i], t_min, t_max))
    return scale, zero


@njit(cache=True, parallel=True)
def quantize_batch(w, ch_start, ch_inner, ch_ksize, ch_bits, ch_flags, ch_lo, ch_hi,
                   block_start, codes, scale, zero):
    """Quantize every channel of a ragged batch in one parallel loop.

    ``w`` is the flat float32 buffer of all weights, each laid out ``(O, I, K)``; channel ``c``
    is ``w[ch_start[c] : ch_start[c] + ch_inner[c] * ch_ksize[c]]`` with its bits and flags
    (``KERNEL_PASS | CHANNEL_PASS | SYMMETRIC | GIVEN_RANGE``) and, with ``GIVEN_RANGE``, its
    range ``[ch_lo[c], ch_hi[c]]``. Blocks ``block_start[b] .. block_start[b+1]-1`` of channels
    are the parallel work items. Writes ``codes`` (int8, like ``w``), ``scale`` and ``zero``
    (float32, one per channel).
    """
    for b in prange(block_start.shape[0] - 1):
        first, last = block_start[b], block_start[b + 1]
        max_size = 1
        max_inner = 1
        for c in range(first, last):
            max_size = max(max_size, ch_inner[c] * ch_ksize[c])
            max_inner = max(max_inner, ch_inner[c])
        x = np.empty(max_size, np.float32)
        state = np.empty(max_size, np.int8)
        scratch = _allocate_scratch(max_size, max_inner)
        for c in range(first, last):
            scale[c], zero[c] = quantize_channel(
                w, ch_start[c], ch_inner[c], ch_ksize[c], ch_bits[c], ch_flags[c],
                ch_lo[c], ch_hi[c], codes, x, state, scratch)

