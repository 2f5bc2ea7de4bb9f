"""Error statistics of quantized channels in one pass (``squant quantize --report``).

For a block of channels ``w`` (channels, kernels, kernel elements) in float32 with their codes
and grid, ``x = fl32(fl32(w * scale) - zero)`` as ``squant.core.report`` evaluates it, and:
- per kernel, the error sum of plain rounding (``round(x)`` half to even, clamped to the grid)
  and of the codes: ``sum(round(x)) - sum(x)`` and ``sum(codes) - sum(x)``, the integer sums
  exact and ``sum(x)`` in float64; per channel the sums of its kernels' sums;
- the totals and maxima of their absolute values;
- the largest weight error ``|(codes + zero) / scale - w|``, in float64, evaluated on the
  channels whose largest ``|codes - x|`` can hold it (the others are bounded below it).

The values equal ``squant.core.report``'s float64 sums of the differences up to float64
rounding, and its largest weight error exactly. Nothing here is compiled until a report is
asked for.
"""

import numpy as np
from numba import njit

KERNEL_EQ, KERNEL_SQUANT, CHANNEL_EQ, CHANNEL_SQUANT = 0, 1, 2, 3


# "reassoc": float64 sums may be reordered (vectorized); nothing is contracted or approximated.
# Maxima of magnitudes go through buffers and are taken apart (a running float maximum would keep
# the loops from being vectorized).
@njit(cache=True, nogil=True)
def add_error_stats(w, codes, scale, zero, t_min, t_max, out, scratch):
    """Add a block's statistics to ``out`` (float64, ``kernels.constants.STAT_COUNT``).

    ``w``: float32 (channels, kernels, kernel); ``codes``: int8 of the same shape; ``scale``,
    ``zero``: float32 (channels,); ``t_min``, ``t_max``: the grid's code range; ``scratch``:
    float64, at least :func:`kernels.constants.error_stats_scratch` of the shape (nothing here
    allocates).
    """
    channels, kernels, ksize = w.shape
    if channels == 0 or kernels == 0 or ksize == 0:
        return
    largest = scratch[:channels]  # per channel: the largest |codes - x|
    sums_eq = scratch[channels : channels + kernels]  # one channel's kernel sums
    sums_squant = scratch[channels + kernels : channels + 2 * kernels]
    end = channels + 2 * kernels + kernels * ksize
    magnitude = scratch[channels + 2 * kernels : end]  # one channel's |codes - x|, then |sums|
    statistics = scratch[end : end + 8]  # as out[:8], for this block
    slot = scratch[end + 8 : end + 9]  # a float64 from its bits
    statistics[:] = 0.0
    for c in range(channels):
        if ksize == 1:
            _element_errors(w[c], codes[c], scale[c], zero[c], t_min, t_max, sums_eq,
                            sums_squant, magnitude)
        else:
            _kernel_sums(w[c], codes[c], scale[c], zero[c], t_min, t_max, sums_eq,
                         sums_squant, magnitude)
        largest[c] = _largest_magnitude(magnitude, slot)
        _add_channel(sums_eq, KERNEL_EQ, CHANNEL_EQ, magnitude, statistics, slot)
        _add_channel(sums_squant, KERNEL_SQUANT, CHANNEL_SQUANT, magnitude, statistics, slot)
    for i in range(4):
        out[i] += statistics[i]
        out[4 + i] = max(out[4 + i], statistics[4 + i])
    out[8] = max(out[8], _largest_weight_error(w, codes, scale, zero, t_max, largest))


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _element_errors(w, codes, s, z, t_min, t_max, sums_eq, sums_squant, magnitude):
    """One channel of one-element kernels ``w`` (kernels, 1): a kernel's sums are its element's
    errors ``round(x) - x`` and ``codes - x`` (exact in float64); ``magnitude`` gets
    ``|codes - x|``."""
    for k in range(w.shape[0]):
        x = np.float64(np.float32(w[k, 0] * s) - z)
        sums_eq[k] = min(max(np.rint(x), t_min), t_max) - x
        sums_squant[k] = codes[k, 0] - x
        magnitude[k] = abs(sums_squant[k])


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _kernel_sums(w, codes, s, z, t_min, t_max, sums_eq, sums_squant, magnitude):
    """One channel ``w`` (kernels, kernel): each kernel's ``sum(round(x)) - sum(x)`` and
    ``sum(codes) - sum(x)``, the integer sums exact; ``magnitude`` gets each ``|codes - x|``."""
    kernels, ksize = w.shape
    for k in range(kernels):
        sum_x = 0.0
        sum_rounded = sum_codes = 0
        for i in range(ksize):
            x = np.float32(w[k, i] * s) - z
            q = codes[k, i]
            sum_x += x
            sum_rounded += np.int64(min(max(np.rint(x), t_min), t_max))
            sum_codes += q
            magnitude[k * ksize + i] = abs(np.float64(q) - x)
        sums_eq[k] = sum_rounded - sum_x
        sums_squant[k] = sum_codes - sum_x


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _add_channel(sums, kernel, channel, magnitude, statistics, slot):
    """Add a channel's kernel sums to ``statistics`` (``out[:8]``'s layout): at ``kernel`` the
    sum and largest of their magnitudes, at ``channel`` their sum's magnitude (``magnitude``:
    scratch of at least ``len(sums)``; ``slot``: one float64 of scratch)."""
    channel_sum = 0.0
    total = 0.0
    for k in range(sums.shape[0]):
        channel_sum += sums[k]
        magnitude[k] = abs(sums[k])
        total += magnitude[k]
    statistics[kernel] += total
    statistics[4 + kernel] = max(statistics[4 + kernel],
                                 _largest_magnitude(magnitude[: sums.shape[0]], slot))
    statistics[channel] += abs(channel_sum)
    statistics[4 + channel] = max(statistics[4 + channel], abs(channel_sum))


@njit(cache=True, nogil=True)
def _largest_magnitude(values, slot):
    """The largest of non-negative float64 ``values``, as the largest of their bit patterns
    (the same order for non-negative floats; an integer maximum vectorizes), turned back into a
    float64 through ``slot`` (one float64 of scratch)."""
    bits = values.view(np.int64)
    largest = slot.view(np.int64)
    largest[0] = 0
    for i in range(bits.shape[0]):
        largest[0] = max(largest[0], bits[i])
    return slot[0]


@njit(cache=True, nogil=True)
def _largest_weight_error(w, codes, scale, zero, t_max, largest):
    """The largest ``|(codes + zero) / scale - w|`` in float64. A channel's weight error is
    ``|codes - x| / scale`` but for ``x``'s float32 rounding (a few ulps of ``|x|``, which is at
    most the grid's reach plus the error plus ``|zero|``): channels whose bound cannot reach the
    largest lower bound are skipped."""
    channels, kernels, ksize = w.shape
    zero_reach = 0.0  # max |zero|
    top = 0.0  # max largest
    for c in range(channels):
        zero_reach = max(zero_reach, abs(np.float64(zero[c])))
        top = max(top, largest[c])
    reach = 3.0 * (t_max + 1) + zero_reach + top
    margin = 2.0 ** -20 * reach
    best_lower = 0.0
    for c in range(channels):
        best_lower = max(best_lower, (largest[c] - margin) / scale[c])
    result = 0.0
    for c in range(channels):
        s, z = np.float64(scale[c]), np.float64(zero[c])
        if (largest[c] + margin) / s < best_lower:
            continue
        for k in range(kernels):
            for i in range(ksize):
                error = abs((np.float64(codes[c, k, i]) + z) / s - np.float64(w[c, k, i]))
                result = max(result, error)
    return result
