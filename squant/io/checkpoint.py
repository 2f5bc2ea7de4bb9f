"""Checkpoints without architecture: reading them safely, choosing what to quantize, and
quantizing them in bounded chunks.

A checkpoint is a state_dict from ``torch.save`` (read with ``weights_only=True`` only) or a
safetensors file (streamed: tensors are read, quantized with one batched kernel call per chunk
of at most ``CHUNK_BYTES`` of float32, and written chunk by chunk, so memory holds one chunk,
never the checkpoint).
"""

from __future__ import annotations

import fnmatch
import pickle
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.errors import QuantizationError
from ..core.options import QuantOptions, check_bits
from ..core.report import layer_report
from ..core.tensor import QuantizedTensor, quantize_with_options
from .file_format import TORCH_DTYPES, QuantizedEntry, TensorSpec, tensor_spec
from .file_io import SafetensorsWriter, first_line

CHUNK_BYTES = 64 << 20  # float32 bytes per batched kernel call: bounds the peak memory
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
STAT_FIELDS = ("kernel_sum_eq_mean", "kernel_sum_eq_max", "kernel_sum_squant_mean",
               "kernel_sum_squant_max", "channel_sum_eq_mean", "channel_sum_eq_max",
               "channel_sum_squant_mean", "channel_sum_squant_max", "max_abs_weight_error")
_STATS_ELEMENTS = 1 << 20  # elements per block of the statistics (float64 temporaries)


# ---------------------------------------------------------------------------------------------
# Reading checkpoints without architecture.


