"""Packing of int codes for the file format: ``code + 2**(bits-1)`` (unsigned) as a
little-endian bit stream of ``bits`` bits per code. Groups of 8 codes fill exactly ``bits``
bytes, so the kernels (``squant.kernels.packing``: native when built, else numba's JIT,
imported on first use) handle ranges of whole groups on squant's threads, and a last partial
group is padded (with unsigned 0) around them.
"""

from __future__ import annotations

import numpy as np

from ..core.batch import kernel, run_in_threads
from ..core.errors import QuantizationError


def _run_groups(name: str, source: np.ndarray, bits: int, out: np.ndarray, groups: int) -> None:
    """The kernel ``name`` over ``groups`` groups of 8 codes, on squant's threads."""
    task = kernel(name)
    run_in_threads(lambda first, last: task(source, bits, out, first, last), groups, groups * 8)


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take packed: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """int8 codes in ``[-2**(bits-1), 2**(bits-1) - 1]`` (any shape, read in C order) as the
    file's packed uint8 stream of ``ceil(count * bits / 8)`` bytes."""
    flat = np.ascontiguousarray(codes, dtype=np.int8).reshape(-1)
    whole = flat.size // 8 * 8
    out = np.empty(packed_size(flat.size, bits), np.uint8)
    _run_groups("pack_groups", flat, bits, out, whole // 8)
    if whole < flat.size:
        last = np.full(8, -(1 << (bits - 1)), np.int8)  # unsigned 0: zero padding bits
        last[: flat.size - whole] = flat[whole:]
        tail = np.empty(bits, np.uint8)
        kernel("pack_groups")(last, bits, tail, 0, 1)
        out[whole // 8 * bits :] = tail[: out.size - whole // 8 * bits]
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` int8 codes of a packed uint8 stream (the inverse of :func:`pack_codes`)."""
    if packed.shape != (packed_size(count, bits),):
        raise QuantizationError(f"{count} codes of {bits} bits take {packed_size(count, bits)} "
                                f"bytes packed, got an array of shape {tuple(packed.shape)}")
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    whole = count // 8 * 8
    out = np.empty(count, np.int8)
    _run_groups("unpack_groups", packed, bits, out, whole // 8)
    if whole < count:
        tail = np.zeros(bits, np.uint8)
        tail[: packed.size - whole // 8 * bits] = packed[whole // 8 * bits :]
        last = np.empty(8, np.int8)
        kernel("unpack_groups")(tail, bits, last, 0, 1)
        out[whole:] = last[: count - whole]
    return out
