"""The grid fit of ``range="fit"`` (issue 21): which grids it tries and the error it compares.

A grid with an integer zero point is a step ``1/S`` and a window of ``2**b`` consecutive integer
levels ``l .. l + 2**b - 1`` (value ``level / S``, 0 always on the lattice). The minmax grid
has the step ``(hi - lo) / (2**b - 1)`` and its window starts at ``round(S * lo)``. The fit
tries steps ``f`` times that (:func:`fit_factors`: at 2-3 bits ``FIT_FACTORS``, two finer and
three coarser; at 4 bits and more ``FIT_FACTORS_WIDE``, one finer and two coarser). With a
finer step it tries every window start between the one that puts the window's top on the
channel's max and the one that puts its bottom on the channel's min: they clip different ends
(by at most ``(1 - f) * (2**b - 1)`` levels in all). With a coarser step every such window
holds all the levels, so they give the same values and one (the middle) is tried. Each
candidate is a range ``[l / S, (l + 2**b - 1) / S]`` for the grid formula, so the passes run on
it as on any range.

The error compared is ``sum |w - (q + Z) / S| ** FIT_POWER`` with ``FIT_POWER = 1/2``: an
l_p error with p < 1, as HQQ's solver uses, which counts many small errors against a few
large ones more than least squares does. Least squares over deeper shrinks (``range="search"``)
clips more and loses end to end on SmolLM2; this fit, measured end to end on SmolLM2 and
MiniLM (README, "Transformers (group-wise)"), beats round to nearest at 3 and 4 bits. On those
models most groups keep a finer step than minmax's.

The candidate sets were chosen end to end (SmolLM2 perplexity on 4,096 Austen tokens, MiniLM
cosine on 128 sentences, groups of 64). At 3 bits the five factors beat three (SmolLM2 79.9
against 82.8, MiniLM 0.863 against 0.853). At 4 bits three factors (0.97, 1.05, 1.1) do as well
as five (42.17 against 42.21; 0.963 against 0.964) in about 60% of the passes, and the step
0.94 hurts there: it clips about 0.9 of a level at 4 bits against 0.4 at 3 (adding 0.91 gave
43.9; RTN 43.1). More steps overfit: 24 factors 0.88-1.12 gave 44.9.
"""

import numpy as np
from numba import njit

# Step factors tried besides 1 (minmax, always tried first and kept on ties). numba compiles
# this array and the functions below into passes._fit_range's cached machine code: after
# changing them, touch passes.py too (its cache is keyed on its own file only).
FIT_FACTORS = np.array([0.94, 0.97, 1.03, 1.06, 1.1], np.float32)  # 2 and 3 bits
FIT_FACTORS_WIDE = np.array([0.97, 1.05, 1.1], np.float32)  # 4 bits and more
FIT_POWER = 0.5  # the error's exponent: the functions below take it as a square root


@njit(cache=True, inline="always")
def fit_factors(bits):
    """The step factors the fit tries besides minmax's at ``bits``."""
    return FIT_FACTORS if bits < 4 else FIT_FACTORS_WIDE


_CHUNK = 64  # elements summed in float32 (vectorised) before adding to the float64 total


@njit(cache=True, fastmath={"reassoc", "contract"})
def fit_error(w, codes, scale, zero):
    """``sum |w - (codes + Z) * (1 / S)| ** FIT_POWER``: each term in float32 (8 to a vector
    instruction; float64 square roots cost ~6x more), summed in float32 over chunks of 64
    elements and the chunks in float64. The sum may be reordered, as in
    ``reconstruction_error``: the same order on every call."""
    step = np.float32(1.0) / scale
    total = 0.0
    n = w.shape[0]
    for first in range(0, n, _CHUNK):
        part = np.float32(0.0)
        for i in range(first, min(first + _CHUNK, n)):
            part += np.sqrt(abs(w[i] - (np.float32(codes[i]) + zero) * step))
        total += np.float64(part)
    return total


@njit(cache=True, fastmath={"reassoc", "contract"})
def window_error(w, scale, bottom, top):
    """:func:`fit_error` of round to nearest on the grid of step ``1 / S`` (``scale``: S) and
    the window of levels ``bottom .. top``, without writing codes: each element's level
    ``clamp(rint(S * w), bottom, top)``, the codes those of :func:`write_lattice_codes`. One
    pass, summed as in :func:`fit_error`. (Not ``inline="always"``: numba would inline it
    into its caller's IR and compile it with the caller's flags, without fastmath, and the
    sum would no longer vectorise: 3x slower.)"""
    step = np.float32(1.0) / scale
    n = w.shape[0]
    if n <= _CHUNK:  # a group: one float32 sum, in a loop without the chunks' bounds
        part = np.float32(0.0)
        for i in range(n):
            part += np.sqrt(abs(w[i] - min(max(np.rint(scale * w[i]), bottom), top) * step))
        return np.float64(part)
    total = 0.0
    for first in range(0, n, _CHUNK):
        part = np.float32(0.0)
        for i in range(first, min(first + _CHUNK, n)):
            level = min(max(np.rint(scale * w[i]), bottom), top)
            part += np.sqrt(abs(w[i] - level * step))
        total += np.float64(part)
    return total


@njit(cache=True)
def write_lattice_codes(w, scale, bottom, top, zero, codes):
    """The codes of the window ``bottom .. top`` of levels of step ``1 / S``:
    ``clamp(rint(S * w), bottom, top) - Z`` (``Z = bottom + 2**(b-1)``, codes in
    ``[-2**(b-1), 2**(b-1) - 1]``), the levels :func:`window_error` evaluates."""
    for i in range(w.shape[0]):
        codes[i] = np.int8(min(max(np.rint(scale * w[i]), bottom), top) - zero)


@njit(cache=True, inline="always")  # scalar: a call would cost as much as the arithmetic
def fit_windows(scale, lo, hi, bits, factor, include_zero):
    """For the step ``factor / scale`` (``scale``: the minmax grid's S): ``(S, first, last)``,
    the candidates' S and the range of window starts ``first .. last`` (integers as float32;
    ``first > last``: none, when ``include_zero`` leaves no window holding level 0; one start
    for ``factor > 1``). All float32: the levels are small integers, exact."""
    levels = np.float32(2**bits - 1)
    s = np.float32(scale / factor)
    top = np.rint(hi * s) - levels  # the window whose top level is the max's
    bottom = np.rint(lo * s)  # the window whose bottom level is the min's
    first, last = min(top, bottom), max(top, bottom)
    if include_zero:  # level 0 inside the window: an integer zero point among the codes
        first, last = max(first, -levels), min(last, np.float32(0.0))
    if factor > 1 and first <= last:
        # A coarser step: every window from top to bottom holds all the levels round(S * w),
        # so none clips and all give the same values: the middle one stands for them all.
        first = last = np.floor((first + last) * np.float32(0.5))
    return s, first, last
