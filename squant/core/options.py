"""Quantization options as frozen, validated values: the weights' grid and the activations'.

Validated once here, at the boundary, so nothing below re-checks them.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import QuantizationError

MODES = ("E", "K", "C", "KC")
SCHEMES = ("asymmetric", "symmetric")
GRANULARITIES = ("channel", "tensor")
RANGES = ("minmax", "search", "fit")
# What ``mode=None`` and ``range=None`` (the defaults) mean: the paper's SQuant per channel;
# with a group_size, the grouped recipe measured best end to end (README, "Group-wise grids").
PAPER_RECIPE = {"mode": "KC", "range": "minmax"}
GROUPED_RECIPE = {"mode": "E", "range": "fit"}
DATA_FREE_RANGES = ("paper", "bn")
DATA_RANGES = ("minmax", "ema", "kl", "percentile", "mse")
ACT_RANGES = DATA_FREE_RANGES + DATA_RANGES
DEFAULT_DATA_RANGE = "mse"
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: object, where: str = "bits") -> int:
    """Return ``bits`` as an int if it is an integer in 2..8, else raise a clear error."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{where} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise QuantizationError(f"{where} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return int(bits)


def check_group_size(group_size: object, where: str = "group_size") -> int | None:
    """Return ``group_size`` as an int ``>= 2``, or None; else raise a clear error."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"{where} must be an int >= 2 or None, got {group_size!r}")
    if group_size < 2:
        raise QuantizationError(f"{where} must be >= 2 (or None for one grid per channel), "
                                f"got {group_size}")
    return int(group_size)


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
    group_size: ``None`` (default) for one grid per output channel, or an int ``g >= 2``: each
    output channel is cut into groups of ``g`` consecutive elements along its inputs (the last
    group shorter when ``g`` does not divide them), each group with its own grid, and CQ (and
    ``range="search"``) runs within each group. For convolutions ``g`` counts elements and
    must be a multiple of the kernel size (groups of whole kernels). Not with granularity
    ``"tensor"``. include_zero: widen every range (channel, group or tensor) to include 0, so
    that each zero point is an integer inside the codes' range, as int8 runtimes (ONNX
    ``DequantizeLinear``, ``QLinearConv``) require; off by default (the paper's grid).
    """

    bits: int = 4
    mode: str | None = None
    scheme: str = "asymmetric"
    granularity: str = "channel"
    range: str | None = None
    group_size: int | None = None
    include_zero: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits))
        object.__setattr__(self, "group_size", check_group_size(self.group_size))
        recipe = PAPER_RECIPE if self.group_size is None else GROUPED_RECIPE
        for name in ("mode", "range"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, recipe[name])
        if not isinstance(self.include_zero, bool):
            raise TypeError(f"include_zero must be a bool, got "
                            f"{type(self.include_zero).__name__}")
        _check_choice(self.mode, "mode", MODES)
        _check_choice(self.scheme, "scheme", SCHEMES)
        _check_choice(self.granularity, "granularity", GRANULARITIES)
        _check_choice(self.range, "range", RANGES)
        if self.range in ("search", "fit") and self.granularity == "tensor":
            raise QuantizationError(f"range {self.range!r} picks a range per output channel, "
                                    "so it needs granularity 'channel', not 'tensor'")
        if self.group_size is not None and self.granularity == "tensor":
            raise QuantizationError("group_size gives each group its own grid, so it needs "
                                    "granularity 'channel', not 'tensor'")

    @property
    def kernel_pass(self) -> bool:
        """Whether KQ runs (on weights whose kernels hold more than one element)."""
        return "K" in self.mode

    @property
    def channel_pass(self) -> bool:
        """Whether CQ runs."""
        return "C" in self.mode


