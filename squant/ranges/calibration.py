"""Activation ranges from real input batches (``calibration_data``): the hooks and the passes.

Each layer whose input is quantized gets a forward pre-hook that summarises every input it
receives, batch by batch, in a fixed-size state (a min, a max, a moving average, a
histogram): nothing holds an activation once its batch is done, so memory does not grow with
the number of batches. The layers' inputs are observed in the weight-quantized model with the
activations still in float (as TensorRT and PyTorch's observers calibrate), all layers in the
same passes; the ranges are fixed afterwards.

- ``"minmax"`` and ``"ema"`` read the data once.
- ``"kl"``, ``"percentile"`` and ``"mse"`` read it twice, the standard two-pass scheme: the
  first pass finds each layer's largest ``|x|`` and sign, the second fills a histogram of
  ``calibration_methods.BINS`` bins per side spanning it (values beyond it, possible only if
  the data changes between passes, count in the end bins). So ``calibration_data`` must be
  iterable twice: a list or a DataLoader, not a generator.

The maths is in :mod:`squant.ranges.calibration_methods`. Calibration runs in eval mode under
``torch.no_grad()`` (BatchNorm statistics untouched), and restores every module's training flag.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..core.errors import QuantizationError, first_line
from ..core.options import ActivationOptions
from . import calibration_methods as methods

ONE_PASS = ("minmax", "ema")
CHUNK = 1 << 22  # elements binned at once: bounds the temporary index tensor


@dataclass
class LayerObserver:
    """What one layer's inputs have shown so far: fixed size, whatever the number of batches."""

    name: str
    bits: int
    low: float = math.inf
    high: float = -math.inf
    ema: tuple[float, float] | None = None
    hist: methods.Histogram | None = None
    batches: int = 0
    momentum: float = 0.9
    histogram_pass: bool = field(default=False, repr=False)

    def observe(self, x: torch.Tensor) -> None:
        """Take one input tensor: check it, update min/max/EMA (first pass) or the histogram."""
        x = x.detach()
        if x.numel() == 0:
            return
        low, high = (float(v) for v in torch.aminmax(x.float().flatten()))
        if not (math.isfinite(low) and math.isfinite(high)):
            kind = "NaN" if math.isnan(low) or math.isnan(high) else "Inf"
            raise QuantizationError(
                f"layer {self.name!r} received {kind} values in its input during calibration "
                f"(batch {self.batches + 1}): check the calibration data and the layers before it")
        if self.histogram_pass:
            self._count(x)
            return
        self.batches += 1
        self.low, self.high = min(self.low, low), max(self.high, high)
        self.ema = methods.ema_update(self.ema, (low, high), self.momentum)

    def start_histogram(self) -> None:
        """Switch to the second pass: a histogram spanning what the first pass saw."""
        limit = max(abs(self.low), abs(self.high))
        self.histogram_pass = True
        self.batches = 0
        if limit > 0:
            self.hist = methods.Histogram.empty(limit, self.low < 0)

    def _count(self, x: torch.Tensor) -> None:
        self.batches += 1
        hist = self.hist
        if hist is None:  # only zeros in the first pass
            return
        bins = len(hist.counts)
        low = -hist.limit if hist.signed else 0.0
        per_unit = bins / (hist.limit - low)
        counts = torch.zeros(bins, dtype=torch.int64, device=x.device)
        zeros = 0
        for chunk in x.flatten().split(CHUNK):
            chunk = chunk.float()
            zeros += chunk.numel() - int(torch.count_nonzero(chunk))
            index = ((chunk - low) * per_unit).clamp_(0, bins - 1).long()  # floor: all >= 0
            counts += torch.bincount(index, minlength=bins)
        hist.counts += counts.cpu().numpy().astype(np.float64)
        hist.zeros += zeros

    def range(self, method: str, percentile: float) -> tuple[float, float]:
        """The layer's ``(lo, hi)`` by ``method``, always containing 0."""
        if method == "minmax":
            return min(self.low, 0.0), max(self.high, 0.0)
        if method == "ema":
            return min(self.ema[0], 0.0), max(self.ema[1], 0.0)
        if self.hist is None or self.hist.counts.sum() == 0:
            return 0.0, 0.0
        if method == "kl":
            return methods.kl_range(self.hist, self.bits)
        if method == "percentile":
            return methods.percentile_range(self.hist, percentile)
        return methods.mse_range(self.hist, self.bits)

    def state_size(self) -> int:
        """Numbers held: constant for a given layout, whatever the number of batches."""
        return 6 + (0 if self.hist is None else len(self.hist.counts) + 2)


