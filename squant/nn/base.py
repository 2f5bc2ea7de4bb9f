"""What every quantized module shares, and the registry of float class -> quantized class.

Each quantized class subclasses its float class, so ``forward`` is torch's own (``F.linear``,
``_conv_forward``, ...) run with the dequantized weight. The int8 codes, scales and zero points
are buffers (so ``state_dict`` holds the integers); the bias stays a float parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import QuantizationError
from ..core.fake_quant import fake_quantize
from ..core.tensor import QuantizedTensor, dequantize_codes

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


def quantized_class(module: nn.Module) -> type[QuantizedModule] | None:
    """The quantized class for ``module``: the one registered for its class or, for a subclass
    of a registered float class, for the nearest such base, provided the subclass keeps that
    base's ``forward`` and parameters (``weight``, ``bias``) and adds no buffers: e.g.
    ``nn.MultiheadAttention``'s ``out_proj``. None for anything else, quantized modules too."""
    if isinstance(module, QuantizedModule) or "weight" not in module._parameters:
        return None  # ``weight`` computed (computed_weight) or no layer of ours at all
    base = registered_base(type(module))
    if base is None:
        return None
    if base is type(module) or (type(module).forward is base.forward and not module._buffers
                                and set(module._parameters) <= {"weight", "bias"}):
        return QUANTIZED_CLASSES[base]
    return None


def computed_weight(module: nn.Module) -> bool:
    """Whether ``module.weight`` is computed rather than held (``weight_norm``,
    ``spectral_norm`` or another parametrization or hook): such layers stay float."""
    return "weight" not in module._parameters and registered_base(type(module)) is not None


def registered_base(cls: type) -> type[nn.Module] | None:
    """The nearest class in ``cls``'s MRO that has a quantized counterpart, or None."""
    return next((base for base in cls.__mro__ if base in QUANTIZED_CLASSES), None)


class QuantizedModule:
    """What every quantized layer shares: code buffers, dequantization, conversions.

    ``weight`` is the dequantized weight ``(codes + zero_point) / scale`` in the float layer's
    dtype. With ``cache_weight`` (the default) it is computed once and kept until the buffers
    change (``load_state_dict``, ``.to()``); without, it is recomputed at each use to save memory.
    """

    float_class: type[nn.Module]
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    @classmethod
    def from_float(cls, module: nn.Module, qweight: QuantizedTensor,
                   cache_weight: bool = True) -> QuantizedModule:
        """A quantized copy of ``module`` with ``qweight`` as its weight (bias shared as is)."""
        qmodule = cls.__new__(cls)
        nn.Module.__init__(qmodule)
        for name in _hyper_parameters(module):
            setattr(qmodule, name, getattr(module, name))
        qmodule.bias = module.bias
        qmodule.register_buffer("codes", qweight.codes)
        qmodule.register_buffer("scale", qweight.scale)
        qmodule.register_buffer("zero_point", qweight.zero_point)
        qmodule.bits, qmodule.mode, qmodule.axis = qweight.bits, qweight.mode, qweight.axis
        qmodule.scheme, qmodule.granularity = qweight.scheme, qweight.granularity
        qmodule.range, qmodule.group_size = qweight.range, qweight.group_size
        qmodule.cache_weight = cache_weight
        qmodule.weight_dtype = module.weight.dtype
        qmodule.original_class = type(module)  # a subclass of float_class: dequantize gives it
        qmodule._cached_weight = None
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
        """``(codes + zero_point) / scale`` in float32, scale and zero point along ``axis``."""
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
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        result = super()._apply(fn, recurse)
        for name in ("scale", "zero_point", "act_lo", "act_hi"):
            if name in self._buffers:
                self._buffers[name] = self._buffers[name].float()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """torch's loading, refusing codes outside this layer's ``bits`` (e.g. an 8-bit
        state_dict loaded into a 4-bit model, which ``squant.save`` would then pack into 4 bits
        and corrupt): the layer is left as it was and ``load_state_dict`` raises."""
        self._cached_weight = None
        codes = state_dict.get(prefix + "codes")
        if isinstance(codes, torch.Tensor) and codes.numel():
            high = 2 ** (self.bits - 1) - 1
            low = -high if self.scheme == "symmetric" else -high - 1
            found = (int(codes.min()), int(codes.max()))
            if found[0] < low or found[1] > high:
                error_msgs.append(
                    f"{prefix}codes hold values in {found[0]}..{found[1]}, outside the "
                    f"{self.bits}-bit {self.scheme} range {low}..{high} of this "
                    f"{type(self).__name__}: the state_dict was quantized with other bits or "
                    "another scheme; quantize the model with those first")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

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
