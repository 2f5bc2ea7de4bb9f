"""EQ, KQ and CQ over one channel, and the loop over blocks of a ragged batch of channels.

One channel at a time, fused: grid, EQ, KQ over its kernels, CQ, clamp, so its data stays in
cache. The batch is described by flat per-channel tables, so one loop covers every channel of
every weight; the caller groups channels into blocks of similar work (a block allocates its
scratch once) and runs disjoint block ranges on its threads (the loop releases the GIL). Each
channel's result depends on that channel alone: the codes are the same for any number of
threads. Nothing here is ``parallel=True``: numba's parallel lowering would add seconds to the
first-ever call's compile.
"""

import numpy as np
from numba import njit

from .channel_pass import channel_pass_after_kernels, channel_pass_eq
from .constants import (
    CHANNEL_PASS,
    GIVEN_RANGE,
    INCLUDE_ZERO,
    KERNEL_PASS,
    MAX_PARTIALS,
    NO_MOMENTS,
    RANGE_FIT,
    RANGE_FLOOR,
    RANGE_SEARCH,
    SHRINK_FACTORS,
    SYMMETRIC,
    scratch_layout,
)
from .exact_sum import error_sum
from .fit import fit_error, fit_factors, fit_windows, window_error, write_lattice_codes
from .grid import channel_range, grid_params
from .kernel_pass import kernel_pass, transpose_in, transpose_out
from .memory import unowned, view_at
from .native_passes import channel_pass_eq_by_c, kernels_by_c, native_slot

_layout = njit(cache=True, inline="always")(scratch_layout)


@njit(cache=True, inline="always")
def _scratch_at(base, max_size, max_inner, max_ksize, native_passes):
    """The scratch arrays of a block (see :func:`kernels.constants.scratch_layout`) in the
    buffer at address ``base``: ``(x, err, value, scratch, range_bits, trial)``, views that
    hold no reference to it; ``scratch[13]`` is :func:`kernels.native_passes.native_slot`'s."""
    at = _layout(max_size, max_inner, max_ksize)
    floats = view_at(base + at[0], 3 * max_size, np.float32)
    scratch = (
        view_at(base + at[1], max_size, np.int64),  # order keys of the group being flipped
        view_at(base + at[2], max(max_size, 2), np.int64),  # the first keys of its order
        view_at(base + at[3], max_inner, np.int64),  # per kernel: the element handed on,
        view_at(base + at[4], max_inner, np.bool_),  # whether its up (or down) priority was set,
        view_at(base + at[5], max_inner, np.float32),  # and that priority;
        view_at(base + at[6], max_inner, np.float64),  # per kernel: its error sum,
        view_at(base + at[7], max_inner, np.float64),  # the sum of the errors' magnitudes,
        view_at(base + at[8], max_inner, np.int64),  # how many errors are too fine to sum fast,
        view_at(base + at[9], max_inner, np.int64),  # the first,
        view_at(base + at[10], max_inner, np.int64),  # second,
        view_at(base + at[11], max_inner, np.int64),  # and last key of its order;
        view_at(base + at[12], max_ksize, np.float32),  # one kernel's errors, gathered
        view_at(base + at[13], MAX_PARTIALS, np.float64),  # an exact sum's partials
        native_slot(native_passes, base + at[16]),  # the C passes' addresses, or None
    )
    return (floats[:max_size], floats[max_size : 2 * max_size], floats[2 * max_size :], scratch,
            view_at(base + at[14], 2, np.int32), view_at(base + at[15], max_size, np.int8))


@njit(cache=True)
def _round_only(w, scale, zero, t_min, t_max, codes):
    """Mode E: round to nearest, half to even, and clamp."""
    for i in range(w.shape[0]):
        r = np.rint(scale * w[i] - zero)
        codes[i] = np.int8(min(max(r, t_min), t_max))


