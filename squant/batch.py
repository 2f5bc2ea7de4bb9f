"""Many weights -> one flat float32 buffer and per-channel tables -> one kernel call -> codes.

The kernels' parallel loop runs over blocks of channels of similar total size, drawn from every
weight at once, so a model's layers are quantized in parallel rather than one after another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .options import QuantOptions

_BLOCK_ELEMENTS = 1 << 15  # work per parallel item: big enough to amortise its scratch


@dataclass(frozen=True)
class BatchResult:
    """Kernel output for one weight: ``codes`` ``(O, I, K)``, ``scale``/``zero_point`` ``(O,)``;
    ``finite`` is False if the weight (as float32) holds a NaN or Inf: then the rest is junk."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    finite: bool


def _flags(options: QuantOptions) -> int:
    flags = 0
    if options.kernel_pass:
        flags |= kernels.KERNEL_PASS
    if options.channel_pass:
        flags |= kernels.CHANNEL_PASS
    if options.scheme == "symmetric":
        flags |= kernels.SYMMETRIC
    if options.granularity == "tensor":
        flags |= kernels.GIVEN_RANGE
    return flags


def _block_starts(sizes: np.ndarray) -> np.ndarray:
    """Split consecutive channels into blocks of about ``_BLOCK_ELEMENTS`` elements each."""
    ends = np.cumsum(sizes)
    cuts = np.searchsorted(ends, np.arange(_BLOCK_ELEMENTS, ends[-1], _BLOCK_ELEMENTS), "right")
    return np.unique(np.concatenate(([0], cuts, [sizes.shape[0]]))).astype(np.int64)


def quantize_batch(weights: list[np.ndarray], options: list[QuantOptions]) -> list[BatchResult]:
    """Quantize weights viewed as ``(O, I, K)`` arrays of any float dtype and any memory layout.

    Each weight is copied once, as float32, into the flat buffer; inputs are never modified. A
    weight with a NaN or Inf is flagged (``finite``), not quantized.
    """
    shapes = [w.shape for w in weights]
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    flat = np.empty(int(offsets[-1]), np.float32)
    channels = sum(s[0] for s in shapes)
    ch_start = np.empty(channels, np.int64)
    ch_inner = np.empty(channels, np.int64)
    ch_ksize = np.empty(channels, np.int64)
    ch_bits = np.empty(channels, np.int64)
    ch_flags = np.empty(channels, np.int64)
    ch_lo = np.zeros(channels, np.float32)
    ch_hi = np.zeros(channels, np.float32)
    first = 0
    for w, (o, i, k), opts, start in zip(weights, shapes, options, offsets[:-1]):
        view = flat[start : start + o * i * k].reshape(o, i, k)
        with np.errstate(over="ignore"):  # float64 beyond float32's range: flagged below
            view[...] = w
        rows = slice(first, first + o)
        ch_start[rows] = start + np.arange(o, dtype=np.int64) * (i * k)
        ch_inner[rows], ch_ksize[rows] = i, k
        ch_bits[rows], ch_flags[rows] = opts.bits, _flags(opts)
        if opts.granularity == "tensor":
            ch_lo[rows], ch_hi[rows] = view.min(), view.max()
        first += o
    codes = np.empty_like(flat, dtype=np.int8)
    scale = np.empty(channels, np.float32)
    zero = np.empty(channels, np.float32)
    finite = np.empty(channels, np.bool_)
    blocks = _block_starts(ch_inner * ch_ksize)
    kernels.quantize_batch(flat, ch_start, ch_inner, ch_ksize, ch_bits, ch_flags, ch_lo, ch_hi,
                           blocks, codes, scale, zero, finite)
    results = []
    first = 0
    for (o, i, k), start in zip(shapes, offsets[:-1]):
        rows = slice(first, first + o)
        all_finite = bool(finite[rows].all() and np.isfinite(ch_lo[rows]).all()
                          and np.isfinite(ch_hi[rows]).all())
        results.append(BatchResult(codes[start : start + o * i * k].reshape(o, i, k),
                                   scale[rows], zero[rows], all_finite))
        first += o
    return results