def calibrate_from_data(model: nn.Module, layers: list[tuple[str, nn.Module, int]],
                        options: ActivationOptions
                        ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The range ``(lo, hi)`` (float32, 0-dim) of each of ``layers`` (``(name, module, bits)``),
    keyed by ``id(module)``, by ``options.range`` over ``options.calibration_data``.

    Raises:
        QuantizationError: no batch, batches of different per-sample shapes or structure, a
            batch the model does not run, NaN/Inf reaching a layer (named), or a one-shot
            iterator for a two-pass method.
        TypeError: a batch that is not a tensor, tuple/list or dict.
    """
    data = options.calibration_data
    method = options.range
    two_pass = method not in ONE_PASS
    if two_pass and isinstance(data, Iterator):
        raise QuantizationError(
            f"act_range={method!r} reads calibration_data twice (min/max, then histograms), but "
            f"it is a one-shot {type(data).__name__}: pass a list of batches or a DataLoader")
    observers = {id(module): LayerObserver(name, bits, momentum=options.momentum)
                 for name, module, bits in layers}
    device = layers[0][1].codes.device if layers else torch.device("cpu")

    def hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            observers[id(module)].observe(args[0])

    handles = [module.register_forward_pre_hook(hook) for _, module, _ in layers]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            count = _run(model, data, device, "calibration" + (" pass 1/2" if two_pass else ""))
            if two_pass:
                for observer in observers.values():
                    observer.start_histogram()
                second = _run(model, data, device, "calibration pass 2/2")
                if second != count:
                    raise QuantizationError(
                        f"calibration_data gave {count} batches in the first pass and {second} "
                        "in the second: it must give the same batches each time it is read")
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    ranges = {}
    for key, observer in observers.items():
        if observer.batches == 0:
            raise QuantizationError(
                f"layer {observer.name!r} never ran during calibration, so it has no range: "
                "does the model reach it for these inputs?")
        lo, hi = observer.range(method, options.percentile)
        ranges[key] = (torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32))
    return ranges


def _run(model: nn.Module, data: Iterable, device: torch.device, label: str) -> int:
    """Run every batch of ``data`` through ``model``; the number of batches."""
    total = len(data) if hasattr(data, "__len__") else None
    count, first = 0, None
    with tqdm(total=total, desc=f"squant {label}", unit="batch", delay=1.0, leave=False) as bar:
        for index, batch in enumerate(_batches(data)):
            signature = _signature(batch, index)
            if first is None:
                first = signature
            elif signature != first:
                raise QuantizationError(
                    f"calibration batch {index} has per-sample shapes {signature}, but batch 0 "
                    f"had {first}: every batch must hold the same inputs with the same shape "
                    "after the batch dimension")
            _call(model, _to(batch, device), index)
            count += 1
            bar.update(1)
    if count == 0:
        raise QuantizationError("calibration_data holds no batch: give at least one input batch")
    return count


def _batches(data: Iterable) -> Iterator:
    if isinstance(data, torch.Tensor):  # one tensor is one batch
        yield data
        return
    yield from data


def _signature(batch: object, index: int) -> object:
    """The batch's structure with each tensor's per-sample shape (the batch dimension left out)."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape[1:])
    if isinstance(batch, (tuple, list)):
        return tuple(_leaf(value) for value in batch)
    if isinstance(batch, Mapping):
        return tuple(sorted((str(key), _leaf(value)) for key, value in batch.items()))
    raise TypeError(f"calibration batch {index} is a {type(batch).__name__}: a batch must be a "
                    "tensor, a tuple/list (passed as model(*batch)) or a dict (model(**batch))")


def _leaf(value: object) -> object:
    return tuple(value.shape[1:]) if isinstance(value, torch.Tensor) else type(value).__name__


def _to(batch: object, device: torch.device) -> object:
    """The batch with its tensors (top level) on ``device``; a tuple/list becomes a list."""
    def move(value: object) -> object:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    if isinstance(batch, (tuple, list)):
        return [move(value) for value in batch]
    if isinstance(batch, Mapping):
        return {key: move(value) for key, value in batch.items()}
    return move(batch)


def _call(model: nn.Module, batch: object, index: int) -> None:
    try:
        if isinstance(batch, list):
            model(*batch)
        elif isinstance(batch, Mapping):
            model(**batch)
        else:
            model(batch)
    except QuantizationError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as error:
        raise QuantizationError(f"calibration batch {index} ({_describe(batch)}) does not run "
                                f"through {type(model).__name__}: {first_line(error)}") from None


def _describe(batch: object) -> str:
    if isinstance(batch, torch.Tensor):
        return f"shape {tuple(batch.shape)}"
    if isinstance(batch, list):
        return "shapes " + ", ".join(str(tuple(v.shape)) if isinstance(v, torch.Tensor)
                                     else type(v).__name__ for v in batch)
    return "keys " + ", ".join(map(str, batch))