@njit(cache=True, inline="always")  # a call costs more than EQ on a group of a few dozen
def _quantize_on_grid(w, inner, ksize, bits, flags, lo, hi, codes, x, err, value, scratch):
    """Quantize one channel ``w`` on the grid of the range ``[lo, hi]``: EQ, then KQ and CQ as
    ``flags`` say, and the clamp, into ``codes``. Returns ``(S, Z)``."""
    size = w.shape[0]
    scale, zero, t_min, t_max = grid_params(lo, hi, bits, flags & SYMMETRIC != 0)
    after_kernels = (flags & KERNEL_PASS != 0) and ksize > 1
    channel_pass = flags & CHANNEL_PASS != 0
    if not (after_kernels or channel_pass) or not scale > 0:  # S = 0: the caller reports it
        _round_only(w, scale, zero, t_min, t_max, codes)
        return scale, zero
    x, err, value = x[:size], err[:size], value[:size]
    if not after_kernels:
        if not channel_pass_eq_by_c(scratch[13], w, scale, zero, t_min, t_max, codes):
            channel_pass_eq(w, scale, zero, t_min, t_max, codes, x, err, scratch[0], scratch[1],
                            scratch[12])
        return scale, zero
    if kernels_by_c(scratch[13], w, scale, zero, inner, ksize, t_min, t_max, channel_pass, codes,
                    x, err, value, scratch):
        return scale, zero
    transpose_in(w, scale, zero, inner, ksize, x)
    kernel_pass(x, err, value, inner, ksize, t_min, t_max, scratch)
    if channel_pass:
        channel_pass_after_kernels(x, err, value, inner, ksize, t_min, t_max, scratch,
                                   error_sum(err, scratch[12]))
    transpose_out(value, inner, ksize, t_min, t_max, codes)
    return scale, zero


@njit(cache=True, fastmath={"reassoc", "contract"})
def reconstruction_error(w, codes, scale, zero):
    """``sum((w - (codes + Z) / S)**2)`` in float64: how far the dequantized channel is from it.

    The sum may be reordered (``reassoc``), so that it vectorises; the order is fixed at compile
    time, so the result is still the same on every call.
    """
    step = 1.0 / np.float64(scale)
    z = np.float64(zero)
    total = 0.0
    for i in range(w.shape[0]):
        d = np.float64(w[i]) - (np.float64(codes[i]) + z) * step
        total += d * d
    return total


@njit(cache=True, fastmath={"reassoc", "contract"})
def output_error(w, codes, scale, zero, ksize, moments):
    """The expected squared error the dequantized channel adds to its output, for inputs that
    are independent per element with, for input channel ``c``, variance ``moments[c]`` and mean
    ``moments[inner + c]`` (the same for its ``ksize`` kernel positions):
    ``sum_i var_i * d_i**2 + (sum_i mean_i * d_i)**2``, ``d = w - (codes + Z) / S``, float64.

    With unit variances and zero means it is :func:`reconstruction_error`. A mean weighs the
    errors' sum: a channel fed by large positive inputs (after a ReLU) wants errors that cancel.
    """
    step = 1.0 / np.float64(scale)
    z = np.float64(zero)
    inner = w.shape[0] // ksize
    spread = 0.0
    shift = 0.0
    for c in range(inner):
        squares = 0.0
        total = 0.0
        for k in range(ksize):
            i = c * ksize + k
            d = np.float64(w[i]) - (np.float64(codes[i]) + z) * step
            squares += d * d
            total += d
        spread += moments[c] * squares
        shift += moments[inner + c] * total
    return spread + shift * shift


@njit(cache=True)
def _channel_error(w, codes, scale, zero, ksize, moments):
    """The error the range search minimises: :func:`output_error` if the channel has input
    moments (``moments`` not empty), else :func:`reconstruction_error`."""
    if moments.shape[0] == 0:
        return reconstruction_error(w, codes, scale, zero)
    return output_error(w, codes, scale, zero, ksize, moments)