@dataclass(frozen=True)
class ActivationOptions:
    """How ``squant.quantize`` quantizes activations (the SQuant paper's WxAx).

    The input of every quantized layer but the first (which stays float) is fake-quantized per
    tensor, asymmetric, the last layer's with 8 bits, the others' with ``bits`` (2..8).

    Data-free (no ``calibration_data``): input_shape: one input's shape without the batch
    dimension (e.g. ``(3, 224, 224)``), to run the calibration batch. range: ``"paper"``
    (the default: SQuant's rule: one batch of ``calibration_batch`` uniform [0, 1) inputs seeded
    by ``seed``, range ``sigma`` times the std of each layer's input; ``sigma`` None: 12 up to
    4 bits, 14 for 5-6, 25 for 7-8) or ``"bn"`` (the least-error range of the BatchNorm
    Gaussians that determine a layer's input, the paper's rule elsewhere;
    :mod:`squant.ranges.batchnorm`).

    From data: calibration_data: an iterable of input batches (each a tensor, run as
    ``model(batch)``; a tuple/list, ``model(*batch)``; or a dict, ``model(**batch)``; one
    tensor alone is one batch; left out of ``==`` and ``repr``); input_shape and sigma are then
    not used and must be left out (calibration_batch and seed, which have defaults, are not
    used either).
    range: ``"minmax"`` (min and max over all batches), ``"ema"`` (moving average of each
    batch's min and max: the first batch's, then ``momentum * previous + (1 - momentum) *
    batch``), ``"kl"`` (TensorRT's entropy calibration), ``"percentile"`` (the ``percentile``
    and ``100 - percentile`` percentiles) or ``"mse"`` (the default with data: least expected
    squared fake-quantization error at the layer's bits); see
    :mod:`squant.ranges.calibration_methods`. ``"kl"``, ``"percentile"`` and ``"mse"`` read the
    data twice (a list or a DataLoader, not a generator). Every range contains 0.

    Raises:
        TypeError: ``bits`` is not an int, or ``calibration_data`` is not iterable.
        QuantizationError: any other value out of its domain, or a data-free range with data
            or a data range without (named in the message).
    """

    bits: int
    input_shape: tuple[int, ...] | None = None
    range: str | None = None
    sigma: float | None = None
    calibration_batch: int = 256
    seed: int = 0
    calibration_data: Iterable | None = field(default=None, compare=False, repr=False)
    momentum: float = 0.9
    percentile: float = 99.99

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits, "act_bits"))
        with_data = self.calibration_data is not None
        if self.range is None:
            object.__setattr__(self, "range", DEFAULT_DATA_RANGE if with_data else "paper")
        _check_choice(self.range, "act_range", ACT_RANGES)
        if with_data:
            self._check_data()
        else:
            self._check_data_free()
        if not _real(self.momentum) or not 0 <= self.momentum < 1:
            raise QuantizationError(f"momentum must be a number in [0, 1), got {self.momentum!r}")
        if not _real(self.percentile) or not 50 < self.percentile <= 100:
            raise QuantizationError(f"percentile must be a number in (50, 100], "
                                    f"got {self.percentile!r}")
        sigma = self.sigma
        if sigma is not None and (not _real(sigma) or not sigma > 0):
            raise QuantizationError(f"sigma must be a positive number or None, got {sigma!r}")
        if not _positive_ints([self.calibration_batch]):  # bools are refused there too
            raise QuantizationError(f"calibration_batch must be a positive int, "
                                    f"got {self.calibration_batch!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise QuantizationError(f"seed must be an int, got {self.seed!r}")

    def _check_data_free(self) -> None:
        if self.range in DATA_RANGES:
            raise QuantizationError(
                f"act_range={self.range!r} sets the ranges from real inputs: give "
                "calibration_data (an iterable of input batches), or use a data-free act_range "
                f"({', '.join(DATA_FREE_RANGES)})")
        if self.input_shape is None:
            raise QuantizationError("act_bits needs input_shape, the shape of one model input "
                                    "without the batch dimension (e.g. (3, 224, 224)), to run "
                                    "the calibration batch (or calibration_data, real inputs)")
        if not _positive_ints(self.input_shape):
            raise QuantizationError(f"input_shape must be a sequence of positive ints, "
                                    f"got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", tuple(int(n) for n in self.input_shape))

    def _check_data(self) -> None:
        if self.range in DATA_FREE_RANGES:
            raise QuantizationError(
                f"act_range={self.range!r} is data-free and does not use calibration_data: "
                f"with data choose one of {', '.join(DATA_RANGES)} (default "
                f"{DEFAULT_DATA_RANGE!r}), or leave calibration_data out")
        for name in ("input_shape", "sigma"):
            if getattr(self, name) is not None:
                raise QuantizationError(
                    f"{name} is an option of the data-free ranges; with calibration_data it is "
                    "not used: leave it out")
        if not isinstance(self.calibration_data, Iterable):
            raise TypeError(f"calibration_data must be an iterable of input batches, got "
                            f"{type(self.calibration_data).__name__}")


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_ints(values: object) -> bool:
    return (isinstance(values, Sequence) and len(values) > 0
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
                    for v in values))
