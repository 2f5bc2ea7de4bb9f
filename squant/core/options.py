"""Quantization options as one frozen, validated value (bits, mode, grid).

Validated once here, at the boundary, so nothing below re-checks them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .errors import QuantizationError

MODES = ("E", "K", "C", "KC")
SCHEMES = ("asymmetric", "symmetric")
GRANULARITIES = ("channel", "tensor")
RANGES = ("minmax", "search")
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: object, where: str = "bits") -> int:
    """Return ``bits`` as an int if it is an integer in 2..8, else raise a clear error."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{where} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise QuantizationError(f"{where} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return int(bits)


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise QuantizationError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")
    return str(value)


@dataclass(frozen=True)
class QuantOptions:
    """How one weight is quantized.

    bits: 2..8. mode: which SQuant passes run: ``"E"`` (rounding only), ``"K"`` (+ kernel
    flips), ``"C"`` (+ channel flips) or ``"KC"`` (all: the paper's method, the default).
    scheme: ``"asymmetric"`` (the paper's grid) or ``"symmetric"`` (zero point 0, codes in
    ``[-(2**(bits-1)-1), 2**(bits-1)-1]``, what int8 runtimes expect). granularity: one scale per
    output ``"channel"`` (default) or one for the whole ``"tensor"``. range: the grid spans each
    channel's ``"minmax"`` (the paper's, default), or ``"search"`` tries shrunk ranges too and
    keeps, per channel, the one whose quantized weight is closest to the float weight (never
    farther than minmax's; per-channel granularity only). In ``squant.quantize``, a layer whose
    input BatchNorms determine measures "closest" by the expected output error instead.
    """

    bits: int = 4
    mode: str = "KC"
    scheme: str = "asymmetric"
    granularity: str = "channel"
    range: str = "minmax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits))
        _check_choice(self.mode, "mode", MODES)
        _check_choice(self.scheme, "scheme", SCHEMES)
        _check_choice(self.granularity, "granularity", GRANULARITIES)
        _check_choice(self.range, "range", RANGES)
        if self.range == "search" and self.granularity == "tensor":
            raise QuantizationError("range 'search' picks a range per output channel, so it "
                                    "needs granularity 'channel', not 'tensor'")

    @property
    def kernel_pass(self) -> bool:
        """Whether KQ runs (on weights whose kernels hold more than one element)."""
        return "K" in self.mode

    @property
    def channel_pass(self) -> bool:
        """Whether CQ runs."""
        return "C" in self.mode
