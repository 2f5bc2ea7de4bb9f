"""Which layers of a model ``squant.quantize`` quantizes, and with which options.

Layers are matched by their float class in the registry (:data:`squant.nn.QUANTIZED_CLASSES`),
subclasses by their nearest registered base when they keep its forward (else a warning);
``skip``, ``layer_bits`` and ``layer_options`` select and override by fnmatch patterns on the
layers' names, and a pattern that matches nothing is an error.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from ..core.errors import QuantizationError
from ..core.options import QuantOptions, check_bits
from .base import (
    QUANTIZED_CLASSES,
    computed_weight,
    effective_weight,
    is_quantized,
    quantized_class,
    registered_base,
)


@dataclass
class Layer:
    """A layer to quantize: its names (all the paths it is reachable by), its options, and
    the float weights it quantizes once read (:meth:`weight`)."""

    names: list[str]
    module: nn.Module
    options: QuantOptions
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def weight(self, name: str) -> torch.Tensor:
        """The float weight ``name``: the layer's Parameter, or for a weight that weight_norm
        or spectral_norm computes, its effective weight (computed once, as in eval mode)."""
        if name not in self.weights:
            held = self.module._parameters.get(name)
            self.weights[name] = held if held is not None else effective_weight(self.module)
        return self.weights[name]


def select_layers(model: nn.Module, skip: list[str], layer_bits: dict[str, int],
                  layer_options: dict[str, Mapping[str, object]],
                  default: QuantOptions, recipe: Sequence[str] = ()) -> list[Layer]:
    """The layers of ``model`` to quantize with their options, in model order.

    ``recipe``: the options (``"mode"``, ``"range"``) the caller left to the recipe of the grid
    (None): a layer whose ``layer_options`` change its ``group_size`` gets its own grid's
    recipe for those it does not set.

    Raises:
        QuantizationError: a pattern matches no quantizable layer, an unknown option in
            ``layer_options``, no quantizable layer, or every layer skipped.
        TypeError: a ``layer_bits`` value is not an int.
    """
    for pattern, bits in layer_bits.items():
        check_bits(bits, f"layer_bits[{pattern!r}]")
    for pattern, overrides in layer_options.items():
        unknown = set(overrides) - {f.name for f in dataclasses.fields(QuantOptions)}
        if unknown:
            raise QuantizationError(f"layer_options[{pattern!r}]: unknown option(s) "
                                    f"{', '.join(sorted(map(str, unknown)))}; use bits, mode, "
                                    "scheme, granularity, range, group_size or include_zero")
    by_module: dict[int, Layer] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if quantized_class(module) is None:  # left_in_float() names it, with the reason
            continue
        if id(module) in by_module:
            by_module[id(module)].names.append(name)
        else:
            by_module[id(module)] = Layer([name], module, default)
    if not by_module and any(is_quantized(m) for m in model.modules()):
        raise QuantizationError(
            f"{type(model).__name__} is already quantized (its layers are squant.nn modules); "
            "to quantize it again, start from the float model or squant.dequantize(qmodel)")
    if not by_module:
        raise QuantizationError(
            f"{type(model).__name__} has no layer to quantize (supported: "
            f"{', '.join(c.__name__ for c in QUANTIZED_CLASSES)})")
    _check_patterns_match(skip, "skip", by_module.values())
    _check_patterns_match(layer_bits, "layer_bits", by_module.values())
    _check_patterns_match(layer_options, "layer_options", by_module.values())
    layers = []
    for layer in by_module.values():
        if any(matches(pattern, layer) for pattern in skip):
            continue
        bits = next((b for p, b in layer_bits.items() if matches(p, layer)), default.bits)
        overrides = next((o for p, o in layer_options.items() if matches(p, layer)), {})
        layer.options = dataclasses.replace(
            default, **{"bits": bits, **dict.fromkeys(recipe), **overrides})
        layers.append(layer)
    if not layers:
        raise QuantizationError("every layer is skipped: nothing to quantize")
    return layers


def matches(pattern: str, layer: Layer) -> bool:
    """Whether the fnmatch ``pattern`` matches one of the layer's names or a container above it
    (``"features.0"`` matches ``features.0.conv``, ``"layer4"`` every layer inside it)."""
    return any(name_matches(pattern, name) for name in layer.names)


def name_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches the module name ``name`` or one of its ancestors' names."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:end]), pattern)
               for end in range(len(parts), 0, -1))


def _check_patterns_match(patterns: Iterable[str], what: str, layers: Iterable[Layer]) -> None:
    layers = list(layers)
    for pattern in patterns:
        if not any(matches(pattern, layer) for layer in layers):
            known = ", ".join(layer.names[0] or "<root>" for layer in layers[:20])
            raise QuantizationError(
                f"{what} pattern {pattern!r} matches no quantizable layer (layers: {known}"
                f"{', ...' if len(layers) > 20 else ''})")


def relocate(model: nn.Module, layers: list[Layer]) -> list[Layer]:
    """The same layers, found by name in the copied model."""
    return [Layer(layer.names, model.get_submodule(layer.names[0]), layer.options)
            for layer in layers]


def left_in_float(model: nn.Module, skip: list[str]) -> list[tuple[str, str]]:
    """The floating tensors of 2+ dims that stay float in the quantized ``model``, as
    ``(name, reason)``; one warning lists those that ``skip`` did not ask for, so that nothing
    is left in float without a word."""
    found, unasked = [], []
    for prefix, module in model.named_modules():
        if is_quantized(module) or "codes" in module._buffers:  # codes, scales: quantized
            continue
        tensors = [*module._parameters.items(), *module._buffers.items()]
        for name, tensor in tensors:
            if tensor is None or not tensor.is_floating_point() or tensor.dim() < 2:
                continue
            full = f"{prefix}.{name}" if prefix else name
            skipped = any(name_matches(pattern, prefix) for pattern in skip)
            reason = "skipped" if skipped else _float_reason(module)
            found.append((full, reason))
            if not skipped:
                unasked.append(f"{full} ({reason})")
    if unasked:
        warnings.warn(f"left in float: {', '.join(unasked)}", UserWarning, stacklevel=3)
    return found


def _float_reason(module: nn.Module) -> str:
    """Why a module's weights stay float, in a few words."""
    kind = type(module).__name__
    if computed_weight(module) or isinstance(module, ParametrizationList):
        return (f"{kind}: a computed weight (weight_norm, spectral_norm, a parametrization) "
                "squant quantizes only on layers with one weight (not attention, recurrent or "
                "custom layers): remove it first to quantize the layer")
    base = registered_base(type(module))
    if base is not None:
        return f"{kind}, a {base.__name__} subclass with its own forward, parameters or buffers"
    return f"{kind}: squant has no quantized module for it"
