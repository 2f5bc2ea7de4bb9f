"""The kernels' flags, constants and scratch layout: plain Python and numpy, no numba.

``squant`` reads these without importing numba, which the native build of the kernels
(``kernels/native.py``) does not need at run time.
"""

import numpy as np

RANGE_FLOOR = np.float32(1e-8)  # the spec's floor on a channel's range: max(hi - lo, 1e-8)

KERNEL_PASS = 1  # run KQ (on weights whose kernels have more than one element)
CHANNEL_PASS = 2  # run CQ
SYMMETRIC = 4  # symmetric grid instead of the asymmetric default
GIVEN_RANGE = 8  # use the caller's per-channel [lo, hi] instead of the channel's min and max
RANGE_SEARCH = 16  # also try shrunk ranges; keep the one with the least reconstruction error
INCLUDE_ZERO = 32  # widen each range to include 0 (int8 runtimes need an integer zero point)
RANGE_FIT = 64  # also try other steps and windows (kernels/fit.py); keep the least l_p error
# The passes the native library holds in C (kernels/native/*.c), in the order of the table of
# their addresses that the driver hands the kernels (kernels/native_passes.py).
NATIVE_PASSES = ("squant_kernel_pass_3x3", "squant_channel_pass_eq",
                 "squant_channel_pass_handed")
MAX_PARTIALS = 64  # an exact sum's non-overlapping float64 partials (kernels/exact_sum.py)
NO_MOMENTS = -1  # a channel's start in the input-moment table when it has none: plain error

# Range search: the channel's range scaled by each factor, in this order (1.0 first, so that
# minmax wins ties and search is never worse than minmax).
SHRINK_FACTORS = np.array([1.0, 0.94, 0.88, 0.82, 0.76, 0.7, 0.64, 0.58, 0.52], np.float32)


# ``squant quantize --report``'s statistics (kernels/error_stats.py): out[0:4] sums of absolute
# error sums, out[4:8] their maxima, out[8] the largest weight error.
STAT_COUNT = 9


def error_stats_scratch(channels, kernels, ksize):
    """float64 scratch that ``error_stats.add_error_stats`` needs for a block of that shape."""
    return channels + 2 * kernels + kernels * ksize + 9


def scratch_layout(max_size, max_inner, max_ksize):
    """Byte offsets of a block's scratch arrays in one buffer, for channels of at most
    ``max_size`` elements, ``max_inner`` kernels and kernels of ``max_ksize`` elements, and the
    buffer's size (the last entry). Sections start on 8 bytes (from an 8-aligned base).

    Sections, in order: ``x``, ``err``, ``value`` (float32, ``max_size`` each); order keys (int64,
    ``max_size``); first keys (int64, ``max(max_size, 2)``); per kernel: handed-on element
    (int64), priority set (bool), priority (float32), error sum and magnitude sum (float64),
    fine count, first, second and last key (int64), all ``max_inner``; one kernel's errors
    (float32, ``max_ksize``); an exact sum's partials (float64, ``MAX_PARTIALS``); a range
    (int32, 2); trial codes (int8, ``max_size``); the addresses of the native library's C passes
    (int64, one per ``NATIVE_PASSES``; 0 for none); the end.
    Plain arithmetic: numba compiles it into the kernels (no allocation), and callers size
    buffers with it.
    """
    x = 0
    keys = x + (3 * max_size * 4 + 7) // 8 * 8
    first_keys = keys + max_size * 8
    handed = first_keys + max(max_size, 2) * 8
    priority_set = handed + max_inner * 8
    priority = priority_set + (max_inner + 7) // 8 * 8
    sums = priority + (max_inner * 4 + 7) // 8 * 8
    magnitudes = sums + max_inner * 8
    fine = magnitudes + max_inner * 8
    first = fine + max_inner * 8
    second = first + max_inner * 8
    last = second + max_inner * 8
    kernel = last + max_inner * 8
    partials = kernel + (max_ksize * 4 + 7) // 8 * 8
    range_bits = partials + MAX_PARTIALS * 8
    trial = range_bits + 8
    native = trial + (max_size + 7) // 8 * 8
    end = native + 8 * len(NATIVE_PASSES)
    return (x, keys, first_keys, handed, priority_set, priority, sums, magnitudes, fine, first,
            second, last, kernel, partials, range_bits, trial, native, end)