@njit(cache=True)
def _search_range(w, inner, ksize, bits, flags, lo, hi, scale, zero, codes, x, err, value,
                  scratch, trial, moments):
    """Given the channel quantized on its full range ``[lo, hi]`` (``codes``, ``scale``,
    ``zero``), quantize it again on each shrunk range ``[f*lo, f*hi]`` of ``SHRINK_FACTORS``
    (into ``trial``) and keep in ``codes`` the one whose error (:func:`_channel_error`) is
    least, the earliest on ties. Returns the kept ``(S, Z)``.

    Clipping the few largest weights buys a finer grid for all the others; which trade-off is
    best depends on the channel's distribution, hence the search. Each candidate runs the very
    passes of the full range, so the error compared is the one the passes really leave.
    """
    best = _channel_error(w, codes, scale, zero, ksize, moments)
    trial = trial[: w.shape[0]]
    for f in SHRINK_FACTORS[1:]:
        s, z = _quantize_on_grid(w, inner, ksize, bits, flags, f * lo, f * hi, trial, x, err,
                                 value, scratch)
        error = _channel_error(w, trial, s, z, ksize, moments)
        if error < best:
            best, scale, zero = error, s, z
            for i in range(trial.shape[0]):  # a loop: slice assignment compiles shape checks
                codes[i] = trial[i]
    return scale, zero


@njit(cache=True)
def _fit_rounded(w, bits, flags, lo, hi, codes):
    """``range="fit"`` for round to nearest (mode E) on an asymmetric grid, in one function:
    the minmax grid of ``[lo, hi]`` and the candidates of :func:`_fit_range`, each evaluated
    in one pass without writing codes (:func:`kernels.fit.window_error`), the codes of the
    least error (minmax's on ties) written once. A grid with an integer zero point is a step
    ``1 / S`` and a window of ``2**b`` levels ``l .. l + 2**b - 1``: ``Z = l + 2**(b-1)``.
    Returns ``(S, Z)``."""
    n = np.float32(2 ** (bits - 1))
    count = np.float32(2**bits - 1)
    scale, zero, t_min, t_max = grid_params(lo, hi, bits, False)
    if not (scale > 0 and hi - lo > RANGE_FLOOR):  # exact, or S = 0 for the caller to report
        _round_only(w, scale, zero, t_min, t_max, codes)
        return scale, zero
    best_scale, best_bottom = scale, zero - n
    best = window_error(w, scale, best_bottom, best_bottom + count)
    for f in fit_factors(bits):
        s, first, last = fit_windows(scale, lo, hi, bits, f, flags & INCLUDE_ZERO != 0)
        b = first
        while b <= last:
            error = window_error(w, s, b, b + count)
            if error < best:
                best, best_scale, best_bottom = error, s, b
            b += np.float32(1.0)
    zero = best_bottom + n
    write_lattice_codes(w, best_scale, best_bottom, best_bottom + count, zero, codes)
    return best_scale, zero


@njit(cache=True)
def _fit_range(w, inner, ksize, bits, flags, lo, hi, scale, zero, codes, x, err, value, scratch,
               trial):
    """Given the channel quantized on its full range ``[lo, hi]`` (``codes``, ``scale``,
    ``zero``), quantize it again on each grid of :func:`kernels.fit.fit_windows` for each factor of
    :func:`kernels.fit.fit_factors` (into ``trial``; the very passes of the full range) and keep in
    ``codes`` the one whose :func:`kernels.fit.fit_error` is least, the earliest on ties.
    Returns the kept ``(S, Z)``. A symmetric grid has one window per step: ``[f*lo, f*hi]``.
    (Round to nearest on an asymmetric grid: :func:`_fit_rounded`.)
    """
    if not hi - lo > RANGE_FLOOR:  # all elements (about) equal: the minmax grid is exact
        return scale, zero
    symmetric = flags & SYMMETRIC != 0
    best = fit_error(w, codes, scale, zero)
    trial = trial[: w.shape[0]]
    levels = np.float64(2**bits - 1)
    minmax_scale = scale
    for f in fit_factors(bits):
        s, first, last = fit_windows(minmax_scale, lo, hi, bits, f, flags & INCLUDE_ZERO != 0)
        if symmetric:
            first, last = 0.0, 0.0
        start = first
        while start <= last:
            if symmetric:
                c_lo, c_hi = f * lo, f * hi
            else:
                c_lo, c_hi = np.float32(start / s), np.float32((start + levels) / s)
            t_s, t_z = _quantize_on_grid(w, inner, ksize, bits, flags, c_lo, c_hi, trial, x,
                                         err, value, scratch)
            error = fit_error(w, trial, t_s, t_z)
            if error < best:
                best, scale, zero = error, t_s, t_z
                for i in range(trial.shape[0]):
                    codes[i] = trial[i]
            start += 1.0
    return scale, zero


