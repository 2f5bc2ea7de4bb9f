"""A model's selected weights to one batched kernel call, each distinct weight once.

A layer quantizes one weight (Linear, Conv, Embedding: ``weight``) or several
(``nn.MultiheadAttention``'s ``in_proj_weight``, an LSTM's ``weight_ih_l0``, ...): its quantized
class names them (``weight_names``). Every named Parameter becomes one entry of the batch,
keyed by the Parameter's ``id``, so that a Parameter shared by several layers (tied weights,
also across kinds such as a GPT's ``wte`` Embedding and ``lm_head`` Linear) is quantized once.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .core.errors import QuantizationError
from .core.report import LayerReport, layer_report
from .core.tensor import QuantizedTensor, quantize_with_options
from .nn.base import (
    computed_kind,
    computed_weight,
    quantized_class,
    registered_base,
    weight_layout,
)
from .nn.selection import Layer
from .ranges.batchnorm import Moments, same_moments


def weight_blocks(layer: Layer, name: str) -> tuple[list[torch.Tensor], int]:
    """The weight ``name`` of a layer as the blocks quantized independently, with their
    output-channel axis.

    ConvTranspose weights are ``(in, out/groups, *kernel)``: each group's block of input rows
    has its own output channels on axis 1.
    """
    weight = layer.weight(name).detach()
    _, axis, groups = weight_layout(layer.module, name)
    return list(weight.chunk(groups, dim=0)) if groups > 1 else [weight], axis


@dataclass
class SharedWeight:
    """One distinct weight Parameter: the first layer using it and the Parameter's name there,
    its blocks and their results, and the names of every use (``layer`` for a layer's
    ``weight``, ``layer.param`` for another Parameter)."""

    layer: Layer
    name: str
    blocks: list[torch.Tensor]
    axis: int
    parts: list[QuantizedTensor]
    names: list[str]

    @property
    def weight(self) -> torch.Tensor:
        """The float weight (a Parameter, or the effective weight weight_norm computes)."""
        return self.layer.weight(self.name)

    @property
    def joined(self) -> QuantizedTensor:
        """The whole weight's quantized tensor (blocks concatenated along dim 0)."""
        return join_blocks(self.parts)


def layer_weights(layer: Layer) -> list[str]:
    """The names of the Parameters of ``layer`` that its quantized class quantizes."""
    return quantized_class(layer.module).weight_names(layer.module)


def _use_names(layer: Layer, name: str) -> list[str]:
    return list(layer.names) if name == "weight" else [
        f"{n}.{name}" if n else name for n in layer.names]