class Source(ABC):
    """A checkpoint's tensors: their specs at once, their data a few at a time."""

    def __init__(self, path: Path, specs: dict[str, TensorSpec]) -> None:
        self.path = path
        self.specs = specs

    @abstractmethod
    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The data of the tensors ``names``."""


class SafetensorsSource(Source):
    """A safetensors file, read through ``safe_open``."""

    def __init__(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as file:
                if "squant" in (file.metadata() or {}):
                    raise QuantizationError(f"{path}: is already a squant file "
                                            "(`squant dequantize` it first)")
                slices = {name: file.get_slice(name) for name in file.keys()}
                specs = {name: TensorSpec(name, _torch_dtype(path, name, s.get_dtype()),
                                          tuple(s.get_shape())) for name, s in slices.items()}
        except SafetensorError as error:
            raise QuantizationError(f"{path}: not a readable safetensors file "
                                    f"({first_line(error)})") from None
        super().__init__(path, specs)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        # Opened anew for each chunk: the pages of the memory map read so far are released
        # (they count as resident memory while the file is open).
        try:
            with safe_open(str(self.path), framework="pt") as file:
                return {name: file.get_tensor(name) for name in names}
        except SafetensorError as error:
            raise QuantizationError(f"{self.path}: cannot read its tensors "
                                    f"({first_line(error)})") from None


class TorchSource(Source):
    """A state_dict saved by ``torch.save``, loaded whole with ``weights_only=True``."""

    def __init__(self, path: Path) -> None:
        self.tensors = _load_state_dict(path)
        super().__init__(path, {n: tensor_spec(n, t) for n, t in self.tensors.items()})

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.tensors[name] for name in names}


def _torch_dtype(path: Path, name: str, code: str) -> torch.dtype:
    if code not in TORCH_DTYPES:
        raise QuantizationError(f"{path}: tensor {name!r} has dtype {code}, which squant "
                                "does not read")
    return TORCH_DTYPES[code]


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    Any failure is the file's (a refused pickle, a truncated zip, random bytes), so every
    exception becomes one ``QuantizationError`` line.
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise QuantizationError(
            f"{path}: refused by torch.load(weights_only=True), which loads tensors and plain "
            f"containers only and never runs code: {_unpickling_reason(error)}") from None
    except Exception as error:  # any failure is the file's: see the docstring
        raise QuantizationError(f"{path}: not a readable torch checkpoint "
                                f"({first_line(error)})") from None
    if not isinstance(state, Mapping):
        raise QuantizationError(f"{path}: holds a {type(state).__name__}, not a state_dict "
                                "(a mapping of names to tensors)")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise QuantizationError(f"{path}: entry {name!r} is a {type(value).__name__}, not a "
                                    "tensor; squant reads flat state_dicts of tensors")
    return dict(state)


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's long weights-only message that says what was refused."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return reasons[0] if reasons else "unsupported pickle content"


def open_source(path: Path) -> Source:
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return SafetensorsSource(path)
    return TorchSource(path)


# ---------------------------------------------------------------------------------------------
# What to quantize, and how.


@dataclass(frozen=True)
class Item:
    """A tensor of the checkpoint: quantized as ``entry`` says, or copied if it has none."""

    spec: TensorSpec
    entry: QuantizedEntry | None

    @property
    def memory(self) -> int:
        """Bytes it takes in a chunk (a quantized tensor also as the kernels' float32 copy)."""
        copy = 4 * self.spec.nbytes // self.spec.dtype.itemsize if self.entry else 0
        return self.spec.nbytes + copy

    @property
    def options(self) -> QuantOptions:
        """The quantization options of a quantized tensor."""
        e = self.entry
        return QuantOptions(e.bits, e.mode, e.scheme, e.granularity, e.range)


def _is_quantizable(spec: TensorSpec) -> bool:
    return (spec.dtype.is_floating_point and spec.name.endswith("weight")
            and len(spec.shape) >= 2 and spec.nbytes > 0)


def _matches(pattern: str, name: str) -> bool:
    """A pattern matches a tensor by its name or by its layer's (``fc`` for ``fc.weight``)."""
    return (fnmatch.fnmatchcase(name, pattern)
            or fnmatch.fnmatchcase(name.removesuffix(".weight"), pattern))


def _check_patterns(patterns: Sequence[str], option: str, names: list[str]) -> None:
    """Each pattern matches some quantizable tensor: a typo must not pass silently."""
    for pattern in patterns:
        if not any(_matches(pattern, name) for name in names):
            known = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise QuantizationError(f"{option} pattern {pattern!r} matches no quantizable "
                                    f"tensor (they are: {known or 'none'})")


def plan(source: Source, default: QuantOptions, skip: Sequence[str],
         layer_bits: Mapping[str, int], transposed: Sequence[str]) -> list[Item]:
    """Every tensor of the checkpoint with what to do with it, in the checkpoint's order.

    Quantized: every floating tensor named ``*weight`` with at least 2 dims, unless ``skip``
    matches it; ``layer_bits`` patterns set bits, ``transposed`` ones put output channels on
    axis 1. Every pattern must match some such tensor (a typo must not pass silently).
    """
    for pattern, bits in layer_bits.items():
        check_bits(bits, f"--layer-bits {pattern!r}")
    candidates = [n for n, spec in source.specs.items() if _is_quantizable(spec)]
    _check_patterns(skip, "--skip", candidates)
    _check_patterns(list(layer_bits), "--layer-bits", candidates)
    _check_patterns(transposed, "--transposed", candidates)
    items = []
    for name, spec in source.specs.items():
        entry = None
        if _is_quantizable(spec) and not any(_matches(p, name) for p in skip):
            bits = next((b for p, b in layer_bits.items() if _matches(p, name)), default.bits)
            axis = 1 if any(_matches(p, name) for p in transposed) else 0
            entry = QuantizedEntry(name, bits, default.mode, axis, spec.shape, spec.dtype,
                                   default.scheme, default.granularity, range=default.range)
        items.append(Item(spec, entry))
    if not any(item.entry for item in items):
        raise QuantizationError(f"{source.path}: nothing to quantize (no floating tensor named "
                                "*weight with at least 2 dims, or every one is skipped)")
    return items


def chunks(items: list[Item], limit: int) -> Iterator[list[Item]]:
    """Consecutive items in groups of at most ``limit`` bytes (a larger item alone)."""
    chunk, size = [], 0
    for item in items:
        if chunk and size + item.memory > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item.memory
    if chunk:
        yield chunk


def file_specs(items: list[Item]) -> list[TensorSpec]:
    return [spec for item in items
            for spec in (item.entry.specs() if item.entry else [item.spec])]


# ---------------------------------------------------------------------------------------------
# Statistics.


def tensor_stats(name: str, weight: torch.Tensor, qweight: QuantizedTensor) -> dict[str, float]:
    """``squant.core.report``'s error statistics of one tensor, computed on blocks of channels (the
    report's float64 temporaries stay small) and merged: means weighted by channel count."""
    axis, channels = qweight.axis, weight.shape[qweight.axis]
    step = max(1, _STATS_ELEMENTS * channels // weight.numel())
    rows, counts = [], []
    for start in range(0, channels, step):
        n = min(step, channels - start)
        part = QuantizedTensor(qweight.codes.narrow(axis, start, n),
                               qweight.scale[start : start + n],
                               qweight.zero_point[start : start + n], qweight.bits, qweight.mode,
                               axis, qweight.scheme, qweight.granularity, qweight.range)
        block = weight.narrow(axis, start, n)
        rows.append(asdict(layer_report(name, "", block.shape, [block], [part], 0.0)))
        counts.append(n)
    merged = {}
    for field in STAT_FIELDS:
        values = [row[field] for row in rows]
        is_max = field.endswith("_max") or field.startswith("max_")
        merged[field] = (max(values) if is_max
                         else sum(v * c for v, c in zip(values, counts)) / channels)
    return merged


def quantize_chunk(source: Source, chunk: list[Item], writer: SafetensorsWriter,
                    stats: dict[str, dict] | None) -> None:
    """Read a chunk, quantize its tensors in one kernel call, write everything it holds."""
    tensors = source.read([item.spec.name for item in chunk])
    quantized = [item for item in chunk if item.entry]
    names = [item.spec.name for item in quantized]
    results = quantize_with_options([tensors[n] for n in names],
                                    [item.entry.axis for item in quantized],
                                    [item.options for item in quantized], names)
    for item, qweight in zip(quantized, results):
        for name, tensor in item.entry.file_tensors(qweight).items():
            writer.write(name, tensor)
        if stats is not None:
            stats[item.spec.name] = tensor_stats(item.spec.name, tensors[item.spec.name],
                                                  qweight)
    for item in chunk:
        if item.entry is None:
            writer.write(item.spec.name, tensors[item.spec.name])