@njit(cache=True, inline="always")  # as _quantize_on_grid
def quantize_channel(w, w_bits, inner, ksize, bits, flags, lo, hi, codes, x, err, value, scratch,
                     range_scratch, trial, moments):
    """Quantize one channel ``w`` (its slice; ``w_bits`` the same memory as int32) into its
    slice of ``codes``. ``moments``: its inputs' variances and means (``2 * inner`` values, see
    :func:`output_error`) for the range search, or empty. The other arrays are scratch space
    (``trial``: candidate codes of the range search). With ``trial`` and ``moments`` None the
    range search is not compiled in (numba prunes the branch by the arguments' types);
    otherwise ``RANGE_SEARCH`` in ``flags`` turns it on.

    Returns ``(S, Z, finite)``; with a NaN or Inf in the channel (``finite`` False) nothing is
    written.
    """
    if not flags & GIVEN_RANGE:
        if not channel_range(w_bits, range_scratch):
            return np.float32(0.0), np.float32(0.0), False
        range_floats = range_scratch.view(np.float32)
        lo, hi = range_floats[0], range_floats[1]
    if flags & INCLUDE_ZERO:
        lo, hi = min(lo, np.float32(0.0)), max(hi, np.float32(0.0))
    if trial is not None and flags & (RANGE_FIT | RANGE_SEARCH | SYMMETRIC) == RANGE_FIT and not (
            flags & CHANNEL_PASS != 0 or (flags & KERNEL_PASS != 0 and ksize > 1)):
        scale, zero = _fit_rounded(w, bits, flags, lo, hi, codes)
        return scale, zero, True
    scale, zero = _quantize_on_grid(w, inner, ksize, bits, flags, lo, hi, codes, x, err, value,
                                    scratch)
    # S = 0 (max - min overflows float32) is the caller's to report: no search then
    if trial is not None:
        if flags & RANGE_SEARCH != 0 and scale > 0:
            scale, zero = _search_range(w, inner, ksize, bits, flags, lo, hi, scale, zero, codes, x,
                                        err, value, scratch, trial, moments)
        elif flags & RANGE_FIT != 0 and scale > 0:
            scale, zero = _fit_range(w, inner, ksize, bits, flags, lo, hi, scale, zero, codes, x,
                                     err, value, scratch, trial)
    return scale, zero, True


@njit(cache=True)
def _keep_alive(*arrays):
    """Nothing: a use of ``arrays`` after the last use of their unowned views."""
    return len(arrays)


@njit(cache=True, inline="always")
def block_extent(ch_inner, ch_ksize, first, last):
    """``(max_size, max_inner, max_ksize)`` over channels ``first .. last - 1``, each at least 1:
    what :func:`kernels.constants.scratch_layout` sizes a block's scratch for."""
    max_size = np.int64(1)  # not literal 1s: those would compile the callers twice
    max_inner = np.int64(1)
    max_ksize = np.int64(1)
    for c in range(first, last):
        max_size = max(max_size, ch_inner[c] * ch_ksize[c])
        max_inner = max(max_inner, ch_inner[c])
        max_ksize = max(max_ksize, ch_ksize[c])
    return max_size, max_inner, max_ksize


