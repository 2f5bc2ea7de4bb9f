"""numba kernels of SQuant (SQUANT_SPEC.md): grid, EQ, the flip step, KQ and CQ.

Pure functions over flat arrays; they import numba and numpy only. Installed as
``squant.kernels``. The entry point is :func:`quantize_blocks` (numba's JIT, compiled on first
use) or its native build (:mod:`squant.kernels.native`, compiled at install). Importing this
package does not import numba: the flags and constants live in :mod:`.constants`, and
``quantize_blocks`` is loaded on first access.
"""

from .constants import (
    CHANNEL_PASS,
    GIVEN_RANGE,
    INCLUDE_ZERO,
    KERNEL_PASS,
    NO_MOMENTS,
    RANGE_FIT,
    RANGE_FLOOR,
    RANGE_SEARCH,
    SHRINK_FACTORS,
    SYMMETRIC,
    scratch_layout,
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
    "scratch_layout",
]


def __getattr__(name: str):
    """``quantize_blocks``: imported (with numba) on first access."""
    if name == "quantize_blocks":
        from .passes import quantize_blocks

        return quantize_blocks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