def quantize_shared(layers: list[Layer], moments: dict[int, Moments]
                    ) -> dict[int, SharedWeight]:
    """Quantize each distinct weight once, all in one batched call; keyed by ``id`` of the
    weight Parameter. ``moments``: per layer ``id``, its BN input moments (for the search).

    Raises ``QuantizationError`` for a weight shared by layers asking for different options or
    reading its channels differently (e.g. a Conv and a ConvTranspose)."""
    shared: dict[int, SharedWeight] = {}
    users: dict[int, list[nn.Module]] = {}
    for layer in layers:
        for name in layer_weights(layer):
            key = id(layer.weight(name))
            users.setdefault(key, []).append(layer.module)
            blocks, axis = weight_blocks(layer, name)
            if key not in shared:
                shared[key] = SharedWeight(layer, name, blocks, axis, [], _use_names(layer, name))
                continue
            entry = shared[key]
            entry.names.extend(_use_names(layer, name))
            first = entry.layer
            if first.options != layer.options:
                raise QuantizationError(
                    f"layers {first.names[0]!r} and {layer.names[0]!r} share one weight but are "
                    f"asked for different quantization ({first.options} vs {layer.options})")
            if (len(blocks), axis) != (len(entry.blocks), entry.axis):
                raise QuantizationError(
                    f"layers {first.names[0]!r} ({type(first.module).__name__}) and "
                    f"{layer.names[0]!r} ({type(layer.module).__name__}) share one weight but "
                    "read its output channels differently (axis or groups), so one set of codes "
                    "cannot serve both; untie them or skip one")
    search_tables = _search_moments(shared, users, moments)
    if not search_tables and any(e.layer.options.range == "search" for e in shared.values()):
        warnings.warn('range="search": no searched layer has an input that BatchNorms determine '
                      "(a folded or BN-free model?), so every channel's range is chosen by its "
                      "weight error alone, which can cost accuracy against minmax",
                      stacklevel=3)
    arrays, axes, options, names, ranges, tables = [], [], [], [], [], []
    for key, entry in shared.items():
        layer = entry.layer
        label = f"layer {layer.names[0]!r} ({type(layer.module).__name__}) {entry.name}"
        whole = tensor_range(entry.weight) if len(entry.blocks) > 1 else None
        for index, block in enumerate(entry.blocks):
            arrays.append(block)
            axes.append(entry.axis)
            options.append(layer.options)
            names.append(label if len(entry.blocks) == 1 else f"{label}, group {index}")
            ranges.append(whole)
            tables.append(search_tables.get(key))
    results = iter(quantize_with_options(arrays, axes, options, names, ranges, tables))
    for entry in shared.values():
        entry.parts = [next(results) for _ in entry.blocks]
    return shared


def _search_moments(shared: dict[int, SharedWeight], users: dict[int, list[nn.Module]],
                    moments: dict[int, Moments]) -> dict[int, np.ndarray]:
    """For each weight quantized with ``range="search"`` whose layers all have the same input
    moments: those moments as the kernels take them, ``(groups, 2, in/groups)`` (variances,
    means)."""
    tables = {}
    for key, modules in users.items():
        if shared[key].layer.options.range != "search":
            continue
        given = same_moments([moments.get(id(module)) for module in modules])
        if given is None:
            continue
        mean, variance = given
        if not (torch.isfinite(mean).all() and torch.isfinite(variance).all()):
            continue
        groups = getattr(modules[0], "groups", 1)
        tables[key] = torch.stack([variance.reshape(groups, -1), mean.reshape(groups, -1)],
                                  dim=1).numpy()
    return tables


def tensor_range(weight: torch.Tensor) -> tuple[np.float32, np.float32]:
    """``(min, max)`` of a whole weight as float32: a per-tensor grid spans every group."""
    values = weight.detach().float()
    return np.float32(values.min()), np.float32(values.max())


def join_blocks(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """One quantized tensor of blocks quantized apart (concatenated along dim 0)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return QuantizedTensor(
        codes=torch.cat([p.codes for p in parts], dim=0),
        scale=torch.cat([p.scale for p in parts]),
        zero_point=torch.cat([p.zero_point for p in parts]),
        bits=first.bits, mode=first.mode, axis=first.axis, scheme=first.scheme,
        granularity=first.granularity, range=first.range, group_size=first.group_size)


def report_rows(model: nn.Module, shared: dict[int, SharedWeight]) -> list[LayerReport]:
    """Error statistics per distinct weight; each weight is also timed alone for its row. The
    activation range and bits are those of the row's first layer (None: float input)."""
    rows = []
    for entry in shared.values():
        layer = entry.layer
        start = time.perf_counter()
        count = len(entry.blocks)
        quantize_with_options(entry.blocks, [entry.axis] * count, [layer.options] * count,
                              layer.names[:1] * count)
        alone = time.perf_counter() - start
        kind = type(layer.module).__name__
        if computed_weight(layer.module):
            base = registered_base(type(layer.module)).__name__
            kind = f"{base} (effective weight of {computed_kind(layer.module)}, removed)"
        rows.append(layer_report(", ".join(entry.names), kind,
                                 entry.weight.shape, entry.blocks, entry.parts, alone,
                                 model.get_submodule(layer.names[0])))
    return rows
