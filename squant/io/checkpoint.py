"""Quantizing a checkpoint without its architecture: choosing what to quantize, and quantizing
it in bounded chunks.

The checkpoint (any :class:`~squant.io.sources.Source`) is streamed: tensors are read, quantized
with one batched kernel call per chunk of at most ``CHUNK_BYTES`` (counting the kernels' float32
copy), and written chunk by chunk. A tensor larger than a chunk is read, quantized and written in
blocks of rows: per-channel codes of a block of output channels are exactly those of the whole
tensor, so memory holds one chunk, never a whole tensor or the checkpoint.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..core.errors import QuantizationError
from ..core.options import QuantOptions, check_bits
from ..core.tensor import quantize_with_options
from .checkpoint_stats import STAT_FIELDS, Statistics, tensor_stats
from .file_format import QuantizedEntry, TensorSpec
from .file_io import SafetensorsWriter
from .sources import INDEX_SUFFIX, SAFETENSORS_SUFFIX, TORCH_SUFFIXES, Source, open_source

__all__ = ["CHUNK_BYTES", "INDEX_SUFFIX", "SAFETENSORS_SUFFIX", "STAT_FIELDS", "TORCH_SUFFIXES",
           "Item", "Piece", "Statistics", "chunks", "file_specs", "open_source",
           "plan", "quantize_chunk", "tensor_stats"]

CHUNK_BYTES = 64 << 20  # bytes of one batched kernel call (and its float32 copies)


# ---------------------------------------------------------------------------------------------
# What to quantize, and how.


@dataclass(frozen=True)
class Item:
    """A tensor of the checkpoint: quantized as ``entry`` says, or copied if it has none.
    ``tied``: the names that share its data (stored once, under ``spec.name``)."""

    spec: TensorSpec
    entry: QuantizedEntry | None
    tied: tuple[str, ...] = ()

    @property
    def memory(self) -> int:
        """Bytes it takes in a chunk (a quantized tensor also as the kernels' float32 copy)."""
        copy = 4 * self.spec.nbytes // self.spec.dtype.itemsize if self.entry else 0
        return self.spec.nbytes + copy

    @property
    def options(self) -> QuantOptions:
        """The quantization options of a quantized tensor."""
        e = self.entry
        return QuantOptions(e.bits, e.mode, e.scheme, e.granularity, e.range, e.group_size)


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
    """Every tensor of the checkpoint with what to do with it, in the checkpoint's order; a
    tensor tied to an earlier one is not an item of its own but one of its ``tied`` names.

    Quantized: every floating tensor named ``*weight`` with at least 2 dims (embedding tables
    too, per row: ``squant.load`` makes them ``QuantizedEmbedding``), unless ``skip`` matches
    it; tied tensors are quantized only if no ``skip`` pattern matches any of their names.
    ``layer_bits`` patterns set bits, ``transposed`` ones put output channels on axis 1. Every
    pattern must match some such tensor (a typo must not pass silently).
    """
    for pattern, bits in layer_bits.items():
        check_bits(bits, f"--layer-bits {pattern!r}")
    candidates = [n for n, spec in source.specs.items() if _is_quantizable(spec)]
    _check_patterns(skip, "--skip", candidates)
    _check_patterns(list(layer_bits), "--layer-bits", candidates)
    _check_patterns(transposed, "--transposed", candidates)
    tied: dict[str, list[str]] = {}
    for alias, canonical in source.ties.items():
        tied.setdefault(canonical, []).append(alias)
    items = []
    for name, spec in source.specs.items():
        if name in source.ties:
            continue
        names = [name, *tied.get(name, [])]
        entry = None
        if _is_quantizable(spec) and not any(
                _matches(p, n) for n in names for p in skip):
            bits = next((b for p, b in layer_bits.items()
                         if any(_matches(p, n) for n in names)), default.bits)
            axis = 1 if any(_matches(p, n) for p in transposed for n in names) else 0
            entry = QuantizedEntry(name, bits, default.mode, axis, spec.shape, spec.dtype,
                                   default.scheme, default.granularity, range=default.range,
                                   group_size=default.group_size)
        items.append(Item(spec, entry, tuple(names[1:])))
    if not any(item.entry for item in items):
        raise QuantizationError(f"{source.path}: nothing to quantize (no floating tensor named "
                                "*weight with at least 2 dims, or every one is skipped)")
    return items


# ---------------------------------------------------------------------------------------------
# Chunks, and blocks of rows of the tensors larger than a chunk.


@dataclass(frozen=True)
class Piece:
    """An item, or rows ``start:stop`` (along dim 0) of it (``rows`` None: the whole item)."""

    item: Item
    rows: tuple[int, int] | None = None

    @property
    def memory(self) -> int:
        """Bytes it takes in a chunk (see :attr:`Item.memory`)."""
        return self._share(self.item.memory)

    @property
    def nbytes(self) -> int:
        """Bytes of the checkpoint it covers."""
        return self._share(self.item.spec.nbytes)

    def _share(self, count: int) -> int:
        if self.rows is None:
            return count
        return count // self.item.spec.shape[0] * (self.rows[1] - self.rows[0])


def _row_step(item: Item, limit: int) -> int | None:
    """Rows per block of an item larger than ``limit``, or None if it stays whole: per-tensor
    grids, transposed (axis 1) weights and tensors of one row are never split. Blocks of a
    quantized tensor start at a byte of its packed codes."""
    shape, entry = item.spec.shape, item.entry
    if item.memory <= limit or len(shape) < 1 or shape[0] < 2:
        return None
    align = 1
    if entry is not None:
        if entry.axis != 0 or entry.granularity != "channel" or entry.groups != 1:
            return None
        align = 8 // math.gcd(8, entry.bits * math.prod(shape[1:]))
    rows = max(1, limit // (item.memory // shape[0]))
    return max(align, rows // align * align)


def chunks(items: list[Item], limit: int) -> Iterator[list[Piece]]:
    """Consecutive pieces in groups of at most ``limit`` bytes (a larger piece alone); an item
    larger than ``limit`` comes as blocks of rows, each at most ``limit`` where it can be."""
    pieces: list[Piece] = []
    for item in items:
        step = _row_step(item, limit)
        if step is None:
            pieces.append(Piece(item))
        else:
            rows = item.spec.shape[0]
            pieces += [Piece(item, (start, min(start + step, rows)))
                       for start in range(0, rows, step)]
    chunk, size = [], 0
    for piece in pieces:
        if chunk and size + piece.memory > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(piece)
        size += piece.memory
    if chunk:
        yield chunk


def file_specs(items: list[Item]) -> list[TensorSpec]:
    """The tensors of the output file (tied names are stored once)."""
    return [spec for item in items
            for spec in (item.entry.specs() if item.entry else [item.spec])]


def _read(source: Source, chunk: list[Piece]) -> list[torch.Tensor]:
    whole = source.read([p.item.spec.name for p in chunk if p.rows is None])
    return [whole[p.item.spec.name] if p.rows is None
            else source.read_rows(p.item.spec.name, *p.rows) for p in chunk]


def quantize_chunk(source: Source, chunk: list[Piece], writer: SafetensorsWriter,
                   stats: Statistics | None) -> None:
    """Read a chunk, quantize its tensors in one kernel call, write everything it holds."""
    tensors = _read(source, chunk)
    quantized = [(p, t) for p, t in zip(chunk, tensors) if p.item.entry]
    results = quantize_with_options([t for _, t in quantized],
                                    [p.item.entry.axis for p, _ in quantized],
                                    [p.item.options for p, _ in quantized],
                                    [p.item.spec.name for p, _ in quantized])
    for (piece, tensor), qweight in zip(quantized, results):
        if piece.rows is None:
            for name, part in piece.item.entry.file_tensors(qweight).items():
                writer.write(name, part)
        else:
            for name, (part, offset) in piece.item.entry.file_parts(qweight,
                                                                   piece.rows[0]).items():
                writer.write(name, part, offset)
        if stats is not None:
            stats.add(piece.item.spec.name, tensor, qweight)
    for piece, tensor in zip(chunk, tensors):
        spec = piece.item.spec
        if piece.item.entry is None and piece.rows is None:
            writer.write(spec.name, tensor)
        elif piece.item.entry is None:
            writer.write(spec.name, tensor, piece.rows[0] * (spec.nbytes // spec.shape[0]))
