"""Bit packing of int codes for squant's file format (``squant.io.packing`` documents it):
numba loops over whole groups of 8 codes, in parallel."""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def pack_groups(codes: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Pack ``codes`` (a multiple of 8 of them) into ``out`` (``bits`` bytes per 8 codes)."""
    offset = 1 << (bits - 1)
    for group in prange(codes.shape[0] // 8):
        word = np.uint64(0)
        for j in range(8):
            value = np.uint64(np.int64(codes[group * 8 + j]) + offset)
            word |= value << np.uint64(j * bits)
        for b in range(bits):
            out[group * bits + b] = np.uint8((word >> np.uint64(8 * b)) & np.uint64(255))


@njit(cache=True, parallel=True)
def unpack_groups(packed: np.ndarray, bits: int, out: np.ndarray) -> None:
    """The inverse of :func:`pack_groups`."""
    offset = 1 << (bits - 1)
    mask = np.uint64((1 << bits) - 1)
    for group in prange(out.shape[0] // 8):
        word = np.uint64(0)
        for b in range(bits):
            word |= np.uint64(packed[group * bits + b]) << np.uint64(8 * b)
        for j in range(8):
            out[group * 8 + j] = np.int8(np.int64((word >> np.uint64(j * bits)) & mask) - offset)
