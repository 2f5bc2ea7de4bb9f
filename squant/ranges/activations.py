"""Data-free activation quantization: the SQuant paper's range rule and the calibration pass.

The input of every quantized layer but the first is fake-quantized (quantize, then dequantize
in float: :mod:`squant.core.fake_quant`), per tensor and asymmetric. Its range is found once,
without data, from one batch of uniform random inputs run through the weight-quantized model
(see ACTIVATIONS_SPEC.md).

``act_range="bn"`` (:mod:`squant.ranges.batchnorm`) fixes some ranges from BatchNorm statistics
instead; the others still come from this rule. With ``calibration_data`` the ranges come from
real inputs instead (:mod:`squant.ranges.calibration`). :func:`quantize_activations` runs
whichever applies and records on each layer, as ``act_range_method``, the method that gave its
range (shown by the report).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..core.errors import QuantizationError, first_line
from ..core.fake_quant import fake_quantize  # noqa: F401  (squant 0.1 exported it here)
from ..core.options import ACT_RANGES, ActivationOptions  # noqa: F401  (ACT_RANGES: 0.1's path)
from ..nn import QuantizedModule
from .batchnorm import Range, bn_ranges
from .calibration import calibrate_from_data

LAST_LAYER_BITS = 8


def default_sigma(bits: int) -> float:
    """The paper's range multiplier: 12 up to 4 bits, 14 for 5-6 bits, 25 for 7-8 bits."""
    if bits <= 4:
        return 12.0
    return 14.0 if bits <= 6 else 25.0


def paper_range(x: torch.Tensor, bits: int, sigma: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's data-free range ``(lo, hi)`` (float32, 0-dim) for the tensor ``x``.

    Signed (``min(x) < 0``): ``[-a, a]`` with ``a = sigma * std(x) / 1.25``; else ``[0, a]``
    with ``a = sigma * std`` of the strictly positive elements (unbiased std; 0 when fewer
    than two). Below 6 bits ``a`` is clipped to ``max(x)``. ``sigma`` defaults by ``bits``
    (:func:`default_sigma`).
    """
    x = x.detach().float().flatten()
    sigma = default_sigma(bits) if sigma is None else sigma
    signed = bool(x.min() < 0)
    values = x if signed else x[x > 0]
    std = values.std() if values.numel() > 1 else torch.zeros((), device=x.device)
    alpha = sigma * std / (1.25 if signed else 1.0)
    if bits < 6:
        alpha = torch.minimum(alpha, x.max())
    return (-alpha if signed else torch.zeros_like(alpha)), alpha


def input_bits(count: int, act_bits: int) -> list[int | None]:
    """The input bits of ``count`` quantized layers in model order: None (float) for the
    first, 8 for the last, ``act_bits`` for the others."""
    return [None if index == 0 else LAST_LAYER_BITS if index == count - 1 else act_bits
            for index in range(count)]


def enable_activations(layers: list[nn.Module], act_bits: int) -> list[nn.Module]:
    """Turn on input quantization of every quantized layer of ``layers`` (in model order) but
    the first (float input); the last uses 8 bits, the others ``act_bits``. Returns the layers
    turned on."""
    for layer, bits in zip(layers[1:], input_bits(len(layers), act_bits)[1:]):
        layer.enable_activation_quantization(bits)
    return layers[1:]


def quantize_activations(model: nn.Module, options: ActivationOptions) -> None:
    """Turn on input quantization in the weight-quantized ``model`` (:func:`enable_activations`)
    and fix every range: from ``options.calibration_data`` by ``options.range``
    (:func:`squant.ranges.calibration.calibrate_from_data`: observed with the activations in
    float, then fixed), else data-free (:func:`calibrate`, with :func:`bn_ranges` for
    ``"bn"``). Each layer quantizing its input gets ``act_range_method``, the method used."""
    named = [(name, module) for name, module in model.named_modules()
             if isinstance(module, QuantizedModule) and module.float_input]
    layers = [module for _, module in named]
    if options.calibration_data is None:
        active = enable_activations(layers, options.bits)
        fixed = bn_ranges(model, active) if options.range == "bn" and active else {}
        calibrate(model, active, options, fixed)
        for layer in active:
            layer.act_range_method = "bn" if id(layer) in fixed else "paper"
        return
    targets = [(name, module, bits) for (name, module), bits
               in zip(named, input_bits(len(named), options.bits)) if bits is not None]
    ranges = calibrate_from_data(model, targets, options)
    for layer in enable_activations(layers, options.bits):
        lo, hi = ranges[id(layer)]
        layer.act_lo.copy_(lo)
        layer.act_hi.copy_(hi)
        layer.act_range_method = options.range


def calibrate(model: nn.Module, layers: list[nn.Module], options: ActivationOptions,
              fixed: Mapping[int, Range] | None = None) -> None:
    """Fix each layer's range from the first input it receives when one batch of
    ``options.calibration_batch`` uniform [0, 1) inputs seeded by ``options.seed`` runs through
    ``model`` (in eval mode, restored afterwards), by the paper's rule with ``options.sigma``,
    or to ``fixed[id(layer)]`` where given (e.g. :func:`bn_ranges`).

    A forward pre-hook sets the range before the layer's own forward quantizes that input, so
    every later layer sees the quantized activations of the layers before it.
    """
    fixed = fixed or {}
    if not layers:
        return
    generator = torch.Generator().manual_seed(options.seed)
    inputs = torch.rand((options.calibration_batch, *options.input_shape), generator=generator)
    inputs = inputs.to(device=layers[0].codes.device, dtype=layers[0].weight_dtype)
    pending = set(map(id, layers))

    def set_range(module: nn.Module, args: tuple) -> None:
        if id(module) in pending:
            pending.discard(id(module))
            lo, hi = fixed.get(id(module)) or paper_range(args[0], int(module.act_bits),
                                                           options.sigma)
            module.act_lo.copy_(lo)
            module.act_hi.copy_(hi)

    handles = [layer.register_forward_pre_hook(set_range) for layer in layers]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.inference_mode():
            model(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise QuantizationError(
            f"the calibration batch of shape {tuple(inputs.shape)} does not run through "
            f"{type(model).__name__}: {first_line(error)}") from None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
