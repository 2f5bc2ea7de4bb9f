"""numba kernels of SQuant (SQUANT_SPEC.md): grid, EQ, the flip step, KQ and CQ.

Pure functions over flat arrays; they import numba and numpy only. Installed as
``squant.kernels``. The entry point is :func:`quantize_blocks`.
"""

from .grid import RANGE_FLOOR
from .passes import (
    CHANNEL_PASS,
    GIVEN_RANGE,
    INCLUDE_ZERO,
    KERNEL_PASS,
    NO_MOMENTS,
    RANGE_FIT,
    RANGE_SEARCH,
    SHRINK_FACTORS,
    SYMMETRIC,
    quantize_blocks,
)

__all__ = [
    "CHANNEL_PASS",
    "GIVEN_RANGE",
    "INCLUDE_ZERO",
    "KERNEL_PASS",
    "NO_MOMENTS",
    "RANGE_FLOOR",
    "RANGE_FIT",
    "RANGE_SEARCH",
    "SHRINK_FACTORS",
    "SYMMETRIC",
    "quantize_blocks",
]
