"""numba kernels of SQuant (SQUANT_SPEC.md): grid, EQ, the flip step, KQ and CQ.

Pure functions over flat arrays; they import numba and numpy only. Installed as
``squant.kernels``. The entry point is :func:`quantize_batch`.
"""

from .passes import (
    CHANNEL_PASS,
    GIVEN_RANGE,
    KERNEL_PASS,
    NO_MOMENTS,
    RANGE_SEARCH,
    SHRINK_FACTORS,
    SYMMETRIC,
    quantize_batch,
)

__all__ = [
    "CHANNEL_PASS",
    "GIVEN_RANGE",
    "KERNEL_PASS",
    "NO_MOMENTS",
    "RANGE_SEARCH",
    "SHRINK_FACTORS",
    "SYMMETRIC",
    "quantize_batch",
]
