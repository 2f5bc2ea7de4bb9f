"""Reading and writing squant files: safetensors files whose tensors are written one at a
time (so the command line never holds a whole checkpoint in memory) and always through a
temporary file in the target folder that replaces the target only when complete.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import torch
from safetensors import SafetensorError, safe_open

from ..core.errors import QuantizationError, first_line
from ..core.tensor import QuantizedTensor
from .file_format import (
    METADATA_KEY,
    READ_VERSIONS,
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    QuantizedEntry,
    TensorSpec,
)

if sys.byteorder != "little":  # safetensors stores little-endian data; raw bytes are copied
    raise ImportError("squant's file I/O needs a little-endian machine")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A new temporary path in ``path``'s folder that replaces ``path`` if the block succeeds
    and is removed if it fails: a failed write never leaves a partial or stale file behind.
    The file is created with the usual permissions (``0o666`` less the umask); if it cannot
    be, the ``OSError`` names ``path``, not the hidden temporary the user never asked for."""
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as error:
        raise type(error)(error.errno, error.strerror, str(path)) from None
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
        self._missing = {s.name: s.nbytes for s in specs}  # bytes not written yet
        self._spool = tempfile.TemporaryFile(dir=self.path.parent)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def write(self, name: str, tensor: torch.Tensor, offset: int | None = None) -> None:
        """Write one tensor's data; its dtype and shape must be those of its spec. With
        ``offset``: a part of it (its rows from a byte ``offset`` on), of the spec's dtype."""
        spec = self._specs[name]
        data = _tensor_bytes(tensor)
        if offset is None:
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise QuantizationError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                                        f"expected {spec.dtype} {spec.shape}")
            offset = 0
        elif tensor.dtype != spec.dtype or not 0 <= offset <= spec.nbytes - len(data):
            raise QuantizationError(f"{name}: a part of {tensor.dtype} {len(data)} bytes at "
                                    f"{offset} does not fit {spec.dtype} {spec.shape}")
        try:
            _pwrite_all(self._spool.fileno(), data, self._ranges[name][0] + offset)
        except OSError as error:
            raise self._write_error(error) from None
        self._missing[name] -= len(data)

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
            header[name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [start, end]}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-aligned, as safetensors pads it
        return len(text).to_bytes(8, "little") + text

    def _write_error(self, error: OSError) -> QuantizationError:
        """One line for a failed write; a full disk says how much room the write needs."""
        size = sum(spec.nbytes for spec in self._specs.values())
        need = ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            need = (f"; writing it needs about {2 * size / 1e6:.0f} MB free in "
                    f"{self.path.parent} (twice the output's {size / 1e6:.0f} MB: the data, "
                    "then the file)")
        return QuantizationError(f"{self.path}: cannot write the output "
                                 f"({error.strerror or error}){need}; nothing was written")

    def _commit(self) -> None:
        pending = sorted(name for name, missing in self._missing.items() if missing)
        if pending:
            raise QuantizationError(f"tensors never written: {', '.join(pending)}")
        size = sum(spec.nbytes for spec in self._specs.values())
        try:
            with atomic_path(self.path) as temporary, open(temporary, "wb") as out:
                out.write(self._header())
                self._spool.seek(0)
                while size:
                    block = self._spool.read(min(size, 1 << 24))
                    out.write(block)
                    size -= len(block)
        except OSError as error:
            raise self._write_error(error) from None


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
        self.format_version: int = header["format_version"]
        self.entries = {name: QuantizedEntry.from_json(name, raw, self.format_version)
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
        self.ties: dict[str, str] = _object_field(header, "ties", self.path, {})
        for alias, stored in self.ties.items():
            if (not isinstance(stored, str) or alias in names or alias in self.entries
                    or (stored not in self.entries and stored not in self.float_names)):
                raise QuantizationError(f"{self.path}: corrupt squant header (tie {alias!r} -> "
                                        f"{stored!r} does not name a stored tensor)")
        for entry in self.entries.values():
            self._check_grid(entry)

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
        except RecursionError:
            raise QuantizationError(f"{self.path}: corrupt squant header (JSON nested too "
                                    "deeply)") from None
        if not isinstance(header, dict):
            raise QuantizationError(f"{self.path}: corrupt squant header (not a JSON object)")
        version = header.get("format_version")
        if type(version) is not int or version not in READ_VERSIONS:
            raise QuantizationError(
                f"{self.path}: squant format version {version!r} is not supported (this squant "
                f"reads versions {', '.join(map(str, READ_VERSIONS))}); upgrade squant or "
                "re-quantize")
        return header

    def _check_stored(self, entry: QuantizedEntry) -> None:
        """The file holds the entry's three tensors with the dtypes and shapes it implies."""
        for spec in entry.specs():
            dtype = SAFETENSORS_DTYPES[spec.dtype]
            found = (self._dtypes.get(spec.name), self._shapes.get(spec.name))
            if found != (dtype, spec.shape):
                raise QuantizationError(
                    f"{self.path}: tensor {spec.name!r} should be {dtype} of shape {spec.shape}"
                    + (", it is missing" if found[0] is None else
                       f", got {found[0]} of shape {found[1]}"))

    def _check_grid(self, entry: QuantizedEntry) -> None:
        """Every scale is finite and positive, every zero point finite: anything else would
        dequantize to Inf or NaN weights."""
        _, scale_spec, zero_point_spec = entry.specs()
        scale = self.read_tensor(scale_spec.name)
        if not bool((scale > 0).all() and scale.isfinite().all()):
            raise QuantizationError(f"{self.path}: tensor {entry.name!r} has a scale that is "
                                    "zero, negative, NaN or Inf; the file is corrupt")
        if not bool(self.read_tensor(zero_point_spec.name).isfinite().all()):
            raise QuantizationError(f"{self.path}: tensor {entry.name!r} has a zero point that "
                                    "is NaN or Inf; the file is corrupt")

    def canonical(self, name: str) -> str:
        """The stored tensor a name stands for (itself, or the one it is tied to)."""
        return self.ties.get(name, name)

    def is_quantized(self, name: str) -> bool:
        """Whether ``name`` (a tensor of the state_dict, tied or not) is stored quantized."""
        return self.canonical(name) in self.entries

    def spec(self, name: str) -> TensorSpec:
        """Dtype and shape of tensor ``name`` of the state_dict the file stands for (a quantized
        one: the original tensor's)."""
        stored = self.canonical(name)
        if stored in self.entries:
            entry = self.entries[stored]
            return TensorSpec(name, entry.dtype, entry.shape)
        return TensorSpec(name, TORCH_DTYPES[self._dtypes[stored]], self._shapes[stored])

    def stored_bytes(self, name: str) -> int:
        """Bytes the file spends on tensor ``name`` (a quantized one: its three tensors; a tied
        one: none)."""
        if name in self.ties:
            return 0
        if name in self.entries:
            return sum(spec.nbytes for spec in self.entries[name].specs())
        return self.spec(name).nbytes

    def read_tensor(self, name: str) -> torch.Tensor:
        """A tensor of the file as stored (a float tensor, or a quantized tensor's part)."""
        try:
            return self._file.get_tensor(self.canonical(name))
        except SafetensorError as error:
            raise QuantizationError(f"{self.path}: cannot read tensor {name!r} "
                                    f"({first_line(error)})") from None

    def read_quantized(self, name: str) -> QuantizedTensor:
        """A quantized tensor's codes (unpacked, int8, original shape), scale and zero point."""
        entry = self.entries[self.canonical(name)]
        return entry.quantized_tensor(*(self.read_tensor(spec.name) for spec in entry.specs()))

    def read_dequantized(self, name: str) -> torch.Tensor:
        """Any tensor as a float tensor: quantized ones dequantized to their original dtype."""
        if self.is_quantized(name):
            return self.entries[self.canonical(name)].dequantize(self.read_quantized(name))
        return self.read_tensor(name)

    def read_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor as a float tensor (:meth:`read_dequantized`); tied names share one."""
        state: dict[str, torch.Tensor] = {}
        for name in sorted(self.names, key=lambda n: n in self.ties):
            stored = self.canonical(name)
            state[name] = state[stored] if stored in state else self.read_dequantized(name)
        return {name: state[name] for name in self.names}

    @property
    def names(self) -> list[str]:
        """Every tensor of the state_dict the file stands for (quantized ones by their name,
        tied ones too)."""
        return sorted([*self.entries, *self.float_names, *self.ties])


def _object_field(header: dict, key: str, path: Path, default: dict | None = None) -> dict:
    """``header[key]``, which must be a JSON object."""
    value = header.get(key, default)
    if not isinstance(value, dict):
        raise QuantizationError(f"{path}: corrupt squant header ({key!r} is not an object)")
    return value
