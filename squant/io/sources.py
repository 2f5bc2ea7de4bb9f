"""Checkpoints without architecture, as people have them: one safetensors file, one
``torch.save`` state_dict (or a trainer's checkpoint holding one), or a sharded checkpoint (an
``*.index.json`` with its ``weight_map``, or a folder of ``*-00001-of-00003.*`` shards). Each is a
:class:`Source`: every tensor's spec at once, the data a few tensors (or rows) at a time.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.errors import QuantizationError, first_line
from .file_format import METADATA_KEY, TORCH_DTYPES, TensorSpec, tensor_spec
from .torch_files import load_checkpoint, storage_key

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".index.json"
_SHARD = re.compile(r".*-(\d{5})-of-(\d{5})(\.safetensors|\.bin)$")


class Source(ABC):
    """A checkpoint's tensors: their specs at once, their data a few at a time.

    ``ties`` maps a tensor that shares its data with an earlier one (tied weights) to that one;
    ``specs`` lists every name, tied ones included. ``metadata`` is the user metadata of a
    safetensors input, ``note`` a line for the user about how the file was read (or None),
    ``files`` the files it reads. Raises ``QuantizationError`` for a name no safetensors file
    can hold (``__metadata__``, a name that is not valid UTF-8).
    """

    def __init__(self, path: Path, specs: dict[str, TensorSpec], files: list[Path],
                 ties: dict[str, str] | None = None, metadata: dict[str, str] | None = None,
                 note: str | None = None) -> None:
        for name in specs:
            _check_name(path, name)
        self.path, self.specs, self.files = path, specs, files
        self.ties = ties or {}
        self.metadata = metadata or {}
        self.note = note

    @abstractmethod
    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The data of the tensors ``names``."""

    @abstractmethod
    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along dim 0) of tensor ``name``."""


def _check_name(path: Path, name: str) -> None:
    if name == "__metadata__":
        raise QuantizationError(f"{path}: a tensor is named '__metadata__', which safetensors "
                                "reserves for the file's metadata; rename it")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise QuantizationError(f"{path}: tensor name {ascii(name)} is not valid UTF-8 (it "
                                "holds a lone surrogate); rename it") from None


class SafetensorsSource(Source):
    """A safetensors file, read through ``safe_open``; its user metadata is kept."""

    def __init__(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                if METADATA_KEY in metadata:
                    raise QuantizationError(f"{path}: is already a squant file "
                                            "(`squant dequantize` it first)")
                slices = {name: file.get_slice(name) for name in file.keys()}
                specs = {name: TensorSpec(name, _torch_dtype(path, name, s.get_dtype()),
                                          tuple(s.get_shape())) for name, s in slices.items()}
        except SafetensorError as error:
            raise QuantizationError(f"{path}: not a readable safetensors file "
                                    f"({first_line(error)})") from None
        metadata = {k: v for k, v in metadata.items() if k != "format"}
        super().__init__(path, specs, [path], metadata=metadata)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        # Opened anew for each chunk: the pages of the memory map read so far are released
        # (they count as resident memory while the file is open).
        try:
            with safe_open(str(self.path), framework="pt") as file:
                return {name: file.get_tensor(name) for name in names}
        except SafetensorError as error:
            raise QuantizationError(f"{self.path}: cannot read its tensors "
                                    f"({first_line(error)})") from None

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        try:
            with safe_open(str(self.path), framework="pt") as file:
                return file.get_slice(name)[start:stop]
        except SafetensorError as error:
            raise QuantizationError(f"{self.path}: cannot read tensor {name!r} "
                                    f"({first_line(error)})") from None


class TorchSource(Source):
    """A state_dict saved by ``torch.save`` (memory-mapped where torch can), or the state_dict
    of a trainer's checkpoint. Tensors saved once under several names are tied."""

    def __init__(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        self.tensors = checkpoint.tensors
        ties, first = {}, {}
        for name, tensor in self.tensors.items():
            if tensor.numel():
                ties[name] = first.setdefault(storage_key(tensor), name)
        ties = {name: canonical for name, canonical in ties.items() if name != canonical}
        note = None
        if checkpoint.key is not None:
            others = ", ".join(checkpoint.other_keys[:6]) or "nothing else"
            note = (f"{path}: a trainer's checkpoint; quantizing the state_dict under key "
                    f"{checkpoint.key!r} (it also holds: {others})")
        super().__init__(path, {n: tensor_spec(n, t) for n, t in self.tensors.items()}, [path],
                         ties, note=note)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.tensors[name] for name in names}

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name][start:stop]