@njit(cache=True, inline="always")
def quantize_block(ch_address, ch_codes_address, ch_inner, ch_ksize, ch_bits, ch_flags, ch_lo,
                   ch_hi, scale, zero, finite, first, last, search_moments, ch_moments_start,
                   base, max_size, max_inner, max_ksize, native_passes):
    """Quantize channels ``first .. last - 1`` (see :func:`quantize_blocks`) with the scratch
    buffer at address ``base``, laid out for ``(max_size, max_inner, max_ksize)`` (at least the
    block's :func:`block_extent`). ``native_passes``: the address of the native library's table
    of its C passes (:data:`kernels.constants.NATIVE_PASSES`, see :mod:`kernels.native_passes`),
    or None for numba's code everywhere (the C passes' callers are then not compiled in).
    Allocates nothing."""
    x, err, value, scratch, range_scratch, trial = _scratch_at(base, max_size, max_inner,
                                                                max_ksize, native_passes)
    table = search_moments if search_moments is None else unowned(search_moments)
    for c in range(first, last):
        size = ch_inner[c] * ch_ksize[c]
        w = view_at(ch_address[c], size, np.float32)
        w_bits = view_at(ch_address[c], size, np.int32)
        codes = view_at(ch_codes_address[c], size, np.int8)
        if search_moments is None:
            scale[c], zero[c], finite[c] = quantize_channel(
                w, w_bits, ch_inner[c], ch_ksize[c], ch_bits[c], ch_flags[c], ch_lo[c],
                ch_hi[c], codes, x, err, value, scratch, range_scratch, None, None)
        else:
            start = ch_moments_start[c]
            inputs = table[:0]  # this channel's input moments, empty without
            if start != NO_MOMENTS:
                inputs = table[start : start + 2 * ch_inner[c]]
            scale[c], zero[c], finite[c] = quantize_channel(
                w, w_bits, ch_inner[c], ch_ksize[c], ch_bits[c], ch_flags[c], ch_lo[c],
                ch_hi[c], codes, x, err, value, scratch, range_scratch, trial, inputs)


@njit(cache=True, nogil=True)
def quantize_blocks(ch_address, ch_codes_address, ch_inner, ch_ksize, ch_bits, ch_flags, ch_lo,
                    ch_hi, block_start, scale, zero, finite, first_block, last_block,
                    search_moments, ch_moments_start):
    """Quantize the channels of blocks ``first_block .. last_block - 1`` of a ragged batch.

    Channel ``c`` is ``ch_inner[c] * ch_ksize[c]`` contiguous float32 values at address
    ``ch_address[c]`` (its weight laid out ``(O, I, K)``), quantized with ``ch_bits[c]`` and
    ``ch_flags[c]`` (``KERNEL_PASS | CHANNEL_PASS | SYMMETRIC | GIVEN_RANGE | RANGE_SEARCH``;
    with ``GIVEN_RANGE`` the range is ``[ch_lo[c], ch_hi[c]]``) into as many int8 codes at
    ``ch_codes_address[c]``. Blocks ``block_start[b] .. block_start[b+1]-1`` of channels are the
    work items; the caller runs disjoint block ranges on several threads (the GIL is released)
    or all of them in one call. Writes ``scale`` and ``zero`` (float32, one per channel) and
    ``finite`` (False for a channel holding a NaN or Inf, whose other outputs are then junk).

    ``search_moments`` None: the range search is not compiled in (numba compiles one version
    of this function per argument type and prunes the branch), and ``RANGE_SEARCH`` is ignored.
    Else it is the float64 table of input moments: a channel with ``RANGE_SEARCH`` whose
    ``ch_moments_start[c]`` is not ``NO_MOMENTS`` weighs its error by
    ``search_moments[start : start + 2 * ch_inner[c]]`` (see :func:`output_error`).
    """
    for b in range(first_block, last_block):
        first, last = block_start[b], block_start[b + 1]
        max_size, max_inner, max_ksize = block_extent(ch_inner, ch_ksize, first, last)
        buffer = np.empty(_layout(max_size, max_inner, max_ksize)[-1], np.uint8)
        quantize_block(ch_address, ch_codes_address, ch_inner, ch_ksize, ch_bits, ch_flags,
                       ch_lo, ch_hi, scale, zero, finite, first, last, search_moments,
                       ch_moments_start, buffer.ctypes.data, max_size, max_inner, max_ksize,
                       None)
        _keep_alive(buffer, search_moments)
