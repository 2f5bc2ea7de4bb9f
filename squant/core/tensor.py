"""``QuantizedTensor`` and ``quantize_weight(s)``: validation, axis handling, one batch call."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import kernels
from .batch import quantize_batch
from .errors import QuantizationError
from .groups import check_whole_kernels, dequantize_groups
from .options import QuantOptions, check_bits
from .step import step_size


def code_range(bits: int, scheme: str) -> tuple[int, int]:
    """The codes a ``bits``-bit weight grid holds (SQUANT_SPEC.md): ``[-2**(b-1), 2**(b-1) - 1]``
    for ``"asymmetric"``, ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` for ``"symmetric"``."""
    high = 2 ** (bits - 1) - 1
    return (-high if scheme == "symmetric" else -high - 1), high


@dataclass(frozen=True, eq=False, repr=False)
class QuantizedTensor:
    """A weight quantized by SQuant.

    ``codes`` (int8, the weight's shape), ``scale`` and ``zero_point`` (float32, one per output
    channel, i.e. along ``axis``): the weight is approximated by ``(codes + zero_point) / scale``.
    ``range`` says how the grid's range was chosen (see :class:`squant.QuantOptions`). With a
    ``group_size`` (group-wise grids), ``scale`` and ``zero_point`` are ``(O, n_groups)``: output
    channel ``o``'s elements (inputs, then kernel positions, in C order) are cut into groups of
    ``group_size``, the last one shorter, ``n_groups = ceil(I * K / group_size)``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    mode: str
    axis: int
    scheme: str = "asymmetric"
    granularity: str = "channel"
    range: str = "minmax"
    group_size: int | None = None

    @property
    def shape(self) -> torch.Size:
        """Shape of the quantized weight."""
        return self.codes.shape

    @property
    def code_range(self) -> tuple[int, int]:
        """The smallest and largest code of its grid (:func:`code_range`)."""
        return code_range(self.bits, self.scheme)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the codes stand for: ``(codes + zero_point) * fl32(1 / scale)``
        (:func:`dequantize_codes`)."""
        return dequantize_codes(self.codes, self.scale, self.zero_point, self.axis,
                                group_size=self.group_size)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same codes, scale and zero point on ``device`` (itself if already there)."""
        if self.codes.device == torch.device(device):
            return self
        return replace(self, codes=self.codes.to(device),
                       scale=self.scale.to(device),
                       zero_point=self.zero_point.to(device))

    def __repr__(self) -> str:
        grouped = "" if self.group_size is None else f", group_size={self.group_size}"
        return (f"QuantizedTensor(shape={tuple(self.shape)}, bits={self.bits}, mode={self.mode!r}, "
                f"axis={self.axis}, scheme={self.scheme!r}, granularity={self.granularity!r}, "
                f"range={self.range!r}{grouped})")


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     axis: int, groups: int = 1, group_size: int | None = None) -> torch.Tensor:
    """``(codes + zero_point) * step_size(scale)`` in float32, the scale and zero point along
    ``axis``: the float32 sum times the float32 step, as onnxruntime's ``DequantizeLinear``
    computes ``(q - zp) * s`` with squant's ``zp = -zero_point``, ``s = fl32(1 / scale)``, so a
    runtime given squant's codes holds squant's weights bit for bit. (Within about 1 ulp of the
    exact ``(codes + zero_point) / scale``.)

    With ``groups`` (grouped ConvTranspose weights), ``codes`` are ``groups`` equal blocks along
    dim 0, each with its own ``shape[axis]`` channels: ``scale`` and ``zero_point`` list them
    block by block. With ``group_size``, each channel has ``n_groups`` of them
    (:func:`squant.core.groups.dequantize_groups`). The one place this arithmetic lives, so that
    every path that dequantizes (tensors, modules, files) gives the same bits.
    """
    if group_size is not None:
        return dequantize_groups(codes, scale, zero_point, axis, groups, group_size)
    blocks = codes.to(torch.float32).reshape(groups, -1, *codes.shape[1:])
    view = [groups] + [1] * codes.dim()
    view[axis + 1] = -1
    weight = (blocks + zero_point.float().view(view)) * step_size(scale).view(view)
    return weight.reshape(codes.shape)


def _as_float_array(weight: object, name: str) -> np.ndarray:
    """The weight as a numpy float array (bf16 widened to float32 by torch); checks the type."""
    if isinstance(weight, torch.Tensor):
        if not (weight.is_floating_point()):
            raise TypeError(f"{name}: dtype {weight.dtype} is not a floating type; "
                            "quantize float16, bfloat16, float32 or float64 weights")
        if weight.is_meta:
            raise TypeError(f"{name}: is on the meta device and holds no values; "
                            "load the weights first")
        tensor = weight.detach().cpu()
        if tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            tensor = tensor.to(torch.float32)
        return tensor.numpy()
    if isinstance(weight, np.ma.MaskedArray):
        raise TypeError(f"{name}: masked arrays are not supported (the mask would be ignored); "
                        "fill or drop the masked values first")
    if isinstance(weight, np.ndarray):
        weight = np.asarray(weight)  # subclasses such as np.matrix behave as plain arrays
        if weight.dtype.kind != "f":
            raise TypeError(f"{name}: dtype {weight.dtype} is not a floating type; "
                            "quantize float16, float32 or float64 weights")
        return weight
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, "
                    f"got {type(weight).__name__}")


def _check_shape(array: np.ndarray, axis: object, name: str) -> int:
    if array.ndim < 2:
        raise QuantizationError(f"{name}: needs at least 2 dims (output channels and inputs), "
                                f"got shape {tuple(array.shape)}")
    if array.size == 0:
        raise QuantizationError(f"{name}: is empty (shape {tuple(array.shape)})")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name}: axis must be an int, got {axis!r}")
    if not -array.ndim <= axis < array.ndim:
        raise QuantizationError(f"{name}: axis {axis} is out of range for {array.ndim} dims")
    return int(axis) % array.ndim


def _raise_non_finite(array: np.ndarray, name: str) -> None:
    """Say where the first NaN or Inf (or float64 value beyond float32's range) of a weight is."""
    with np.errstate(over="ignore"):
        finite = np.isfinite(array.astype(np.float32, copy=False))
    if finite.all():
        raise QuantizationError(f"{name}: the tensor it is part of holds NaN or Inf values, so "
                                "its per-tensor range is not finite")
    where = tuple(int(i) for i in np.argwhere(~finite)[0])
    count = int(finite.size - np.count_nonzero(finite))
    raise QuantizationError(
        f"{name}: {count} value(s) are NaN or Inf (or overflow float32), first at index "
        f"{where} (value {float(array[where])!r}); fix or skip this weight")


def quantize_weights(
    weights: Sequence[torch.Tensor | np.ndarray],
    bits: int | Sequence[int] = 4,
    mode: str | None = None,
    axes: int | Sequence[int] | None = None,
    *,
    scheme: str = "asymmetric",
    granularity: str = "channel",
    range: str | None = None,
    group_size: int | None = None,
    include_zero: bool = False,
    names: Sequence[str] | None = None,
) -> list[QuantizedTensor]:
    """Quantize many weights with SQuant in one parallel kernel call.

    ``bits`` and ``axes`` are one value for all or one per weight; ``axes`` gives each weight's
    output-channel axis (default 0; 1 for ConvTranspose weights). ``scheme``, ``granularity``,
    ``range``, ``group_size`` and ``include_zero`` are as in :class:`squant.QuantOptions`
    (``mode``/``range`` None: ``"KC"``/``"minmax"``, with a ``group_size`` ``"E"``/``"fit"``).
    ``names`` label the
    weights in error messages. numpy and torch inputs give identical codes; float16, bfloat16
    and float64 are quantized from their float32 value. Inputs are never modified.
    """
    if isinstance(weights, (np.ndarray, torch.Tensor)):
        raise TypeError("quantize_weights takes a sequence of weights; for one weight use "
                        "quantize_weight")
    if isinstance(names, str):
        raise TypeError("names must be a sequence of str, one per weight, not one str")
    weights = list(weights)
    count = len(weights)
    names = [f"weight {i}" for i, _ in enumerate(weights)] if names is None else list(names)
    if len(names) != count:
        raise QuantizationError(f"got {len(names)} names for {count} weights")
    bits_list = _per_weight(bits, count, "bits")
    options = [QuantOptions(check_bits(b, f"bits of {n}"), mode, scheme, granularity, range,
                            group_size, include_zero) for b, n in zip(bits_list, names)]
    return quantize_with_options(weights, _per_weight(0 if axes is None else axes, count, "axes"),
                                 options, names)


def quantize_with_options(
    weights: Sequence[torch.Tensor | np.ndarray],
    axes: Sequence[int],
    options: Sequence[QuantOptions],
    names: Sequence[str],
    ranges: Sequence[tuple[float, float] | None] | None = None,
    moments: Sequence[np.ndarray | None] | None = None,
) -> list[QuantizedTensor]:
    """Validate and quantize weights, each with its own axis and options, in one kernel call.

    ``ranges``: per weight, the ``(min, max)`` a per-tensor grid uses when the weight is one part
    of a larger tensor (None: the weight's own). ``moments``: per weight, its inputs' variances
    and means for ``range="search"`` (see :func:`squant.core.batch.quantize_batch`; None: the
    search minimises the weight's own error).
    """
    arrays = [_as_float_array(w, n) for w, n in zip(weights, names)]
    axes = [_check_shape(a, ax, n) for a, ax, n in zip(arrays, axes, names)]
    if not arrays:
        return []
    moved = [a if ax == 0 else np.moveaxis(a, ax, 0) for a, ax in zip(arrays, axes)]
    views = [m.reshape(m.shape[0], m.shape[1], -1) for m in moved]
    for view, opts, name in zip(views, options, names):
        check_whole_kernels(opts.group_size, view.shape[2], name)
    results = quantize_batch(views, list(options), None if ranges is None else list(ranges),
                             None if moments is None else list(moments))
    for result, array, name in zip(results, arrays, names):
        if not result.finite:
            _raise_non_finite(array, name)
        if not (result.scale > 0).all():  # S = 0: the grid overflows float32
            where = [int(i) for i in np.argwhere(~(result.scale > 0))[0]]
            place = f"channel {where[0]}" + (f", group {where[1]}" if len(where) > 1 else "")
            raise QuantizationError(
                f"{name}: its quantization grid overflows float32 at {place} (max - min, or "
                f"scale * min for nearly equal huge values, is not finite); rescale the weight "
                f"or use scheme='symmetric'")
    for result, view, opts, name in zip(results, views, options, names):
        _warn_below_floor(result.scale.reshape(-1), view, opts, name)
    out = []
    for result, m, ax, opts in zip(results, moved, axes, options):
        codes = result.codes.reshape(m.shape)
        codes = codes if ax == 0 else np.moveaxis(codes, 0, ax)
        out.append(QuantizedTensor(
            codes=torch.from_numpy(np.ascontiguousarray(codes)),
            scale=torch.from_numpy(result.scale),
            zero_point=torch.from_numpy(result.zero_point),
            bits=opts.bits, mode=opts.mode, axis=ax, scheme=opts.scheme,
            granularity=opts.granularity, range=opts.range, group_size=opts.group_size))
    return out


def _warn_below_floor(scale: np.ndarray, view: np.ndarray, options: QuantOptions,
                      name: str) -> None:
    """Warn if channels have a range that is not 0 but below the grid's floor ``1e-8`` (the
    spec's ``max(hi - lo, 1e-8)``, ``max(|lo|, |hi|)`` when symmetric): their scale is the
    floor's, so their codes dequantize to about 0. Checked on the kernel's scales, so that only
    the rare flagged channels are read again."""
    symmetric = options.scheme == "symmetric"
    steps = 2 ** (options.bits - 1) - 1 if symmetric else 2**options.bits - 1
    flagged = np.flatnonzero(scale == np.float32(steps) / kernels.RANGE_FLOOR)
    if flagged.size == 0:
        return
    per_tensor = options.granularity == "tensor"  # then every channel has the tensor's range
    if per_tensor:
        groups = [view.reshape(-1)]
    elif options.group_size is None:
        groups = list(view[flagged].reshape(flagged.size, -1))
    else:  # flagged index f: channel f // n_groups, group f % n_groups
        g, flat = options.group_size, view.reshape(view.shape[0], -1)
        count = scale.size // view.shape[0]
        groups = [flat[f // count, f % count * g : f % count * g + g] for f in flagged]
    if symmetric:
        spans = np.array([np.abs(v).max() for v in groups])
    else:
        spans = np.array([np.float64(v.max()) - v.min() for v in groups])
    tiny = flagged.size if per_tensor and spans[0] > 0 else int(np.count_nonzero(spans > 0))
    what = "channel(s)" if options.group_size is None else "group(s)"
    if tiny:
        warnings.warn(
            f"{name}: {tiny} of {scale.shape[0]} {what} span less than 1e-8 (the grid's "
            f"floor), so their codes dequantize to about 0, as on the paper's grid; rescale "
            f"the weight if such small values matter", UserWarning, stacklevel=4)


def _per_weight(value: object, count: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise QuantizationError(f"got {len(value)} {what} for {count} weights")
        return list(value)
    return [value] * count


def quantize_weight(
    weight: torch.Tensor | np.ndarray,
    bits: int = 4,
    mode: str | None = None,
    axis: int = 0,
    *,
    scheme: str = "asymmetric",
    granularity: str = "channel",
    range: str | None = None,
    group_size: int | None = None,
    include_zero: bool = False,
) -> QuantizedTensor:
    """Quantize one weight with SQuant (the paper's method: ``mode="KC"``, asymmetric per channel,
    the default; with a ``group_size`` the default is the grouped recipe, mode ``"E"`` with
    ``range="fit"``, see :class:`squant.QuantOptions`).

    ``weight`` has output channels on ``axis`` (0 for Linear and Conv, 1 for ConvTranspose) and
    at least 2 dims. Returns a :class:`QuantizedTensor` of int8 codes with a scale and zero point
    per output channel. ``range="search"`` tries shrunk ranges per channel and keeps the one
    that reconstructs the weight best; ``range="fit"`` other steps and placements of the
    integer-zero grid, by a robust error (see :class:`squant.QuantOptions`). ``group_size=g``: a
    grid per group of ``g`` consecutive elements of each output channel (scale and zero point
    ``(O, n_groups)``; for convolutions ``g`` is a multiple of the kernel size).
    ``include_zero=True`` widens every range to include 0 (for int8 runtimes). Raises
    ``TypeError``/``QuantizationError`` (a ``ValueError``) for bad input: a non-float dtype,
    NaN/Inf, bits outside 2..8, fewer than 2 dims, an empty weight, an axis out of range or an
    unknown mode, a group_size below 2 or not a multiple of the kernel size.
    """
    return quantize_weights([weight], bits, mode, [axis], scheme=scheme,
                            granularity=granularity, range=range, group_size=group_size,
                            include_zero=include_zero, names=["weight"])[0]
