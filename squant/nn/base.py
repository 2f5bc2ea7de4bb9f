"""What every quantized module shares, and the registry of float class -> quantized class.

Each quantized class subclasses its float class, so ``forward`` is torch's own (``F.linear``,
``_conv_forward``, ...) run with the dequantized weight. The int8 codes, scales and zero points
are buffers (so ``state_dict`` holds the integers); the bias stays a float parameter.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..core.errors import QuantizationError
from ..core.fake_quant import fake_quantize
from ..core.tensor import QuantizedTensor, code_range, dequantize_codes

QUANTIZED_CLASSES: dict[type[nn.Module], type[QuantizedModule]] = {}

# Attributes a float layer needs besides its parameters (torch's own __constants__ and these).
_EXTRA_ATTRIBUTES = ("transposed", "_reversed_padding_repeated_twice", "training")


def register(float_class: type[nn.Module]):
    """Class decorator: make ``cls`` the quantized counterpart of ``float_class``."""

    def decorate(cls: type[QuantizedModule]) -> type[QuantizedModule]:
        cls.float_class = float_class
        QUANTIZED_CLASSES[float_class] = cls
        return cls

    return decorate


def quantized_class(module: nn.Module) -> type | None:
    """The quantized class for ``module``: the one registered for its class or, for a subclass
    of a registered float class, for the nearest such base, provided the subclass keeps that
    base's ``forward`` and parameters and adds no buffers: e.g. ``nn.MultiheadAttention``'s
    ``out_proj``. A layer whose ``weight`` is computed (:func:`computed_weight`: weight_norm,
    spectral_norm) gets its base's quantized class, which holds the effective weight
    (:func:`effective_weight`), unless that class holds several weights (attention,
    recurrent). None for anything else, quantized modules too."""
    base = registered_base(type(module))
    if base is None or is_quantized(module):
        return None
    cls = QUANTIZED_CLASSES[base]
    if not issubclass(cls, QuantizedModule) and _computed(module, cls):
        return None
    if base is type(module):
        return cls
    own = set(cls.weight_names(module)) | ({"bias"} if getattr(cls, "has_bias", False) else set())
    if type(module).forward is base.forward and not module._buffers and (
            set(module._parameters) <= own or not issubclass(cls, QuantizedModule)):
        return cls
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is one of squant's quantized layers."""
    return isinstance(module, (QuantizedModule, *QUANTIZED_CLASSES.values()))


def computed_weight(module: nn.Module) -> bool:
    """Whether a weight the layer's quantized class would quantize is computed rather than held
    (``weight_norm``, ``spectral_norm`` or another parametrization or hook): a layer with one
    weight is then quantized from its :func:`effective_weight`, one with several stays float."""
    base = registered_base(type(module))
    if base is None or is_quantized(module):
        return False
    return _computed(module, QUANTIZED_CLASSES[base])


def _computed(module: nn.Module, cls: type) -> bool:
    """Whether a weight that ``cls`` (``module``'s quantized class) quantizes is not held."""
    return not all(isinstance(module._parameters.get(n), torch.Tensor)
                   for n in cls.weight_names(module))


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer computes (a ``weight_norm``/``spectral_norm`` parametrization or the
    older hooks) as in eval mode (no power iteration: the module is left as it was), detached.

    Raises ``QuantizationError`` if the layer holds no weight tensor at all."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == "weight":
            with torch.no_grad():
                if isinstance(hook, SpectralNorm):
                    return hook.compute_weight(module, do_power_iteration=False).detach()
                return hook.compute_weight(module).detach()
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            weight = getattr(module, "weight", None)
    finally:
        module.train(training)
    if not isinstance(weight, torch.Tensor):
        raise QuantizationError(f"{type(module).__name__} holds no weight tensor to quantize")
    return weight.detach()


def computed_kind(module: nn.Module) -> str:
    """What computes a layer's weight, in a few words (``"weight_norm"``, ``"spectral_norm"``,
    or the parametrizations' class names)."""
    names = {"_WeightNorm": "weight_norm", "_SpectralNorm": "spectral_norm",
             "WeightNorm": "weight_norm (hook)", "SpectralNorm": "spectral_norm (hook)"}
    found = [type(h).__name__ for h in module._forward_pre_hooks.values()
             if isinstance(h, (WeightNorm, SpectralNorm))]
    if parametrize.is_parametrized(module, "weight"):
        found += [type(p).__name__ for p in module.parametrizations.weight]
    return ", ".join(names.get(name, name) for name in found) or "a computed weight"


def weight_layout(module: nn.Module, name: str) -> tuple[tuple[int, ...], int, int]:
    """``(shape, axis, groups)`` of the weight ``name`` of a float layer as squant quantizes it:
    output channels on ``axis`` (1 for a ConvTranspose weight), ``groups`` blocks along dim 0
    with channels of their own (a grouped ConvTranspose)."""
    computed = name == "weight" and computed_weight(module)
    shape = tuple((effective_weight(module) if computed else getattr(module, name)).shape)
    if name == "weight" and getattr(module, "transposed", False):
        return shape, 1, module.groups
    return shape, 0, 1


