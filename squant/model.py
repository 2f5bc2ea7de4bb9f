"""``quantize(model)`` and ``dequantize(qmodel)``: select layers, one batched kernel call, swap.

Every selected weight of the model goes through one call of the kernels (parallel across
layers). The input model is left untouched unless ``inplace=True``: the copy shares nothing
with it, yet the weights being quantized are never copied as float.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .core.errors import QuantizationError
from .core.options import ActivationOptions, QuantOptions
from .core.report import QuantizationReport, layer_report
from .core.tensor import QuantizedTensor, quantize_with_options
from .nn import QuantizedModule
from .nn.base import quantized_class
from .nn.module_tree import copy_replacing, swap_modules
from .nn.selection import Layer, left_in_float, relocate, select_layers
from .ranges.activations import calibrate, enable_activations
from .ranges.batchnorm import Moments, bn_input_moments, bn_ranges, same_moments
from .ranges.bias_correction import correct_bias


def quantize(
    model: nn.Module,
    bits: int = 4,
    mode: str = "KC",
    *,
    skip: str | Iterable[str] = (),
    layer_bits: Mapping[str, int] | None = None,
    layer_options: Mapping[str, Mapping[str, object]] | None = None,
    scheme: str = "asymmetric",
    granularity: str = "channel",
    range: str = "minmax",
    group_size: int | None = None,
    inplace: bool = False,
    cache_weights: bool = True,
    report: bool = False,
    activations: ActivationOptions | None = None,
    act_bits: int | None = None,
    input_shape: Sequence[int] | None = None,
    act_range: str | None = None,
    sigma: float | None = None,
    calibration_batch: int | None = None,
    seed: int | None = None,
    bias_correction: bool = False,
) -> nn.Module:
    """Quantize every Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d weight of ``model``.

    All selected weights go through one batched SQuant kernel call; each layer is replaced by
    its quantized module (``squant.nn``), which holds int8 codes, per-channel scale and zero
    point, and the float bias.

    Args:
        bits: 2..8, for every layer not in ``layer_bits``.
        mode: ``"KC"`` (the paper's SQuant), ``"K"``, ``"C"`` or ``"E"`` (round to nearest).
        skip: a module name or fnmatch pattern (``"fc"``, ``"*.downsample.0"``), or several,
            left in float; a pattern that names a container (``"features.0"``, ``"layer4"``)
            covers every layer inside it, in ``layer_bits`` and ``layer_options`` too.
        layer_bits: ``{pattern: bits}``; the first pattern matching a layer's name wins.
        layer_options: ``{pattern: {option: value}}`` with options among ``bits``, ``mode``,
            ``scheme``, ``granularity``, ``range``, ``group_size`` (e.g. ``{"fc": {"scheme":
            "symmetric"}}``); the first matching pattern's options override the others for
            that layer.
        scheme, granularity, range: the grid (see :class:`squant.QuantOptions`). With
            ``range="search"`` each channel keeps, of its full range and ranges shrunk to 0.94 ..
            0.52 of it, the one with the least error after SQuant's flips. For a layer whose
            input BatchNorms determine (as for ``act_range="bn"``: through ReLU/ReLU6,
            Identity, Dropout, flatten, residual adds), the error is the expected squared
            output error ``sum(var * d**2) + sum(mean * d)**2`` over the input channels'
            means and variances (``d``: the weight's error); for the others (no BN before them,
            a folded model, or one ``torch.fx`` cannot trace: a warning) it is the weight's
            squared error ``sum(d**2)``. If no searched layer has BN inputs, a warning says
            so: by the weight's error alone the search can lose to minmax (README, "Accuracy
            on real models").
        group_size: None (one grid per output channel, the paper's) or an int ``g >= 2``: a grid
            per group of ``g`` consecutive inputs of each output channel (README, "Group-wise
            grids"); for convolutions ``g`` counts elements and must be a multiple of the
            kernel size (else give the layer its own through ``layer_options``).
        inplace: modify and return ``model`` itself instead of a copy.
        cache_weights: quantized modules keep their dequantized weight after first use
            (faster forward) instead of recomputing it each time (less memory).
        report: attach a :class:`squant.QuantizationReport` as ``qmodel.squant_report``.
        activations: quantize activations too, data-free (:class:`squant.ActivationOptions`:
            bits, input_shape, range ``"paper"`` or ``"bn"``, sigma, calibration batch and
            seed); ``None``: weights only. The input of every quantized layer but the first
            (which stays float) is fake-quantized per tensor, the last layer's with 8 bits.
        act_bits, input_shape, act_range, sigma, calibration_batch, seed: the same options as
            keywords (``act_bits=4, input_shape=(3, 224, 224)`` is
            ``activations=ActivationOptions(4, (3, 224, 224))``); not together with
            ``activations``, and none of them without ``act_bits``.
        bias_correction: add to each layer's bias the mean shift its quantized weight causes
            in its output, ``sum_c mean_c * sum_k (W - Q)[o, c, k]`` per output channel, where
            BatchNorms determine the layer's input means (as for ``range="search"``; a
            bias-free layer gets a bias): data-free bias correction (Nagel et al. 2019, see
            :mod:`squant.ranges.bias_correction`). Layers without such inputs keep their bias; a
            warning says so if no layer has them.

    A pattern in ``skip`` or ``layer_bits`` that matches no layer is an error (a typo would
    otherwise silently quantize everything). A weight shared by several layers is quantized
    once and the quantized layers share its codes.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, or a bits value is not an int.
        QuantizationError: an option out of its domain, a pattern matching no layer, nothing
            to quantize, or a calibration batch the model does not run (named in the message).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects a torch.nn.Module, got {type(model).__name__}")
    default = QuantOptions(bits, mode, scheme, granularity, range, group_size)
    activations = _activation_options(activations, act_bits=act_bits, input_shape=input_shape,
                                      range=act_range, sigma=sigma,
                                      calibration_batch=calibration_batch, seed=seed)
    skip = [skip] if isinstance(skip, str) else list(skip)
    layers = select_layers(model, skip, dict(layer_bits or {}), dict(layer_options or {}),
                            default)
    if not inplace:
        model = copy_replacing(model, [layer.module for layer in layers])
        layers = relocate(model, layers)
    start = time.perf_counter()
    moments = _layer_moments(model, layers, bias_correction)
    shared = _quantize_shared(layers, moments)
    seconds = time.perf_counter() - start
    # The kernels ran on CPU copies; the codes go to the layer's device (once per weight, so
    # that tied layers keep sharing them).
    joined = {key: entry.joined.to(entry.layer.module.weight.device)
              for key, entry in shared.items()}
    replacements = {}
    for layer in layers:
        cls = quantized_class(layer.module)
        replacements[id(layer.module)] = cls.from_float(
            layer.module, joined[id(layer.module.weight)], cache_weights)
    model = swap_modules(model, replacements)
    left_float = left_in_float(model, skip)
    if bias_correction:
        _correct_biases(layers, replacements, moments)
    if activations is not None:
        quantized = [m for m in model.modules() if isinstance(m, QuantizedModule)]
        active = enable_activations(quantized, activations.bits)
        fixed = bn_ranges(model, active) if activations.range == "bn" and active else {}
        calibrate(model, active, activations, fixed)
    if report:
        model.squant_report = _report(model, shared, seconds, left_float)
    return model


def _activation_options(options: ActivationOptions | None, **keywords: object
                        ) -> ActivationOptions | None:
    """``activations``, or the one built from the keyword form (``act_bits=...``)."""
    given = {name: value for name, value in keywords.items() if value is not None}
    if options is not None and not isinstance(options, ActivationOptions):
        raise TypeError(f"activations must be a squant.ActivationOptions or None, "
                        f"got {type(options).__name__}")
    if options is not None and given:
        raise QuantizationError(
            f"give the activation options either as activations=ActivationOptions(...) or as "
            f"keywords, not both (got activations and {', '.join(_keyword(n) for n in given)})")
    if options is not None or not given:
        return options
    if "act_bits" not in given:
        raise QuantizationError(
            f"{', '.join(_keyword(n) for n in given)} only apply with act_bits (activation "
            "quantization); without act_bits only the weights are quantized")
    return ActivationOptions(given.pop("act_bits"), **given)


def _keyword(name: str) -> str:
    return "act_range" if name == "range" else name


def dequantize(qmodel: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain float model: every quantized layer back to its original class, holding the
    dequantized weight, so that any runtime can use it."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"dequantize expects a torch.nn.Module, got {type(qmodel).__name__}")
    model = qmodel if inplace else copy.deepcopy(qmodel)
    weights: dict[int, nn.Parameter] = {}  # layers sharing codes keep sharing one weight
    replacements = {}
    for module in model.modules():
        if isinstance(module, QuantizedModule):
            weight = weights.setdefault(id(module.codes), module.float_weight())
            replacements[id(module)] = module.to_float(weight)
    return swap_modules(model, replacements)


def _weight_blocks(module: nn.Module) -> tuple[list[torch.Tensor], int]:
    """The weight as the blocks quantized independently, with their output-channel axis.

    ConvTranspose weights are ``(in, out/groups, *kernel)``: each group's block of input rows
    has its own output channels on axis 1.
    """
    weight = module.weight.detach()
    if getattr(module, "transposed", False):
        return list(weight.chunk(module.groups, dim=0)), 1
    return [weight], 0


@dataclass
class _SharedWeight:
    """One distinct weight Parameter: the first layer using it, its blocks and their results,
    and the names of every layer using it."""

    layer: Layer
    blocks: list[torch.Tensor]
    axis: int
    parts: list[QuantizedTensor]
    names: list[str]

    @property
    def joined(self) -> QuantizedTensor:
        """The whole weight's quantized tensor (blocks concatenated along dim 0)."""
        return _join_blocks(self.parts)


def _quantize_shared(layers: list[Layer], moments: dict[int, Moments]
                     ) -> dict[int, _SharedWeight]:
    """Quantize each distinct weight once, all in one batched call; keyed by ``id`` of the
    weight Parameter. ``moments``: per layer ``id``, its BN input moments (for the search)."""
    shared: dict[int, _SharedWeight] = {}
    users: dict[int, list[nn.Module]] = {}
    for layer in layers:
        key = id(layer.module.weight)
        users.setdefault(key, []).append(layer.module)
        if key not in shared:
            blocks, axis = _weight_blocks(layer.module)
            shared[key] = _SharedWeight(layer, blocks, axis, [], list(layer.names))
            continue
        shared[key].names.extend(layer.names)
        first = shared[key].layer
        if first.options != layer.options or type(first.module) is not type(layer.module):
            raise QuantizationError(
                f"layers {first.names[0]!r} and {layer.names[0]!r} share one weight but are "
                f"asked for different quantization ({first.options} vs {layer.options})")
    search_tables = _search_moments(shared, users, moments)
    if not search_tables and any(e.layer.options.range == "search" for e in shared.values()):
        warnings.warn('range="search": no searched layer has an input that BatchNorms determine '
                      "(a folded or BN-free model?), so every channel's range is chosen by its "
                      "weight error alone, which can cost accuracy against minmax",
                      stacklevel=3)
    arrays, axes, options, names, ranges, tables = [], [], [], [], [], []
    for key, entry in shared.items():
        layer = entry.layer
        label = f"layer {layer.names[0]!r} ({type(layer.module).__name__}) weight"
        whole = _tensor_range(layer.module.weight) if len(entry.blocks) > 1 else None
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


def _layer_moments(model: nn.Module, layers: list[Layer], bias_correction: bool
                   ) -> dict[int, Moments]:
    """The BN input moments (:func:`squant.ranges.batchnorm.bn_input_moments`) of the layers that
    need them: those searched with ``range="search"``, and all with ``bias_correction``.
    ConvTranspose layers (input channels on the output-channel axis) get none."""
    plain = [layer for layer in layers if not getattr(layer.module, "transposed", False)]
    searched = [layer.module for layer in plain if layer.options.range == "search"]
    wanted = [layer.module for layer in plain] if bias_correction else searched
    if not wanted:
        return {}
    options = (['range="search"'] if searched else []) + (
        ["bias_correction"] if bias_correction else [])
    fallbacks = (["search by the weight error alone"] if searched else []) + (
        ["keep its bias"] if bias_correction else [])
    return bn_input_moments(model, wanted, " and ".join(options), " and ".join(fallbacks))


def _search_moments(shared: dict[int, _SharedWeight], users: dict[int, list[nn.Module]],
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


def _correct_biases(layers: list[Layer], replacements: dict[int, QuantizedModule],
                    moments: dict[int, Moments]) -> None:
    """``bias_correction``: correct the bias of each quantized layer with finite input means
    (a bias tied between quantized layers is left alone, so that it stays tied)."""
    biases = Counter(id(layer.module.bias) for layer in layers if layer.module.bias is not None)
    any_inputs = False
    for layer in layers:
        found = moments.get(id(layer.module))
        if found is None or not torch.isfinite(found[0]).all():
            continue
        any_inputs = True
        bias = layer.module.bias
        if bias is None or biases[id(bias)] == 1:
            correct_bias(replacements[id(layer.module)], layer.module.weight, found[0])
    if not any_inputs:
        warnings.warn("bias_correction: no quantized layer has an input that BatchNorms "
                      "determine (a folded or BN-free model?), so no bias was corrected",
                      stacklevel=3)


def _tensor_range(weight: torch.Tensor) -> tuple[np.float32, np.float32]:
    """``(min, max)`` of a whole weight as float32: a per-tensor grid spans every group."""
    values = weight.detach().float()
    return np.float32(values.min()), np.float32(values.max())


def _join_blocks(parts: list[QuantizedTensor]) -> QuantizedTensor:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return QuantizedTensor(
        codes=torch.cat([p.codes for p in parts], dim=0),
        scale=torch.cat([p.scale for p in parts]),
        zero_point=torch.cat([p.zero_point for p in parts]),
        bits=first.bits, mode=first.mode, axis=first.axis, scheme=first.scheme,
        granularity=first.granularity, range=first.range, group_size=first.group_size)


def _report(model: nn.Module, shared: dict[int, _SharedWeight], seconds: float,
            left_float: list[tuple[str, str]]) -> QuantizationReport:
    """Error statistics per distinct weight; each layer is also timed alone for its row. The
    activation range and bits are those of the row's first layer (None: float input)."""
    rows = []
    for entry in shared.values():
        layer = entry.layer
        start = time.perf_counter()
        count = len(entry.blocks)
        quantize_with_options(entry.blocks, [entry.axis] * count, [layer.options] * count,
                              layer.names[:1] * count)
        alone = time.perf_counter() - start
        rows.append(layer_report(", ".join(entry.names), type(layer.module).__name__,
                                 layer.module.weight.shape, entry.blocks, entry.parts, alone,
                                 model.get_submodule(layer.names[0])))
    return QuantizationReport(rows, seconds, left_float)
