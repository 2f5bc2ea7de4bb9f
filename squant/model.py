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

import torch
from torch import nn

from .core.errors import QuantizationError
from .core.options import ActivationOptions, QuantOptions
from .core.report import QuantizationReport
from .nn import QuantizedModule
from .nn.base import quantized_class
from .nn.module_tree import copy_replacing, swap_modules
from .nn.multi_weight import QuantizedMultiWeight
from .nn.selection import Layer, left_in_float, relocate, select_layers
from .ranges.activations import quantize_activations
from .ranges.batchnorm import Moments, bn_input_moments
from .ranges.bias_correction import correct_bias
from .weights import layer_weights, quantize_shared, report_rows


def quantize(
    model: nn.Module,
    bits: int = 4,
    mode: str | None = None,
    *,
    skip: str | Iterable[str] = (),
    layer_bits: Mapping[str, int] | None = None,
    layer_options: Mapping[str, Mapping[str, object]] | None = None,
    scheme: str = "asymmetric",
    granularity: str = "channel",
    range: str | None = None,
    group_size: int | None = None,
    include_zero: bool = False,
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
    calibration_data: Iterable | None = None,
    momentum: float | None = None,
    percentile: float | None = None,
    bias_correction: bool = False,
) -> nn.Module:
    """Quantize every weight matrix of ``model``'s Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d,
    Embedding, EmbeddingBag, MultiheadAttention (``in_proj_weight`` or ``q/k/v_proj_weight``;
    ``out_proj`` as a Linear), LSTM, GRU and RNN layers (every ``weight_ih/hh/hr_l*``), and of
    their subclasses that keep the base's forward.

    All selected weights go through one batched SQuant kernel call; each layer is replaced by
    its quantized module (``squant.nn``), which holds int8 codes, per-channel scale and zero
    point (per row: per token for an embedding table, per output feature for attention and
    recurrent matrices), and the float biases. A layer whose weight ``weight_norm`` or
    ``spectral_norm`` computes becomes the plain quantized layer holding its effective weight
    (as computed in eval mode). Whatever floating tensor of 2+ dims stays float is named, with
    the reason, in one warning and in the report's ``left_float``.

    Args:
        bits: 2..8, for every layer not in ``layer_bits``.
        mode: ``"KC"`` (the paper's SQuant), ``"K"``, ``"C"`` or ``"E"`` (round to nearest);
            None (the default): ``"KC"``, or ``"E"`` for a layer with a ``group_size``.
        skip: a module name or fnmatch pattern (``"fc"``, ``"*.downsample.0"``), or several,
            left in float; a pattern that names a container (``"features.0"``, ``"layer4"``)
            covers every layer inside it, in ``layer_bits`` and ``layer_options`` too.
        layer_bits: ``{pattern: bits}``; the first pattern matching a layer's name wins.
        layer_options: ``{pattern: {option: value}}`` with options among ``bits``, ``mode``,
            ``scheme``, ``granularity``, ``range``, ``group_size`` (e.g. ``{"fc": {"scheme":
            "symmetric"}}``); the first matching pattern's options override the others for
            that layer.
        scheme, granularity, range: the grid (see :class:`squant.QuantOptions`); range None
            (the default): ``"minmax"``, or ``"fit"`` for a layer with a ``group_size``. With
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
        include_zero: widen every range to include 0, so that each zero point is an integer
            inside the codes' range: what int8 runtimes need (``squant.export_onnx`` otherwise
            re-quantizes such channels of more than 6 bits, with a warning).
        inplace: modify and return ``model`` itself instead of a copy.
        cache_weights: quantized modules keep their dequantized weight after first use
            (faster forward) instead of recomputing it each time (less memory).
        report: attach a :class:`squant.QuantizationReport` as ``qmodel.squant_report``.
        activations: quantize activations too (:class:`squant.ActivationOptions`: bits;
            data-free: input_shape, range ``"paper"`` or ``"bn"``, sigma, calibration batch and
            seed; from real inputs: calibration_data, range ``"minmax"``, ``"ema"``, ``"kl"``,
            ``"percentile"`` or ``"mse"``, momentum, percentile); ``None``: weights only. The
            input of every quantized layer but the first (which stays float) is fake-quantized
            per tensor, the last layer's with 8 bits.
        act_bits, input_shape, act_range, sigma, calibration_batch, seed, calibration_data,
            momentum, percentile: the same options as keywords (``act_bits=4,
            input_shape=(3, 224, 224)`` is ``activations=ActivationOptions(4, (3, 224, 224))``;
            ``act_bits=8, calibration_data=batches`` calibrates on real inputs); not together
            with ``activations``, and none of them without ``act_bits``.
        bias_correction: add to each layer's bias the mean shift its quantized weight causes
            in its output, ``sum_c mean_c * sum_k (W - Q)[o, c, k]`` per output channel, where
            BatchNorms determine the layer's input means (as for ``range="search"``; a
            bias-free layer gets a bias): data-free bias correction (Nagel et al. 2019, see
            :mod:`squant.ranges.bias_correction`). Layers without such inputs keep their bias; a
            warning says so if no layer has them.

    A pattern in ``skip`` or ``layer_bits`` that matches no layer is an error (a typo would
    otherwise silently quantize everything). A weight shared by several layers is quantized
    once and the quantized layers share its codes, also across kinds when they read its
    channels alike (a GPT's ``lm_head`` Linear tied to its ``wte`` Embedding).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, or a bits value is not an int.
        QuantizationError: an option out of its domain, a pattern matching no layer, nothing
            to quantize, a calibration batch the model does not run, or calibration data that
            cannot calibrate (no batch, mismatched shapes, NaN/Inf reaching a layer: named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects a torch.nn.Module, got {type(model).__name__}")
    default = QuantOptions(bits, mode, scheme, granularity, range, group_size, include_zero)
    activations = _activation_options(activations, act_bits=act_bits, input_shape=input_shape,
                                      range=act_range, sigma=sigma,
                                      calibration_batch=calibration_batch, seed=seed,
                                      calibration_data=calibration_data, momentum=momentum,
                                      percentile=percentile)
    skip = [skip] if isinstance(skip, str) else list(skip)
    recipe = [name for name, value in (("mode", mode), ("range", range)) if value is None]
    layers = select_layers(model, skip, dict(layer_bits or {}), dict(layer_options or {}),
                            default, recipe)
    if not inplace:
        model = copy_replacing(model, [layer.module for layer in layers])
        layers = relocate(model, layers)
    start = time.perf_counter()
    moments = _layer_moments(model, layers, bias_correction)
    shared = quantize_shared(layers, moments)
    seconds = time.perf_counter() - start
    # The kernels ran on CPU copies; the codes go to the weight's device (once per weight, so
    # that tied layers keep sharing them).
    joined = {key: entry.joined.to(entry.weight.device) for key, entry in shared.items()}
    replacements = {}
    for layer in layers:
        qweights = {name: joined[id(layer.weight(name))] for name in layer_weights(layer)}
        replacements[id(layer.module)] = quantized_class(layer.module).from_weights(
            layer.module, qweights, cache_weights)
    model = swap_modules(model, replacements)
    left_float = left_in_float(model, skip)
    if bias_correction:
        _correct_biases(layers, replacements, moments)
    if activations is not None:
        quantize_activations(model, activations)
    if report:
        model.squant_report = QuantizationReport(report_rows(model, shared), seconds, left_float)
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
        elif isinstance(module, QuantizedMultiWeight):
            float_weights = {name: weights.setdefault(id(child.codes), child.float_weight())
                             for name, child in module.quantized_weights().items()}
            replacements[id(module)] = module.to_float(float_weights)
    return swap_modules(model, replacements)


def _layer_moments(model: nn.Module, layers: list[Layer], bias_correction: bool
                   ) -> dict[int, Moments]:
    """The BN input moments (:func:`squant.ranges.batchnorm.bn_input_moments`) of the layers that
    need them: those searched with ``range="search"``, and all with ``bias_correction``.
    ConvTranspose layers (input channels on the output-channel axis) and embeddings (token
    ids in) get none."""
    plain = [layer for layer in layers if not getattr(layer.module, "transposed", False)
             and quantized_class(layer.module).float_input]
    searched = [layer.module for layer in plain if layer.options.range == "search"]
    wanted = [layer.module for layer in plain] if bias_correction else searched
    if not wanted:
        return {}
    options = (['range="search"'] if searched else []) + (
        ["bias_correction"] if bias_correction else [])
    fallbacks = (["search by the weight error alone"] if searched else []) + (
        ["keep its bias"] if bias_correction else [])
    return bn_input_moments(model, wanted, " and ".join(options), " and ".join(fallbacks))


def _correct_biases(layers: list[Layer], replacements: dict[int, QuantizedModule],
                    moments: dict[int, Moments]) -> None:
    """``bias_correction``: correct the bias of each quantized layer with finite input means
    (a bias tied between quantized layers is left alone, so that it stays tied)."""
    biases = Counter(id(layer.module.bias) for layer in layers
                     if getattr(layer.module, "bias", None) is not None)
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
