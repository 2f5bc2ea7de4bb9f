"""KQ on 3x3 kernels with the native library's AVX2 code (``native/kernel_pass_3x3.c``), and the
scalar pass on one kernel that finishes the kernels that code leaves.

The native code is called through its address (the library's ``squant_kernel_pass_3x3``, which
the driver hands to ``quantize_block``), so numba's compiled code names no external symbol: the
same functions run, and are cached, with the address 0, where ``kernel_pass`` runs its own loops.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .exact_sum import error_sum
from .flip import LARGEST_KEY, SMALLEST_KEY, eq_key, flip_count, key_index, select_top
from .grid import flip

KSIZE = 9  # the kernels the native code takes: 3x3


@intrinsic
def _call_native(typingctx, address, x, err, value, inner, t_min, t_max, state, hand_index,
                 hand_up, hand_priority):
    """Call the C function at ``address`` (int64) with ``squant_kernel_pass_3x3``'s arguments:
    int64 addresses and counts, float32 ``t_min`` and ``t_max``. Returns its int64 result."""
    address_types = (x, err, value, inner, state, hand_index, hand_up, hand_priority)
    if not all(isinstance(t, types.Integer) for t in (address, *address_types)):
        return None
    signature = types.int64(types.int64, types.int64, types.int64, types.int64, types.int64,
                            types.float32, types.float32, types.int64, types.int64, types.int64,
                            types.int64)

    def codegen(context, builder, sig, args):
        i64, f32 = ir.IntType(64), ir.FloatType()
        function = ir.FunctionType(i64, [i64, i64, i64, i64, f32, f32, i64, i64, i64, i64])
        pointer = builder.inttoptr(args[0], function.as_pointer())
        return builder.call(pointer, args[1:])

    return signature, codegen


@njit(cache=True)
def single_kernel_pass(x, err, value, i, inner, ksize, t_min, t_max, keys, top, hand_index,
                       hand_up, hand_priority, group, partials):
    """EQ and KQ on kernel ``i`` alone of a channel held transposed (see ``kernel_pass``), from
    ``x``: what ``kernel_pass`` computes for it, one element at a time. For the kernels the
    native code leaves."""
    for j in range(ksize):
        p = j * inner + i
        r = np.rint(x[p])
        value[p] = r
        err[p] = r - x[p]
        group[j] = err[p]
    up, k, overshoot = flip_count(error_sum(group[:ksize], partials))
    first = SMALLEST_KEY
    second = SMALLEST_KEY
    last = LARGEST_KEY
    for j in range(ksize):
        key = eq_key(err[j * inner + i], x[j * inner + i], j, up, t_min, t_max)
        second = max(second, min(key, first))
        first = max(first, key)
        last = min(last, key)
    place = k - 1 if overshoot else k  # place in the order of the element handed on
    if place < 2:
        if k >= 1:
            flip(key_index(first) * inner + i, up, x, err, value, t_min, t_max)
        if k >= 2:
            flip(key_index(second) * inner + i, up, x, err, value, t_min, t_max)
        handed = key_index(last if place < 0 else (first if place == 0 else second))
    else:
        for j in range(ksize):
            keys[j] = eq_key(err[j * inner + i], x[j * inner + i], j, up, t_min, t_max)
        select_top(keys, ksize, k if overshoot else k + 1, top)
        for t in range(k):
            flip(key_index(top[t]) * inner + i, up, x, err, value, t_min, t_max)
        handed = key_index(top[k - 1] if overshoot else top[k])
    hand_index[i] = i * ksize + handed
    hand_up[i] = up ^ overshoot  # overshoot: the opposite direction
    hand_priority[i] = abs(err[handed * inner + i])


@njit(cache=True)
def native_kernel_pass_3x3(address, x, err, value, inner, t_min, t_max, scratch):
    """``kernel_pass`` on a channel of 3x3 kernels by the native code at ``address``, and
    :func:`single_kernel_pass` on the kernels it leaves (state -1)."""
    keys, top, hand_index, hand_up, hand_priority = scratch[:5]
    state, group, partials = scratch[7], scratch[11], scratch[12]
    left = _call_native(address, np.int64(x.ctypes.data), np.int64(err.ctypes.data),
                        np.int64(value.ctypes.data), np.int64(inner), np.float32(t_min),
                        np.float32(t_max), np.int64(state.ctypes.data),
                        np.int64(hand_index.ctypes.data), np.int64(hand_up.ctypes.data),
                        np.int64(hand_priority.ctypes.data))
    if left == 0:
        return
    for i in range(inner):
        if state[i] < 0:
            single_kernel_pass(x, err, value, i, inner, KSIZE, t_min, t_max, keys, top,
                               hand_index, hand_up, hand_priority, group, partials)