def qweight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a float layer's weight (held or computed)."""
    weight = module._parameters.get("weight")
    return (weight if weight is not None else effective_weight(module)).dtype


def applied_dtype(fn, dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight of ``dtype`` gets from the ``_apply`` function ``fn`` (``.half()``,
    ``.to(torch.float64)``; ``.to(device)`` keeps it)."""
    return fn(torch.empty(0, dtype=dtype)).dtype


_FLOAT32_BUFFERS = ("scale", "zero_point", "act_lo", "act_hi")


def apply_to_buffers(module: nn.Module, fn, apply_rest):
    """A quantized module's ``_apply``: ``apply_rest()`` (torch's ``_apply``) on everything but
    its buffers, and ``fn`` on each buffer in place (``tensor.data = fn(tensor)``, as torch does
    for parameters), so that layers sharing codes (tied weights) still share them after
    ``.to()``/``.cuda()``; scale, zero point and activation ranges stay float32."""
    buffers, module._buffers = module._buffers, {}
    try:
        result = apply_rest()
    finally:
        module._buffers = buffers
    for name, tensor in buffers.items():
        if tensor is None:
            continue
        new = fn(tensor)
        if name in _FLOAT32_BUFFERS:
            new = new.float()
        if new is tensor:
            continue
        if torch._has_compatible_shallow_copy_type(tensor, new):
            tensor.data = new
        else:  # e.g. meta -> cpu (to_empty): a new tensor, as torch does for parameters
            buffers[name] = new
    return result


def check_codes(codes: object, prefix: str, bits: int, scheme: str, kind: str) -> str | None:
    """Why ``codes`` from a state_dict cannot be loaded into a layer of ``bits``/``scheme``
    (values outside its range: another quantization's codes), or None if they can."""
    if not isinstance(codes, torch.Tensor) or not codes.numel():
        return None
    low, high = code_range(bits, scheme)
    found = (int(codes.min()), int(codes.max()))
    if low <= found[0] and found[1] <= high:
        return None
    return (f"{prefix}codes hold values in {found[0]}..{found[1]}, outside the {bits}-bit "
            f"{scheme} range {low}..{high} of this {kind}: the state_dict was quantized with "
            "other bits or another scheme; quantize the model with those first")


def registered_base(cls: type) -> type[nn.Module] | None:
    """The nearest class in ``cls``'s MRO that has a quantized counterpart, or None."""
    return next((base for base in cls.__mro__ if base in QUANTIZED_CLASSES), None)


class CheckedCodes:
    """Mixin of modules holding codes: torch's ``load_state_dict``, refusing codes outside the
    module's ``bits`` (e.g. an 8-bit state_dict loaded into a 4-bit model, which ``squant.save``
    would then pack into 4 bits and corrupt): the module is left as it was and
    ``load_state_dict`` raises. A cached dequantized weight is dropped."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._cached_weight = None
        message = check_codes(state_dict.get(prefix + "codes"), prefix, self.bits, self.scheme,
                              type(self).__name__)
        if message:
            error_msgs.append(message)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class QuantizedModule(CheckedCodes):
    """What every quantized layer shares: code buffers, dequantization, conversions.

    ``weight`` is the dequantized weight ``(codes + zero_point) * fl32(1 / scale)`` in the float
    layer's dtype. With ``cache_weight`` (the default) it is computed once and kept until the
    buffers change (``load_state_dict``, ``.to()``); without, it is recomputed at each use to save
    memory.
    """

    float_class: type[nn.Module]
    has_bias: bool = True  # the float layer has a ``bias`` (embeddings have none)
    float_input: bool = True  # its input is a float tensor with channels (not token ids)
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    @classmethod
    def weight_names(cls, module: nn.Module) -> list[str]:
        """The Parameters of the float layer that are quantized: its ``weight``."""
        return ["weight"]

    @classmethod
    def from_weights(cls, module: nn.Module, qweights: dict[str, QuantizedTensor],
                     cache_weight: bool = True) -> QuantizedModule:
        """:meth:`from_float` with the weight given by name (as for layers with several)."""
        return cls.from_float(module, qweights["weight"], cache_weight)

    @classmethod
    def from_float(cls, module: nn.Module, qweight: QuantizedTensor,
                   cache_weight: bool = True) -> QuantizedModule:
        """A quantized copy of ``module`` with ``qweight`` as its weight (bias shared as is)."""
        qmodule = cls.__new__(cls)
        nn.Module.__init__(qmodule)
        plain = {}  # attributes that are no tensor or module: set without nn.Module.__setattr__
        for name in _hyper_parameters(module):
            value = getattr(module, name)
            if isinstance(value, (torch.Tensor, nn.Module)):
                setattr(qmodule, name, value)
            else:
                plain[name] = value
        if cls.has_bias:
            qmodule.bias = module.bias
        qmodule.register_buffer("codes", qweight.codes)
        qmodule.register_buffer("scale", qweight.scale)
        qmodule.register_buffer("zero_point", qweight.zero_point)
        # A subclass of float_class: dequantize gives it (without its parametrizations).
        original = type(module)
        plain.update(
            bits=qweight.bits, mode=qweight.mode, axis=qweight.axis, scheme=qweight.scheme,
            granularity=qweight.granularity, range=qweight.range, group_size=qweight.group_size,
            cache_weight=cache_weight, weight_dtype=qweight_dtype(module),
            original_class=(original.__bases__[0] if parametrize.is_parametrized(module)
                            else original),
            _cached_weight=None)
        qmodule.__dict__.update(plain)
        return qmodule

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, in the float layer's dtype and the codes' memory layout (e.g.
        channels-last after ``.to(memory_format=torch.channels_last)``, so that convolutions
        do not convert their activations at every call)."""
        cached = self._cached_weight
        if cached is not None:
            return cached
        # Not an inference tensor, even when first used under torch.inference_mode(): the
        # cached weight must serve later forwards that autograd records too.
        with torch.inference_mode(False):
            weight = self.dequantize_weight().to(self.weight_dtype)
            if weight.stride() != self.codes.stride():  # exact strides: (O, 1, k, k) is ambiguous
                weight = torch.empty_like(self.codes, dtype=self.weight_dtype).copy_(weight)
        if self.cache_weight:
            self._cached_weight = weight
        return weight

    def dequantize_weight(self) -> torch.Tensor:
        """``(codes + zero_point) * fl32(1 / scale)`` in float32, scale and zero point along
        ``axis``."""
        return dequantize_codes(self.codes, self.scale, self.zero_point, self.axis,
                                self.groups_of_codes, getattr(self, "group_size", None))

    @property
    def groups_of_codes(self) -> int:
        """Blocks along dim 0 with channels of their own: 1 but for grouped ConvTranspose."""
        return 1

    @property
    def act_enabled(self) -> bool:
        """Whether this layer fake-quantizes its input (it holds ``act_lo/act_hi/act_bits``)."""
        return "act_bits" in self._buffers

    def enable_activation_quantization(self, bits: int) -> None:
        """Fake-quantize this layer's input to ``bits`` from now on.

        Adds the buffers ``act_lo``, ``act_hi`` (float32, NaN until calibrated or loaded, so an
        unset range cannot pass unnoticed) and ``act_bits`` (int64); weight-only layers never
        have them, which keeps their state_dict and files unchanged.
        """
        device = self.codes.device
        nan = torch.tensor(float("nan"), dtype=torch.float32, device=device)
        self.register_buffer("act_lo", nan.clone())
        self.register_buffer("act_hi", nan.clone())
        self.register_buffer("act_bits", torch.tensor(bits, dtype=torch.int64, device=device))

    def forward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The float layer's forward, on the fake-quantized input when activation quantization
        is on (``args`` pass through, e.g. ConvTranspose's ``output_size``)."""
        if self.act_enabled:
            input = fake_quantize(input, self.act_lo, self.act_hi, int(self.act_bits))
        return super().forward(input, *args, **kwargs)

    def float_weight(self) -> nn.Parameter:
        """The dequantized weight as a new Parameter of the float layer's dtype."""
        return nn.Parameter(self.dequantize_weight().to(self.weight_dtype))

    def to_float(self, weight: nn.Parameter | None = None) -> nn.Module:
        """A plain float layer of the original class holding the dequantized weight (or
        ``weight``, e.g. to keep tied layers tied) and a copy of the bias."""
        original = getattr(self, "original_class", self.float_class)
        module = original.__new__(original)
        nn.Module.__init__(module)
        for name in _hyper_parameters(self):
            setattr(module, name, getattr(self, name))
        module.weight = self.float_weight() if weight is None else weight
        if self.has_bias:
            module.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
        return module

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` before it compiles: squant's modules are not
        scriptable (the dequantized ``weight`` is a Python property), so say what works."""
        raise QuantizationError(
            f"torch.jit.script cannot compile squant's {type(self).__name__}; use "
            "torch.jit.trace(qmodel, example_inputs) or torch.compile(qmodel), or script the "
            "float model squant.dequantize(qmodel)")

    def _apply(self, fn, recurse=True):
        """Follow ``.to()``/``.half()``/``.cuda()``: the weight's dtype follows, while scale and
        zero point stay float32 (only their device moves) so that dequantization stays exact."""
        self._cached_weight = None
        self.weight_dtype = applied_dtype(fn, self.weight_dtype)
        return apply_to_buffers(self, fn, lambda: super(QuantizedModule, self)._apply(fn, recurse))

    def extra_repr(self) -> str:
        act = f", act_bits={int(self.act_bits)}" if self.act_enabled else ""
        group_size = getattr(self, "group_size", None)  # modules pickled before group_size
        if group_size is not None:
            act = f", group_size={group_size}{act}"
        return (f"{super().extra_repr()}, bits={self.bits}, mode={self.mode}, "
                f"scheme={self.scheme}, granularity={self.granularity}, range={self.range}{act}")


def _hyper_parameters(module: nn.Module) -> list[str]:
    names = [*type(module).__constants__, *_EXTRA_ATTRIBUTES]
    return [n for n in names if n in module.__dict__]
