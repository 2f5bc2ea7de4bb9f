"""Quantized checkpoints: one safetensors file with packed codes and a JSON header.

Layout (``README.md``, "File format", is the reference another runtime can read it from):
each quantized tensor ``NAME`` is stored as ``NAME.codes`` (uint8, its codes offset to unsigned
and packed as a little-endian bit stream of ``bits`` bits each), ``NAME.scale`` and
``NAME.zero_point`` (float32); every other tensor is stored as it was. The safetensors
metadata key ``squant`` holds JSON: the format version, the squant version, and per quantized
tensor what is needed to dequantize it without the model.

Files are written by a streaming writer (tensors arrive one at a time and go to disk at once),
so that the command line never holds a whole checkpoint in memory, and always through a
temporary file in the target folder that replaces the target only when complete.
"""

from __future__ import annotations

import copy
import json
import math
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from numba import njit, prange
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import QuantizationError
from .model import _swap_modules
from .nn import QUANTIZED_CLASSES, QuantizedModule
from .options import QuantOptions
from .tensor import QuantizedTensor

FORMAT_VERSION = 1
METADATA_KEY = "squant"
SUFFIXES = ("codes", "scale", "zero_point")

# torch dtype <-> safetensors dtype string (the ones torch and safetensors share).
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
# The dtypes a quantized tensor may have had, by the name the header gives them.
_FLOAT_DTYPES = {str(d).removeprefix("torch."): d
                 for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


# ---------------------------------------------------------------------------------------------
# Code packing: codes + 2**(bits-1) (unsigned) as a little-endian bit stream. Groups of 8 codes
# fill exactly ``bits`` bytes, so the kernels handle whole groups, in parallel, and a last
# partial group is padded (with unsigned 0) around them.


@njit(cache=True, parallel=True)
def _pack_groups(codes: np.ndarray, bits: int, out: np.ndarray) -> None:
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
def _unpack_groups(packed: np.ndarray, bits: int, out: np.ndarray) -> None:
    """The inverse of :func:`_pack_groups`."""
    offset = 1 << (bits - 1)
    mask = np.uint64((1 << bits) - 1)
    for group in prange(out.shape[0] // 8):
        word = np.uint64(0)
        for b in range(bits):
            word |= np.uint64(packed[group * bits + b]) << np.uint64(8 * b)
        for j in range(8):
            out[group * 8 + j] = np.int8(np.int64((word >> np.uint64(j * bits)) & mask) - offset)


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take packed: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """int8 codes in ``[-2**(bits-1), 2**(bits-1) - 1]`` (any shape, read in C order) as the
    file's packed uint8 stream of ``ceil(count * bits / 8)`` bytes."""
    flat = np.ascontiguousarray(codes, dtype=np.int8).reshape(-1)
    whole = flat.size // 8 * 8
    out = np.empty(packed_size(flat.size, bits), np.uint8)
    _pack_groups(flat[:whole], bits, out)
    if whole < flat.size:
        last = np.full(8, -(1 << (bits - 1)), np.int8)  # unsigned 0: zero padding bits
        last[: flat.size - whole] = flat[whole:]
        tail = np.empty(bits, np.uint8)
        _pack_groups(last, bits, tail)
        out[whole // 8 * bits :] = tail[: out.size - whole // 8 * bits]
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` int8 codes of a packed uint8 stream (the inverse of :func:`pack_codes`)."""
    if packed.shape != (packed_size(count, bits),):
        raise QuantizationError(f"{count} codes of {bits} bits take {packed_size(count, bits)} "
                                f"bytes packed, got an array of shape {tuple(packed.shape)}")
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    whole = count // 8 * 8
    out = np.empty(count, np.int8)
    _unpack_groups(packed, bits, out[:whole])
    if whole < count:
        tail = np.zeros(bits, np.uint8)
        tail[: packed.size - whole // 8 * bits] = packed[whole // 8 * bits :]
        last = np.empty(8, np.int8)
        _unpack_groups(tail, bits, last)
        out[whole:] = last[: count - whole]
    return out


# ---------------------------------------------------------------------------------------------
# What one quantized tensor is, as the header describes it.


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of the file: its name, dtype and shape (its size in bytes follows)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the tensor's data takes."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class QuantizedEntry:
    """The header's description of one quantized tensor ``name``.

    ``shape`` and ``dtype`` are the original float tensor's. ``groups`` is 1 except for grouped
    ConvTranspose weights: the tensor is then ``groups`` equal blocks along dim 0, each with its
    own ``shape[axis]`` channels, so ``scale`` and ``zero_point`` hold ``groups * shape[axis]``
    values, block by block.
    """

    name: str
    bits: int
    mode: str
    axis: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    scheme: str = "asymmetric"
    granularity: str = "channel"
    groups: int = 1

    @property
    def count(self) -> int:
        """Number of codes (elements of the original tensor)."""
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        """Number of scales and zero points."""
        return self.groups * self.shape[self.axis]

    def specs(self) -> list[TensorSpec]:
        """The three tensors of the file that hold this tensor."""
        return [TensorSpec(f"{self.name}.codes", torch.uint8,
                           (packed_size(self.count, self.bits),)),
                TensorSpec(f"{self.name}.scale", torch.float32, (self.channels,)),
                TensorSpec(f"{self.name}.zero_point", torch.float32, (self.channels,))]

    def to_json(self) -> dict:
        """The header entry (JSON-ready)."""
        return {"bits": self.bits, "mode": self.mode, "axis": self.axis, "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch."), "scheme": self.scheme,
                "granularity": self.granularity, "groups": self.groups}

    @classmethod
    def from_json(cls, name: str, raw: object) -> QuantizedEntry:
        """Parse and validate a header entry; raises ``QuantizationError`` naming the tensor."""
        try:
            if not isinstance(raw, dict):
                raise TypeError("entry is not a JSON object")
            shape = tuple(raw["shape"])
            if (len(shape) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                      for s in shape)):
                raise ValueError(f"bad shape {raw['shape']!r}")
            if raw["dtype"] not in _FLOAT_DTYPES:
                raise ValueError(f"dtype {raw['dtype']!r} is not one of {', '.join(_FLOAT_DTYPES)}")
            options = QuantOptions(raw["bits"], raw["mode"], raw["scheme"], raw["granularity"])
            entry = cls(name, options.bits, options.mode, _json_int(raw["axis"], "axis"), shape,
                        _FLOAT_DTYPES[raw["dtype"]], options.scheme, options.granularity,
                        _json_int(raw["groups"], "groups"))
        except (KeyError, TypeError, ValueError) as error:
            raise QuantizationError(f"header entry of tensor {name!r} is invalid: "
                                    f"{_describe(error)}") from None
        entry._check()
        return entry

    def _check(self) -> None:
        if not 0 <= self.axis < len(self.shape):
            raise QuantizationError(f"header entry of tensor {self.name!r} is invalid: axis "
                                    f"{self.axis} out of range for shape {self.shape}")
        if self.groups < 1 or self.shape[0] % self.groups:
            raise QuantizationError(f"header entry of tensor {self.name!r} is invalid: groups "
                                    f"{self.groups} does not divide dim 0 of {self.shape}")

    def file_tensors(self, qweight: QuantizedTensor) -> dict[str, torch.Tensor]:
        """The file's tensors for ``qweight``: packed codes, float32 scale and zero point."""
        if tuple(qweight.codes.shape) != self.shape:
            raise QuantizationError(f"{self.name}: codes of shape {tuple(qweight.codes.shape)} "
                                    f"do not match the entry's shape {self.shape}")
        codes = pack_codes(qweight.codes.detach().cpu().numpy(), self.bits)
        scale = qweight.scale.detach().cpu().to(torch.float32).reshape(-1)
        zero_point = qweight.zero_point.detach().cpu().to(torch.float32).reshape(-1)
        return dict(zip((s.name for s in self.specs()),
                        (torch.from_numpy(codes), scale, zero_point)))

    def quantized_tensor(self, packed: torch.Tensor, scale: torch.Tensor,
                         zero_point: torch.Tensor) -> QuantizedTensor:
        """The :class:`QuantizedTensor` the file's three tensors stand for (for a grouped
        ConvTranspose weight: all groups joined, as ``squant.quantize`` holds them)."""
        codes = unpack_codes(packed.numpy(), self.bits, self.count).reshape(self.shape)
        return QuantizedTensor(torch.from_numpy(codes), scale, zero_point, self.bits, self.mode,
                               self.axis, self.scheme, self.granularity)

    def dequantize(self, qweight: QuantizedTensor) -> torch.Tensor:
        """``(codes + zero_point) / scale`` in float32, block by block, in the original dtype:
        the same arithmetic as the quantized modules, so the values are identical."""
        blocks = qweight.codes.to(torch.float32).view(self.groups, -1, *self.shape[1:])
        view = [self.groups] + [1] * len(self.shape)
        view[self.axis + 1] = -1
        weight = (blocks + qweight.zero_point.view(view)) / qweight.scale.view(view)
        return weight.view(self.shape).to(self.dtype)


def _json_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    return value


def _describe(error: Exception) -> str:
    """A one-line description of a parse error (``KeyError`` alone only says the key)."""
    if isinstance(error, KeyError):
        return f"missing key {error.args[0]!r}"
    return str(error)


def squant_metadata(entries: list[QuantizedEntry], report: Mapping[str, dict] | None = None
                    ) -> dict[str, str]:
    """The safetensors metadata of a squant file: ``squant`` (the JSON header) and ``format``."""
    from . import __version__

    header = {"format_version": FORMAT_VERSION, "squant_version": __version__,
              "tensors": {e.name: e.to_json() for e in entries}}
    if report:
        header["report"] = dict(report)
    return {"format": "pt", METADATA_KEY: json.dumps(header, separators=(",", ":"))}


# ---------------------------------------------------------------------------------------------
# Writing: a safetensors file whose tensors arrive one at a time.


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A new temporary path in ``path``'s folder that replaces ``path`` if the block succeeds
    and is removed if it fails: a failed write never leaves a partial or stale file behind.
    The file is created with the usual permissions (``0o666`` less the umask)."""
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _layout(specs: list[TensorSpec]) -> dict[str, tuple[int, int]]:
    """Byte range of each tensor in the data section: widest dtypes first, then by name (as
    safetensors' own writer does), so that every tensor is aligned to its element size."""
    ranges, offset = {}, 0
    for spec in sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name)):
        ranges[spec.name] = (offset, offset + spec.nbytes)
        offset += spec.nbytes
    return ranges


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's data in C order as raw bytes (little-endian, as safetensors stores it)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class SafetensorsWriter:
    """Writes a safetensors file whose tensors (fixed in advance by their specs) arrive one at a
    time, in any order.

    Each tensor's data goes at once to its place in a spool file, so memory holds one tensor at
    a time; on a clean exit from the ``with`` block the header (with ``metadata``, which may be
    set until then) and the data are written to a temporary file that replaces ``path``. On an
    exception nothing is written.
    """

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise QuantizationError(f"tensor names clash in the file: {', '.join(duplicates)}")
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._specs = {s.name: s for s in specs}
        self._ranges = _layout(specs)
        self._pending = set(names)
        self._spool = tempfile.TemporaryFile(dir=self.path.parent)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's data; its dtype and shape must be those of its spec."""
        spec = self._specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise QuantizationError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                                    f"expected {spec.dtype} {spec.shape}")
        _pwrite_all(self._spool.fileno(), _tensor_bytes(tensor), self._ranges[name][0])
        self._pending.discard(name)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        try:
            if kind is None:
                self._commit()
        finally:
            self._spool.close()

    def _header(self) -> bytes:
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        for name, (start, end) in self._ranges.items():
            spec = self._specs[name]
            header[name] = {"dtype": _SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [start, end]}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-aligned, as safetensors pads it
        return len(text).to_bytes(8, "little") + text

    def _commit(self) -> None:
        if self._pending:
            raise QuantizationError(f"tensors never written: {', '.join(sorted(self._pending))}")
        size = sum(spec.nbytes for spec in self._specs.values())
        with atomic_path(self.path) as temporary, open(temporary, "wb") as out:
            out.write(self._header())
            self._spool.seek(0)
            while size:
                block = self._spool.read(min(size, 1 << 24))
                out.write(block)
                size -= len(block)


def tensor_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    """The spec of a tensor stored as it is; refuses dtypes safetensors cannot hold."""
    if tensor.dtype not in _SAFETENSORS_DTYPES:
        raise QuantizationError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
    return TensorSpec(name, tensor.dtype, tuple(tensor.shape))


# ---------------------------------------------------------------------------------------------
# Reading.


class SquantReader:
    """An open squant file: its header parsed and checked, its tensors read on demand.

    Raises ``QuantizationError`` for a file that is not safetensors, is truncated or corrupt,
    lacks the squant metadata, has an unknown format version or an inconsistent header.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
            self._header = self._file.metadata() or {}
            names = list(self._file.keys())
            self._dtypes = {n: self._file.get_slice(n).get_dtype() for n in names}
            self._shapes = {n: tuple(self._file.get_slice(n).get_shape()) for n in names}
        except SafetensorError as error:
            raise QuantizationError(f"{self.path}: not a readable safetensors file "
                                    f"({first_line(error)})") from None
        try:
            self._read_header(names)
        except BaseException:
            self.close()
            raise

    def _read_header(self, names: list[str]) -> None:
        header = self._parse_header()
        self.squant_version = str(header.get("squant_version", "unknown"))
        self.entries = {name: QuantizedEntry.from_json(name, raw)
                        for name, raw in _object_field(header, "tensors", self.path).items()}
        self.report: dict[str, dict] = _object_field(header, "report", self.path, {})
        for entry in self.entries.values():
            self._check_stored(entry)
        claimed = {spec.name for e in self.entries.values() for spec in e.specs()}
        self.float_names = [n for n in names if n not in claimed]
        for name in self.float_names:
            if self._dtypes[name] not in TORCH_DTYPES:
                raise QuantizationError(f"{self.path}: tensor {name!r} has dtype "
                                        f"{self._dtypes[name]}, which squant does not read")

    def __enter__(self) -> SquantReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file (its memory map)."""
        self._file.__exit__(None, None, None)

    def _parse_header(self) -> dict:
        if METADATA_KEY not in self._header:
            raise QuantizationError(f"{self.path}: not a squant file (no {METADATA_KEY!r} "
                                    "metadata); use squant.save or `squant quantize` to make one")
        try:
            header = json.loads(self._header[METADATA_KEY])
        except json.JSONDecodeError as error:
            raise QuantizationError(f"{self.path}: corrupt squant header ({error})") from None
        if not isinstance(header, dict):
            raise QuantizationError(f"{self.path}: corrupt squant header (not a JSON object)")
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise QuantizationError(
                f"{self.path}: squant format version {version!r} is not supported (this squant "
                f"reads version {FORMAT_VERSION}); upgrade squant or re-quantize")
        return header

    def _check_stored(self, entry: QuantizedEntry) -> None:
        """The file holds the entry's three tensors with the dtypes and shapes it implies."""
        for spec in entry.specs():
            dtype = _SAFETENSORS_DTYPES[spec.dtype]
            found = (self._dtypes.get(spec.name), self._shapes.get(spec.name))
            if found != (dtype, spec.shape):
                raise QuantizationError(
                    f"{self.path}: tensor {spec.name!r} should be {dtype} of shape {spec.shape}"
                    + (", it is missing" if found[0] is None else
                       f", got {found[0]} of shape {found[1]}"))

    def spec(self, name: str) -> TensorSpec:
        """Dtype and shape of tensor ``name`` of the state_dict the file stands for (a quantized
        one: the original tensor's)."""
        if name in self.entries:
            entry = self.entries[name]
            return TensorSpec(name, entry.dtype, entry.shape)
        return TensorSpec(name, TORCH_DTYPES[self._dtypes[name]], self._shapes[name])

    def stored_bytes(self, name: str) -> int:
        """Bytes the file spends on tensor ``name`` (a quantized one: its three tensors)."""
        if name in self.entries:
            return sum(spec.nbytes for spec in self.entries[name].specs())
        return self.spec(name).nbytes

    def read_tensor(self, name: str) -> torch.Tensor:
        """A tensor of the file as stored (a float tensor, or a quantized tensor's part)."""
        try:
            return self._file.get_tensor(name)
        except SafetensorError as error:
            raise QuantizationError(f"{self.path}: cannot read tensor {name!r} "
                                    f"({first_line(error)})") from None

    def read_quantized(self, name: str) -> QuantizedTensor:
        """A quantized tensor's codes (unpacked, int8, original shape), scale and zero point."""
        entry = self.entries[name]
        return entry.quantized_tensor(*(self.read_tensor(spec.name) for spec in entry.specs()))

    def read_dequantized(self, name: str) -> torch.Tensor:
        """Any tensor as a float tensor: quantized ones dequantized to their original dtype."""
        if name in self.entries:
            return self.entries[name].dequantize(self.read_quantized(name))
        return self.read_tensor(name)

    @property
    def names(self) -> list[str]:
        """Every tensor of the state_dict the file stands for (quantized ones by their name)."""
        return sorted([*self.entries, *self.float_names])


def first_line(error: BaseException) -> str:
    """The first line of an error's message (torch's and safetensors' run over several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _object_field(header: dict, key: str, path: Path, default: dict | None = None) -> dict:
    """``header[key]``, which must be a JSON object."""
    value = header.get(key, default)
    if not isinstance(value, dict):
        raise QuantizationError(f"{path}: corrupt squant header ({key!r} is not an object)")
    return value


# ---------------------------------------------------------------------------------------------
# save / load.


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _quantized_modules(model: nn.Module) -> dict[str, QuantizedModule]:
    """Every quantized module by each of its names."""
    return {name: m for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, QuantizedModule)}


def _module_entry(prefix: str, module: QuantizedModule) -> QuantizedEntry:
    groups = module.groups if getattr(module, "transposed", False) else 1
    return QuantizedEntry(_join(prefix, "weight"), module.bits, module.mode, module.axis,
                          tuple(module.codes.shape), module.weight_dtype, module.scheme,
                          module.granularity, groups)


def save(qmodel: nn.Module, path: str | os.PathLike) -> None:
    """Write a model quantized by :func:`squant.quantize` to one safetensors file.

    Each quantized layer's weight is stored under ``<layer>.weight`` as packed codes with its
    scale and zero point; every other tensor of the state_dict (biases, norms, skipped layers)
    as it is. :func:`squant.load` reads it back, with or without the model.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"save expects a torch.nn.Module, got {type(qmodel).__name__}")
    modules = _quantized_modules(qmodel)
    if not modules:
        raise QuantizationError(f"{type(qmodel).__name__} has no quantized layer: quantize it "
                                "with squant.quantize first")
    entries = {prefix: _module_entry(prefix, m) for prefix, m in modules.items()}
    state = qmodel.state_dict()
    for prefix in modules:
        for suffix in SUFFIXES:
            del state[_join(prefix, suffix)]
    specs = [spec for entry in entries.values() for spec in entry.specs()]
    specs += [tensor_spec(name, tensor) for name, tensor in state.items()]
    with SafetensorsWriter(Path(path), specs) as writer:
        for prefix, entry in entries.items():
            module = modules[prefix]
            qweight = QuantizedTensor(module.codes, module.scale, module.zero_point, entry.bits,
                                      entry.mode, entry.axis, entry.scheme, entry.granularity)
            for name, tensor in entry.file_tensors(qweight).items():
                writer.write(name, tensor)
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.metadata = squant_metadata(list(entries.values()))


def load(path: str | os.PathLike, model: nn.Module | None = None
         ) -> nn.Module | dict[str, torch.Tensor]:
    """Read a squant file (from :func:`squant.save` or ``squant quantize``).

    With ``model`` (a float model of the same architecture, left untouched): a quantized copy
    of it, each quantized tensor ``<layer>.weight`` of the file becoming ``<layer>``'s quantized
    module and every other tensor loaded as it is. Without: the file as a float state_dict,
    quantized tensors dequantized to their original dtype.

    Raises ``QuantizationError`` for a corrupt or foreign file, or a model that does not match.
    """
    with SquantReader(path) as reader:
        if model is None:
            return {name: reader.read_dequantized(name) for name in reader.names}
        if not isinstance(model, nn.Module):
            raise TypeError(f"load expects a torch.nn.Module, got {type(model).__name__}")
        return _load_into(reader, model)


def _target_modules(reader: SquantReader, model: nn.Module) -> dict[str, nn.Module]:
    """The model's module for each quantized tensor of the file; checks that they match."""
    modules = dict(model.named_modules(remove_duplicate=False))
    targets = {}
    for name, entry in reader.entries.items():
        prefix = _layer_name(name)
        module = None if prefix is None else modules.get(prefix)
        if module is None or type(module) not in QUANTIZED_CLASSES:
            raise QuantizationError(f"{reader.path}: quantized tensor {name!r} has no "
                                    f"quantizable layer {prefix!r} in {type(model).__name__}")
        transposed = getattr(module, "transposed", False)
        expected = (tuple(module.weight.shape), 1 if transposed else 0,
                    module.groups if transposed else 1)
        if (entry.shape, entry.axis, entry.groups) != expected:
            raise QuantizationError(
                f"{reader.path}: tensor {name!r} (shape {entry.shape}, axis {entry.axis}, "
                f"groups {entry.groups}) does not fit layer {prefix!r} of the model (shape "
                f"{expected[0]}, axis {expected[1]}, groups {expected[2]})")
        targets[prefix] = module
    return targets


def _layer_name(name: str) -> str | None:
    """``"features.0"`` for ``"features.0.weight"`` (``""`` for ``"weight"``), else None."""
    if name == "weight":
        return ""
    return name[: -len(".weight")] if name.endswith(".weight") else None


def _copy_model(model: nn.Module, targets: dict[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` that does not copy the weights about to be replaced by
    quantized ones, unless another layer also uses them (it gets its own copy, which the
    state_dict then fills: the input model is never written to)."""
    target_ids = {id(m) for m in targets.values()}
    used_elsewhere = {id(p) for m in model.modules() if id(m) not in target_ids
                      for p in m.parameters(recurse=False)}
    memo = {id(m.weight): m.weight for m in targets.values() if id(m.weight) not in used_elsewhere}
    return copy.deepcopy(model, memo)


def _load_into(reader: SquantReader, model: nn.Module) -> nn.Module:
    targets = _target_modules(reader, model)
    model = _copy_model(model, targets)
    replacements = {}
    for prefix in targets:
        module = model.get_submodule(prefix)
        if id(module) not in replacements:
            qweight = reader.read_quantized(_join(prefix, "weight"))
            replacements[id(module)] = QUANTIZED_CLASSES[type(module)].from_float(module, qweight)
    model = _swap_modules(model, replacements)
    state = {name: reader.read_tensor(name) for name in reader.float_names}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise QuantizationError(f"{reader.path} does not match {type(model).__name__}: "
                                f"{' '.join(str(error).split())}") from None
    quantized_keys = {_join(p, s) for p in _quantized_modules(model) for s in SUFFIXES}
    missing = [key for key in missing if key not in quantized_keys]
    if missing or unexpected:
        raise QuantizationError(
            f"{reader.path} does not match {type(model).__name__}: "
            + "; ".join(f"{what}: {', '.join(keys[:10])}{', ...' if len(keys) > 10 else ''}"
                        for what, keys in (("missing in the file", missing),
                                           ("not in the model", unexpected)) if keys))
    return model
