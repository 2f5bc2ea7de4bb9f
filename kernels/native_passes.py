"""The passes the native library holds in C with AVX2 intrinsics (``native/*.c``): KQ on 3x3
kernels, CQ after it, and CQ straight after EQ, called from numba's code through their
addresses, and the scalar pass on one kernel that finishes the kernels the C KQ leaves.

The native library hands ``quantize_block`` a table of the C functions' addresses (in the
order of :data:`kernels.constants.NATIVE_PASSES`, 0 for one it lacks) and the block's scratch
keeps a copy, so numba's compiled code names no external symbol. numba's JIT hands it None
instead: the dispatchers below are chosen by that slot's type when numba compiles, so the JIT
compiles none of this module's code (and none of its time).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .channel_pass import channel_pass_after_kernels
from .constants import NATIVE_PASSES
from .exact_sum import error_sum
from .flip import LARGEST_KEY, SMALLEST_KEY, eq_key, flip_count, key_index
from .grid import flip
from .kernel_pass import flip_by_order, transpose_out
from .memory import view_at

KSIZE = 9  # the kernels the native code takes: 3x3


def _c_codegen(arguments):
    """Code that calls the C function at the int64 address ``args[0]`` with ``args[1:]``, int64
    (``"i"``), float32 (``"f"``) or float64 (``"d"``) as ``arguments`` says, and returns its
    int64 result."""
    llvm_types = {"i": ir.IntType(64), "f": ir.FloatType(), "d": ir.DoubleType()}

    def codegen(context, builder, sig, args):
        function = ir.FunctionType(ir.IntType(64), [llvm_types[a] for a in arguments])
        return builder.call(builder.inttoptr(args[0], function.as_pointer()), args[1:])

    return codegen


_I, _F, _D = types.int64, types.float32, types.float64


@intrinsic
def kernel_pass_3x3_in_c(typingctx, address, w, scale, zero, x, err, value, inner, t_min, t_max,
                         state, hand_index, hand_up, hand_priority, channel_sum, codes):
    """``squant_kernel_pass_3x3`` at ``address`` (kernels/native/kernel_pass_3x3.c): arrays by
    their addresses (int64), ``inner`` int64, the grid's four numbers float32."""
    return (types.int64(_I, _I, _F, _F, _I, _I, _I, _I, _F, _F, _I, _I, _I, _I, _I, _I),
            _c_codegen("iffiiiiffiiiiii"))


@intrinsic
def channel_pass_handed_in_c(typingctx, address, x, inner, ksize, t_min, t_max, hand_index,
                             hand_up, hand_priority, total, codes):
    """``squant_channel_pass_handed`` at ``address`` (kernels/native/channel_pass_handed.c):
    arrays by their addresses (int64), ``inner`` and ``ksize`` int64, ``t_min`` and ``t_max``
    float32, ``total`` float64."""
    return (types.int64(_I, _I, _I, _I, _F, _F, _I, _I, _I, _D, _I),
            _c_codegen("iiiffiiidi"))


@intrinsic
def channel_pass_eq_in_c(typingctx, address, w, size, scale, zero, t_min, t_max, codes):
    """``squant_channel_pass_eq`` at ``address`` (kernels/native/channel_pass_eq.c): arrays by
    their addresses (int64), ``size`` int64, the grid's four numbers float32."""
    return types.int64(_I, _I, _I, _F, _F, _F, _F, _I), _c_codegen("iiffffi")


@njit(cache=True, inline="always")
def address_of(array):
    """The address of ``array``'s first element as an int64."""
    return np.int64(array.ctypes.data)


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
        handed = flip_by_order(x, err, value, i, inner, ksize, up, k, overshoot, t_min, t_max,
                               keys, top)
    hand_index[i] = i * ksize + handed
    hand_up[i] = up ^ overshoot  # overshoot: the opposite direction
    hand_priority[i] = abs(err[handed * inner + i])


