"""``squant.save`` and ``squant.load``: a quantized model to one squant file and back.

The file format is described in ``file_format.py`` and README.md ("File format").
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..core.errors import QuantizationError
from ..core.tensor import QuantizedTensor
from ..nn import QuantizedModule
from ..nn.base import quantized_class
from ..nn.module_tree import copy_replacing, swap_modules
from .file_format import SUFFIXES, QuantizedEntry, squant_metadata, tensor_spec
from .file_io import SafetensorsWriter, SquantReader


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _quantized_modules(model: nn.Module) -> dict[str, QuantizedModule]:
    """Every quantized module by each of its names."""
    return {name: m for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, QuantizedModule)}


def _module_entry(prefix: str, module: QuantizedModule) -> QuantizedEntry:
    return QuantizedEntry(_join(prefix, "weight"), module.bits, module.mode, module.axis,
                          tuple(module.codes.shape), module.weight_dtype, module.scheme,
                          module.granularity, module.groups_of_codes, module.range,
                          getattr(module, "group_size", None))


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
                                      entry.mode, entry.axis, entry.scheme, entry.granularity,
                                      entry.range, entry.group_size)
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

    ``model`` may be a skeleton built on the meta device (``with torch.device("meta"):
    model = Net()``): the file's tensors then become the model's, nothing is allocated twice.

    Raises ``QuantizationError`` for a corrupt or foreign file, or a model that does not match.
    """
    with SquantReader(path) as reader:
        if model is None:
            return reader.read_state_dict()
        if not isinstance(model, nn.Module):
            raise TypeError(f"load expects a torch.nn.Module, got {type(model).__name__}")
        return _load_into(reader, model)


def _is_float_layer(module: nn.Module | None, entry: QuantizedEntry) -> bool:
    """A layer squant cannot quantize (an ``nn.Embedding``) whose weight the entry fits."""
    weight = getattr(module, "weight", None)
    return (module is not None and quantized_class(module) is None
            and isinstance(weight, torch.Tensor) and weight.is_floating_point()
            and tuple(weight.shape) == entry.shape and (entry.axis, entry.groups) == (0, 1))


def _target_modules(reader: SquantReader, model: nn.Module
                    ) -> tuple[dict[str, nn.Module], list[str]]:
    """The model's module for each quantized tensor of the file (tied names included), and the
    quantized tensors of float layers squant cannot quantize (loaded dequantized, with a
    warning); checks that they match."""
    modules = dict(model.named_modules(remove_duplicate=False))
    targets, dequantized = {}, []
    for name in filter(reader.is_quantized, reader.names):
        entry = reader.entries[reader.canonical(name)]
        prefix = _layer_name(name)
        module = None if prefix is None else modules.get(prefix)
        if _is_float_layer(module, entry):
            warnings.warn(f"{reader.path}: {name!r} is stored quantized, but squant has no "
                          f"quantized {type(module).__name__}: it is loaded dequantized into "
                          "that layer's float weight", stacklevel=4)
            dequantized.append(name)
            continue
        if module is None or quantized_class(module) is None:
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
    return targets, dequantized


def _layer_name(name: str) -> str | None:
    """``"features.0"`` for ``"features.0.weight"`` (``""`` for ``"weight"``), else None."""
    if name == "weight":
        return ""
    return name[: -len(".weight")] if name.endswith(".weight") else None


def _enable_stored_activations(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Turn on input quantization, with the stored bits, on each quantized layer whose
    ``act_bits`` is in the file, so that ``load_state_dict`` then restores its range."""
    for prefix, module in _quantized_modules(model).items():
        bits = state.get(_join(prefix, "act_bits"))
        if bits is not None and not module.act_enabled:
            module.enable_activation_quantization(int(bits))


def _add_stored_biases(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each bias-free quantized layer whose bias is in the file (``bias_correction`` adds
    one) a bias Parameter, so that ``load_state_dict`` then fills it."""
    for prefix, module in _quantized_modules(model).items():
        bias = state.get(_join(prefix, "bias"))
        if bias is not None and module.bias is None:
            module.bias = nn.Parameter(torch.empty_like(bias, device=module.codes.device))


def _load_into(reader: SquantReader, model: nn.Module) -> nn.Module:
    targets, dequantized = _target_modules(reader, model)
    model = copy_replacing(model, targets.values())
    replacements, qweights = {}, {}  # tied names get the same codes
    for prefix in targets:
        module = model.get_submodule(prefix)
        stored = reader.canonical(_join(prefix, "weight"))
        if stored not in qweights:
            qweights[stored] = reader.read_quantized(stored)
        if id(module) not in replacements:
            replacements[id(module)] = quantized_class(module).from_float(
                module, qweights[stored])
    model = swap_modules(model, replacements)
    state = {name: reader.read_dequantized(name) if name in dequantized
             else reader.read_tensor(name)
             for name in reader.names if not reader.is_quantized(name) or name in dequantized}
    _enable_stored_activations(model, state)
    _add_stored_biases(model, state)
    on_meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    try:  # a skeleton built on the meta device takes the file's tensors themselves
        missing, unexpected = model.load_state_dict(state, strict=False, assign=on_meta)
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
    still_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers())
                  if t.is_meta]
    if still_meta:
        raise QuantizationError(
            f"{reader.path}: the model was built on the meta device and the file does not hold "
            f"{', '.join(still_meta[:10])}{', ...' if len(still_meta) > 10 else ''}; build those "
            "tensors first")
    return model
