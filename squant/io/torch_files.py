"""Reading ``torch.save`` checkpoints that nobody vouches for: only through
``torch.load(weights_only=True)`` (tensors and plain containers, never code), after checking that
the zip archive does not expand to far more than its size, memory-mapped where it can be, and
unwrapped from a trainer's checkpoint (Lightning's ``.ckpt``, ``{"state_dict": ..., "epoch":
...}``, ``{"model": ...}``) down to its state_dict.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import QuantizationError, first_line

# Keys under which trainers store the model's state_dict, tried in this order.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")
# A checkpoint's zip entries may declare at most this many times the file's size, plus
# _EXPANSION_SLACK bytes: torch.save stores tensors uncompressed, so a real checkpoint expands
# to about its own size, and a zip bomb (a few MB of deflated zeros) is refused before loading.
MAX_EXPANSION = 4
_EXPANSION_SLACK = 64 << 20


@dataclass(frozen=True)
class TorchCheckpoint:
    """A loaded checkpoint: its tensors by name, the key of the trainer's dict they were under
    (None for a plain state_dict) and the other keys of that dict."""

    tensors: dict[str, torch.Tensor]
    key: str | None = None
    other_keys: tuple[str, ...] = ()


def load_checkpoint(path: Path) -> TorchCheckpoint:
    """Load a state_dict or a trainer's checkpoint holding one.

    Raises ``QuantizationError`` (one line, naming ``path``) for a zip bomb, a pickle that holds
    objects other than tensors and containers (never run), an unreadable file, or a content
    that is neither a state_dict nor a dict holding one under :data:`STATE_DICT_KEYS`.
    """
    mmap = _check_archive(path)
    state = _torch_load(path, mmap)
    if not isinstance(state, Mapping):
        raise QuantizationError(f"{path}: holds a {type(state).__name__}, not a state_dict "
                                "(a mapping of names to tensors)")
    if not state:
        raise QuantizationError(f"{path}: holds no tensors")
    if _is_state_dict(state):
        return TorchCheckpoint(_check_entries(path, state))
    key = next((k for k in STATE_DICT_KEYS
                if isinstance(state.get(k), Mapping) and _is_state_dict(state[k])), None)
    if key is None:
        name, value = next((k, v) for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise QuantizationError(f"{path}: entry {name!r} is a {type(value).__name__}, not a "
                                "tensor, and no entry among "
                                f"{', '.join(STATE_DICT_KEYS)} holds a state_dict of tensors")
    others = tuple(str(k) for k in state if k != key)
    return TorchCheckpoint(_check_entries(path, state[key]), key, others)


def _is_state_dict(state: Mapping) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _check_entries(path: Path, state: Mapping) -> dict[str, torch.Tensor]:
    for name in state:
        if not isinstance(name, str):
            raise QuantizationError(f"{path}: tensor name {name!r} is a "
                                    f"{type(name).__name__}, not a string")
    return dict(state)


def _check_archive(path: Path) -> bool:
    """Refuse a zip archive whose entries declare more than ``MAX_EXPANSION`` times the file's
    size; True if it can be memory-mapped (a zip whose entries are all stored uncompressed, as
    ``torch.save`` writes them). Files that are not zips (torch's legacy format, garbage) are
    left to ``torch.load``, which reads them no larger than they are."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    size = path.stat().st_size
    expanded = sum(entry.file_size for entry in entries)
    if expanded > MAX_EXPANSION * size + _EXPANSION_SLACK:
        raise QuantizationError(
            f"{path}: its zip entries expand to {expanded / 1e6:.0f} MB, "
            f"{expanded / size:.0f}x the {size / 1e6:.1f} MB file (torch.save stores tensors "
            f"uncompressed); squant refuses checkpoints that expand over {MAX_EXPANSION}x "
            "(a zip bomb?)")
    return all(entry.compress_type == zipfile.ZIP_STORED for entry in entries)


def _torch_load(path: Path, mmap: bool) -> object:
    """``torch.load(weights_only=True)``, memory-mapped if ``mmap``. Any failure is the file's
    (a refused pickle, a truncated zip, random bytes), so it becomes one ``QuantizationError``
    line."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = _unpickling_reason(error)
        if reason.startswith(("Unsupported global", "Unsupported class")):
            raise QuantizationError(
                f"{path}: holds objects other than tensors and plain containers ({reason}); "
                "squant loads tensors only and will not run the code that would build them"
            ) from None
        raise QuantizationError(f"{path}: not a readable torch checkpoint ({reason})") from None
    except Exception as error:  # any failure is the file's: see the docstring
        raise QuantizationError(f"{path}: not a readable torch checkpoint "
                                f"({first_line(error)})") from None


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """What torch's long weights-only message says was refused, without its advice to load
    the file some other way: ``"Unsupported global: GLOBAL io.open"``."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation",
                   "(1)", "(2)")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    reason = reasons[0] if reasons else "unsupported pickle content"
    reason = reason.removeprefix("WeightsUnpickler error:").strip()
    for advice in (" was not an allowed global", ". Please use", " Please use"):
        reason = reason.split(advice, 1)[0]
    return reason.rstrip(". ")


def storage_key(tensor: torch.Tensor) -> tuple:
    """Tensors with equal keys are the same data (tied weights saved once by ``torch.save``)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)