@njit(cache=True)
def native_kernels_3x3(native, w, scale, zero, inner, t_min, t_max, channel_pass, codes, x, err,
                       value, scratch):
    """``transpose_in``, ``kernel_pass``, CQ (with ``channel_pass``) and ``transpose_out`` on a
    channel ``w`` of 3x3 kernels into its ``codes``, by the C code whose addresses ``native``
    holds (KQ's is not 0): :func:`single_kernel_pass` on the kernels the C KQ leaves (state
    -1), and numba's CQ where the C CQ is missing or declines. The same codes as numba's."""
    keys, top, hand_index, hand_up, hand_priority = scratch[:5]
    state, group, partials = scratch[7], scratch[11], scratch[12]
    left = kernel_pass_3x3_in_c(native[0], address_of(w), np.float32(scale), np.float32(zero),
                                address_of(x), address_of(err), address_of(value),
                                np.int64(inner), np.float32(t_min), np.float32(t_max),
                                address_of(state), address_of(hand_index), address_of(hand_up),
                                address_of(hand_priority), address_of(partials),
                                address_of(codes))
    error_total = partials[0]  # NaN unless exact; read now: single_kernel_pass takes partials
    if left != 0:
        for i in range(inner):
            if state[i] < 0:
                single_kernel_pass(x, err, value, i, inner, KSIZE, t_min, t_max, keys, top,
                                   hand_index, hand_up, hand_priority, group, partials)
                for j in range(KSIZE):
                    codes[i * KSIZE + j] = np.int8(min(max(value[j * inner + i], t_min), t_max))
    if not channel_pass:
        return
    if np.isnan(error_total):  # kernels left to numba, or errors past the fast sum's bound
        error_total = error_sum(err, partials)
    if native[2] != 0 and channel_pass_handed_in_c(
            native[2], address_of(x), np.int64(inner), np.int64(KSIZE), np.float32(t_min),
            np.float32(t_max), address_of(hand_index), address_of(hand_up),
            address_of(hand_priority), np.float64(error_total), address_of(codes)) == 1:
        return
    channel_pass_after_kernels(x, err, value, inner, KSIZE, t_min, t_max, scratch, error_total)
    transpose_out(value, inner, KSIZE, t_min, t_max, codes)


def native_slot(native_passes, address):
    """The block's slot of the C passes' addresses: None for ``native_passes`` None (numba's
    JIT), else the ``len(NATIVE_PASSES)`` int64 at ``address``, copied from the table at the
    address ``native_passes`` (all 0 for 0). Compiled code only (see :func:`_native_slot`)."""
    raise NotImplementedError("a numba dispatcher: call it from compiled code")


@overload(native_slot)
def _native_slot(native_passes, address):
    if isinstance(native_passes, types.NoneType):
        return lambda native_passes, address: None

    def fill(native_passes, address):
        slot = view_at(address, len(NATIVE_PASSES), np.int64)
        table = view_at(native_passes, len(NATIVE_PASSES), np.int64)  # read only if not 0
        for p in range(slot.shape[0]):  # a loop: an array assignment may allocate a copy
            slot[p] = 0 if native_passes == 0 else table[p]
        return slot

    return fill


def kernels_by_c(native, w, scale, zero, inner, ksize, t_min, t_max, channel_pass, codes, x,
                 err, value, scratch):
    """Whether the C code (when ``native``, the slot of :func:`native_slot`, holds it, and the
    kernels are 3x3) quantized the channel ``w`` on the grid after EQ: KQ, then CQ with
    ``channel_pass``, into ``codes`` (:func:`native_kernels_3x3`). Compiled code only."""
    raise NotImplementedError("a numba dispatcher: call it from compiled code")


@overload(kernels_by_c)
def _kernels_by_c(native, w, scale, zero, inner, ksize, t_min, t_max, channel_pass, codes, x,
                  err, value, scratch):
    if isinstance(native, types.NoneType):
        return (lambda native, w, scale, zero, inner, ksize, t_min, t_max, channel_pass, codes, x,
                err, value, scratch: False)

    def run(native, w, scale, zero, inner, ksize, t_min, t_max, channel_pass, codes, x, err,
            value, scratch):
        if ksize != KSIZE or native[0] == 0:
            return False
        native_kernels_3x3(native, w, scale, zero, inner, t_min, t_max, channel_pass, codes, x,
                           err, value, scratch)
        return True

    return run


def channel_pass_eq_by_c(native, w, scale, zero, t_min, t_max, codes):
    """Whether the C code (when ``native``, the slot of :func:`native_slot`, holds it) did
    ``channel_pass_eq`` on the channel ``w`` into ``codes``. Compiled code only."""
    raise NotImplementedError("a numba dispatcher: call it from compiled code")


@overload(channel_pass_eq_by_c)
def _channel_pass_eq_by_c(native, w, scale, zero, t_min, t_max, codes):
    if isinstance(native, types.NoneType):
        return lambda native, w, scale, zero, t_min, t_max, codes: False

    def run(native, w, scale, zero, t_min, t_max, codes):
        return native[1] != 0 and channel_pass_eq_in_c(
            native[1], address_of(w), np.int64(w.shape[0]), np.float32(scale), np.float32(zero),
            np.float32(t_min), np.float32(t_max), address_of(codes)) == 1

    return run
