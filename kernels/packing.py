"""Bit packing of int codes for squant's file format (``squant.io.packing`` documents it): loops
over ranges of whole groups of 8 codes, which the caller runs on its threads (GIL released)."""

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def pack_groups(codes, bits, out, first, last):
    """Pack groups ``first .. last - 1`` of 8 ``codes`` each into ``out`` (``bits`` bytes per
    group): ``code + 2**(bits-1)`` as a little-endian stream of ``bits`` bits per code."""
    offset = 1 << (bits - 1)
    for group in range(first, last):
        word = np.uint64(0)
        for j in range(8):
            value = np.uint64(np.int64(codes[group * 8 + j]) + offset)
            word |= value << np.uint64(j * bits)
        for b in range(bits):
            out[group * bits + b] = np.uint8((word >> np.uint64(8 * b)) & np.uint64(255))


@njit(cache=True, nogil=True)
def unpack_groups(packed, bits, out, first, last):
    """The inverse of :func:`pack_groups`: groups ``first .. last - 1`` of ``packed`` into
    ``out``."""
    offset = 1 << (bits - 1)
    mask = np.uint64((1 << bits) - 1)
    for group in range(first, last):
        word = np.uint64(0)
        for b in range(bits):
            word |= np.uint64(packed[group * bits + b]) << np.uint64(8 * b)
        for j in range(8):
            out[group * 8 + j] = np.int8(np.int64((word >> np.uint64(j * bits)) & mask) - offset)
