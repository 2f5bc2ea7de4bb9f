"""The squant file format's description of its tensors: what the JSON header says of each
quantized tensor, and how its codes, scale and zero point are stored and dequantized.

Layout (``README.md``, "File format", is the reference another runtime can read it from):
each quantized tensor ``NAME`` is stored as ``NAME.codes`` (uint8, its codes offset to unsigned
and packed as a little-endian bit stream of ``bits`` bits each), ``NAME.scale`` and
``NAME.zero_point`` (float32); every other tensor is stored as it was. The safetensors
metadata key ``squant`` holds JSON: the format version, the squant version, and per quantized
tensor what is needed to dequantize it without the model. Version 2 adds ``group_size`` (a
tensor with group-wise grids: scale and zero point ``(channels, n_groups)``); files without such
a tensor are still written as version 1, which older readers read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .._version import __version__
from ..core.errors import QuantizationError
from ..core.groups import group_count
from ..core.options import QuantOptions
from ..core.tensor import QuantizedTensor, dequantize_codes
from .packing import pack_codes, packed_size, unpack_codes

FORMAT_VERSION = 2  # the newest version, written when a tensor has group-wise grids
READ_VERSIONS = (1, 2)
METADATA_KEY = "squant"
SUFFIXES = ("codes", "scale", "zero_point")

# torch dtype <-> safetensors dtype string (the ones torch and safetensors share).
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
# The dtypes a quantized tensor may have had, by the name the header gives them.
_FLOAT_DTYPES = {str(d).removeprefix("torch."): d
                 for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                           torch.float8_e4m3fn, torch.float8_e5m2)}


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
    values, block by block. ``range`` is optional in the header (older files: ``"minmax"``).
    ``group_size`` (format version 2; absent or None: one grid per channel): each channel's
    elements are cut into ``n_groups`` groups, so ``scale`` and ``zero_point`` are
    ``(channels, n_groups)``.
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
    range: str = "minmax"
    group_size: int | None = None

    @property
    def count(self) -> int:
        """Number of codes (elements of the original tensor)."""
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        """Number of scales and zero points."""
        return self.groups * self.shape[self.axis]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Shape of ``scale`` and ``zero_point``: ``(channels,)``, or ``(channels, n_groups)``."""
        if self.group_size is None:
            return (self.channels,)
        return (self.channels, group_count(self.count // self.channels, self.group_size))

    def specs(self) -> list[TensorSpec]:
        """The three tensors of the file that hold this tensor."""
        return [TensorSpec(f"{self.name}.codes", torch.uint8,
                           (packed_size(self.count, self.bits),)),
                TensorSpec(f"{self.name}.scale", torch.float32, self.grid_shape),
                TensorSpec(f"{self.name}.zero_point", torch.float32, self.grid_shape)]

    def to_json(self) -> dict:
        """The header entry (JSON-ready; ``group_size`` only for group-wise grids)."""
        grouped = {} if self.group_size is None else {"group_size": self.group_size}
        return {"bits": self.bits, "mode": self.mode, "axis": self.axis, "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch."), "scheme": self.scheme,
                "granularity": self.granularity, "groups": self.groups,
                "range": self.range, **grouped}

    @classmethod
    def from_json(cls, name: str, raw: object, version: int = FORMAT_VERSION) -> QuantizedEntry:
        """Parse and validate a header entry of a file of format ``version``; raises
        ``QuantizationError`` naming the tensor."""
        try:
            if not isinstance(raw, dict):
                raise TypeError("entry is not a JSON object")
            shape = tuple(raw["shape"])
            if (len(shape) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                      for s in shape)):
                raise ValueError(f"bad shape {raw['shape']!r}")
            if raw["dtype"] not in _FLOAT_DTYPES:
                raise ValueError(f"dtype {raw['dtype']!r} is not one of {', '.join(_FLOAT_DTYPES)}")
            if version < 2 and raw.get("group_size") is not None:
                raise ValueError("group_size needs format version 2")
            options = QuantOptions(raw["bits"], raw["mode"], raw["scheme"], raw["granularity"],
                                   raw.get("range", "minmax"), raw.get("group_size"))
            entry = cls(name, options.bits, options.mode, _json_int(raw["axis"], "axis"), shape,
                        _FLOAT_DTYPES[raw["dtype"]], options.scheme, options.granularity,
                        _json_int(raw["groups"], "groups"), options.range, options.group_size)
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
        kernel = math.prod(self.shape[2:])
        if self.group_size is not None and self.group_size % kernel:
            raise QuantizationError(f"header entry of tensor {self.name!r} is invalid: "
                                    f"group_size {self.group_size} is not a multiple of the "
                                    f"kernel size {kernel}")

    def file_tensors(self, qweight: QuantizedTensor) -> dict[str, torch.Tensor]:
        """The file's tensors for ``qweight``: packed codes, float32 scale and zero point."""
        if tuple(qweight.codes.shape) != self.shape:
            raise QuantizationError(f"{self.name}: codes of shape {tuple(qweight.codes.shape)} "
                                    f"do not match the entry's shape {self.shape}")
        return {name: part for name, (part, _) in self.file_parts(qweight).items()}

    def file_parts(self, qweight: QuantizedTensor, start: int = 0
                   ) -> dict[str, tuple[torch.Tensor, int]]:
        """The file's tensors for ``qweight``, which holds the whole tensor or (axis 0, groups
        1) its rows from ``start`` on: each with its byte offset in the file's tensor. A block
        must start at a byte of the packed codes."""
        rows, row = qweight.codes.shape[0], math.prod(self.shape[1:])
        whole = start == 0 and tuple(qweight.codes.shape) == self.shape
        if not whole and (self.axis != 0 or self.groups != 1
                          or tuple(qweight.codes.shape[1:]) != self.shape[1:]
                          or start + rows > self.shape[0] or start * row * self.bits % 8):
            raise QuantizationError(f"{self.name}: codes of shape {tuple(qweight.codes.shape)} "
                                    f"from row {start} do not fit the entry's shape "
                                    f"{self.shape}")
        codes = pack_codes(qweight.codes.detach().cpu().numpy(), self.bits)
        per_row = math.prod(self.grid_shape[1:])  # grids per channel
        shape = (-1, *self.grid_shape[1:])
        scale = qweight.scale.detach().cpu().to(torch.float32).reshape(shape)
        zero_point = qweight.zero_point.detach().cpu().to(torch.float32).reshape(shape)
        offsets = (start * row * self.bits // 8, 4 * start * per_row, 4 * start * per_row)
        return dict(zip((s.name for s in self.specs()),
                        zip((torch.from_numpy(codes), scale, zero_point), offsets)))

    def quantized_tensor(self, packed: torch.Tensor, scale: torch.Tensor,
                         zero_point: torch.Tensor) -> QuantizedTensor:
        """The :class:`QuantizedTensor` the file's three tensors stand for (for a grouped
        ConvTranspose weight: all groups joined, as ``squant.quantize`` holds them)."""
        codes = unpack_codes(packed.numpy(), self.bits, self.count).reshape(self.shape)
        return QuantizedTensor(torch.from_numpy(codes), scale, zero_point, self.bits, self.mode,
                               self.axis, self.scheme, self.granularity, self.range,
                               self.group_size)

    def dequantize(self, qweight: QuantizedTensor) -> torch.Tensor:
        """``(codes + zero_point) * fl32(1 / scale)`` in float32, block by block, in the original
        dtype: the same arithmetic as the quantized modules, so the values are identical."""
        weight = dequantize_codes(qweight.codes, qweight.scale, qweight.zero_point, self.axis,
                                  self.groups, self.group_size)
        return weight.to(self.dtype)


def _json_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    return value


def _describe(error: Exception) -> str:
    """A one-line description of a parse error (``KeyError`` alone only says the key)."""
    if isinstance(error, KeyError):
        return f"missing key {error.args[0]!r}"
    return str(error)


def squant_metadata(entries: list[QuantizedEntry], report: Mapping[str, dict] | None = None,
                    ties: Mapping[str, str] | None = None,
                    user: Mapping[str, str] | None = None) -> dict[str, str]:
    """The safetensors metadata of a squant file: ``squant`` (the JSON header: format version 2
    if a tensor has group-wise grids, else 1, so that older readers read it; entries, the
    optional ``report`` and ``ties``, tied name -> stored name) and ``format``, beside the
    ``user`` metadata of the input (whose ``format`` and ``squant`` keys squant's replace)."""
    grouped = any(e.group_size is not None for e in entries)
    header = {"format_version": FORMAT_VERSION if grouped else 1, "squant_version": __version__,
              "tensors": {e.name: e.to_json() for e in entries}}
    if report:
        header["report"] = dict(report)
    if ties:
        header["ties"] = dict(ties)
    return {**(user or {}), "format": "pt",
            METADATA_KEY: json.dumps(header, separators=(",", ":"))}


def tensor_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    """The spec of a tensor stored as it is; refuses dtypes safetensors cannot hold."""
    if tensor.dtype not in SAFETENSORS_DTYPES:
        raise QuantizationError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
    return TensorSpec(name, tensor.dtype, tuple(tensor.shape))