class ShardedSource(Source):
    """A checkpoint split in shards (safetensors or ``torch.save`` files), read shard by shard;
    ties are kept within a shard. The shards' user metadata is merged."""

    def __init__(self, path: Path, shards: list[Path], weight_map: dict[str, str] | None) -> None:
        self.shards = [open_file(shard) for shard in shards]
        self._owner: dict[str, Source] = {}
        specs, ties, metadata = {}, {}, {}
        for shard in self.shards:
            for name, spec in shard.specs.items():
                if name in self._owner:
                    raise QuantizationError(f"{path}: tensor {name!r} is in two shards, "
                                            f"{self._owner[name].path.name} and "
                                            f"{shard.path.name}")
                self._owner[name] = shard
                specs[name] = spec
            ties.update(shard.ties)
            metadata.update(shard.metadata)
        if weight_map is not None:
            _check_weight_map(path, weight_map, {n: s.path.name for n, s in self._owner.items()})
        notes = [shard.note for shard in self.shards if shard.note]
        super().__init__(path, specs, shards, ties, metadata, notes[0] if notes else None)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for shard in self.shards:
            wanted = [name for name in names if self._owner[name] is shard]
            if wanted:
                tensors.update(shard.read(wanted))
        return {name: tensors[name] for name in names}

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._owner[name].read_rows(name, start, stop)


def _check_weight_map(path: Path, weight_map: dict[str, str], found: dict[str, str]) -> None:
    """The index's ``weight_map`` says where each tensor is: the shards must agree."""
    for name, shard in weight_map.items():
        if found.get(name) != shard:
            where = f"in {found[name]}" if name in found else "in no shard"
            raise QuantizationError(f"{path}: the index puts tensor {name!r} in {shard}, but it "
                                    f"is {where}")
    extra = sorted(set(found) - set(weight_map))
    if extra:
        raise QuantizationError(f"{path}: tensor {extra[0]!r} of shard {found[extra[0]]} is "
                                "not in the index's weight_map")


def _torch_dtype(path: Path, name: str, code: str) -> torch.dtype:
    if code not in TORCH_DTYPES:
        raise QuantizationError(f"{path}: tensor {name!r} has dtype {code}, which squant "
                                "does not read")
    return TORCH_DTYPES[code]


def _read_index(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The shards an ``*.index.json`` names (in the index's folder) and its ``weight_map``."""
    try:
        index = json.loads(path.read_bytes())
    except RecursionError:
        raise QuantizationError(f"{path}: not a readable index (JSON nested too deeply)"
                                ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QuantizationError(f"{path}: not a readable index ({first_line(error)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise QuantizationError(f"{path}: not a checkpoint index (no 'weight_map' of tensor "
                                "names to shard files)")
    shards = []
    for shard in dict.fromkeys(weight_map.values()):
        if Path(shard).name != shard or shard in (".", ".."):
            raise QuantizationError(f"{path}: shard {shard!r} is not a file name in the "
                                    "index's folder")
        if Path(shard).suffix.lower() not in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES):
            raise QuantizationError(f"{path}: shard {shard!r} has an unknown extension")
        if not (path.parent / shard).is_file():
            raise QuantizationError(f"{path}: shard {shard} is missing")
        shards.append(path.parent / shard)
    return shards, weight_map


def _folder_shards(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """A folder's index (safetensors first) or, without one, its numbered shards."""
    indexes = sorted(folder.glob(f"*{SAFETENSORS_SUFFIX}{INDEX_SUFFIX}"))
    indexes += sorted(p for p in folder.glob(f"*{INDEX_SUFFIX}") if p not in indexes)
    if indexes:
        return _read_index(indexes[0])
    numbered: dict[str, list[tuple[int, int, Path]]] = {}
    for path in folder.iterdir():
        match = _SHARD.fullmatch(path.name)
        if match:
            numbered.setdefault(match[3], []).append((int(match[1]), int(match[2]), path))
    found = numbered.get(SAFETENSORS_SUFFIX) or numbered.get(".bin")
    if not found:
        raise QuantizationError(f"{folder}: a folder, but it holds no checkpoint index "
                                "(*.index.json) and no shards (*-00001-of-0000N.safetensors "
                                "or .bin)")
    found.sort()
    total = found[0][1]
    if [(i, n) for i, n, _ in found] != [(i, total) for i in range(1, total + 1)]:
        raise QuantizationError(f"{folder}: shards of {total} are missing or extra (found "
                                f"{', '.join(p.name for *_, p in found)})")
    return [p for *_, p in found], None


def open_file(path: Path) -> Source:
    """One checkpoint file, by its extension (the caller checked it)."""
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return SafetensorsSource(path)
    return TorchSource(path)


def open_source(path: Path) -> Source:
    """Any checkpoint: a file, an ``*.index.json``, or a folder of shards."""
    if path.is_dir():
        return ShardedSource(path, *_folder_shards(path))
    if path.name.lower().endswith(INDEX_SUFFIX):
        return ShardedSource(path, *_read_index(path))
    return open_file(path)
