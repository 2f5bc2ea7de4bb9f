"""Quantized layers that hold several weight matrices: attention and recurrent layers.

``nn.MultiheadAttention`` keeps ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight``), an LSTM one ``weight_ih_l<k>`` and ``weight_hh_l<k>`` per layer and
direction: bare Parameters read by the layer's own ``forward`` by name. The quantized class
subclasses the float class (so ``forward`` stays torch's own) and replaces each of those
Parameters by a :class:`QuantizedWeight` child module registered under the Parameter's name:
its ``state_dict`` keys are ``<param>.codes``, ``<param>.scale``, ``<param>.zero_point``, and
reading the attribute ``<param>`` gives the dequantized weight, computed once and cached (or
at each use without ``cache_weights``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.errors import QuantizationError
from ..core.tensor import QuantizedTensor, dequantize_codes
from .base import CheckedCodes, applied_dtype, apply_to_buffers

# What from_weights adds to a layer (not copied back by to_float).
_OWN_ATTRIBUTES = {"quantized_names", "original_class", "parameter_order", "cache_weight"}


class QuantizedWeight(CheckedCodes, nn.Module):
    """One quantized weight of a layer: int8 ``codes`` (the weight's shape), float32 ``scale``
    and ``zero_point`` per row (``axis`` 0), and the grid's options; :meth:`dequantized` is
    ``(codes + zero_point) * fl32(1 / scale)`` in the float weight's dtype."""

    def __init__(self, qweight: QuantizedTensor, dtype: torch.dtype,
                 cache_weight: bool = True) -> None:
        super().__init__()
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("scale", qweight.scale)
        self.register_buffer("zero_point", qweight.zero_point)
        self.bits, self.mode, self.axis = qweight.bits, qweight.mode, qweight.axis
        self.scheme, self.granularity, self.range = (qweight.scheme, qweight.granularity,
                                                     qweight.range)
        self.group_size = qweight.group_size
        self.weight_dtype = dtype
        self.cache_weight = cache_weight
        self._cached_weight: torch.Tensor | None = None

    @property
    def groups_of_codes(self) -> int:
        """1: the rows of the matrix are its channels (as the file format's ``groups``)."""
        return 1

    def qtensor(self) -> QuantizedTensor:
        """The codes and grid as a :class:`squant.QuantizedTensor`."""
        return QuantizedTensor(self.codes, self.scale, self.zero_point, self.bits, self.mode,
                               self.axis, self.scheme, self.granularity, self.range,
                               self.group_size)

    def dequantize_weight(self) -> torch.Tensor:
        """``(codes + zero_point) * fl32(1 / scale)`` in float32."""
        return dequantize_codes(self.codes, self.scale, self.zero_point, self.axis,
                                group_size=getattr(self, "group_size", None))

    def dequantized(self) -> torch.Tensor:
        """The dequantized weight in the float weight's dtype (cached with ``cache_weight``;
        never an inference tensor, so that it serves later autograd-recorded forwards)."""
        if self._cached_weight is not None:
            return self._cached_weight
        with torch.inference_mode(False):
            weight = self.dequantize_weight().to(self.weight_dtype)
        if self.cache_weight:
            self._cached_weight = weight
        return weight

    def float_weight(self) -> nn.Parameter:
        """The dequantized weight as a new Parameter."""
        return nn.Parameter(self.dequantize_weight().to(self.weight_dtype))

    def _apply(self, fn, recurse=True):
        """``.to()``/``.half()``: the weight's dtype follows, scale and zero point stay
        float32."""
        self._cached_weight = None
        self.weight_dtype = applied_dtype(fn, self.weight_dtype)
        return apply_to_buffers(self, fn, lambda: super(QuantizedWeight, self)._apply(fn, recurse))

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.codes.shape)}, bits={self.bits}, mode={self.mode}, "
                f"scheme={self.scheme}, granularity={self.granularity}, range={self.range}")


class QuantizedMultiWeight:
    """Mixin for a quantized layer holding several :class:`QuantizedWeight` children, listed in
    ``quantized_names``; the float layer's other attributes, parameters (biases), buffers and
    children are kept as they are. Subclasses say which Parameters to quantize
    (:meth:`weight_names`)."""

    float_class: type[nn.Module]
    quantized_names: tuple[str, ...] = ()
    float_input = False  # no input moments, no activation quantization

    @classmethod
    def weight_names(cls, module: nn.Module) -> list[str]:
        """The names of ``module``'s Parameters to quantize (each at least 2-D, rows on axis
        0)."""
        raise NotImplementedError

    @classmethod
    def from_weights(cls, module: nn.Module, qweights: dict[str, QuantizedTensor],
                     cache_weight: bool = True) -> QuantizedMultiWeight:
        """A quantized copy of ``module``: each Parameter named in ``qweights`` replaced by its
        :class:`QuantizedWeight`, everything else shared with ``module``."""
        names = cls.weight_names(module)
        if set(names) != set(qweights):
            raise QuantizationError(f"{cls.__name__}: quantized tensors for "
                                    f"{', '.join(sorted(qweights))}, expected "
                                    f"{', '.join(names)}")
        qmodule = _copy_layer(module, cls, set(names))
        for name in names:  # in the layer's order, whatever the order given
            dtype = module._parameters[name].dtype
            qmodule._modules[name] = QuantizedWeight(qweights[name], dtype, cache_weight)
        qmodule.quantized_names = tuple(names)
        qmodule.original_class = type(module)
        qmodule.parameter_order = list(module._parameters)
        qmodule.cache_weight = cache_weight
        cls._after_copy(qmodule)
        return qmodule

    @staticmethod
    def _after_copy(module: nn.Module) -> None:
        """Run on the new layer (quantized or float) made by :meth:`from_weights` and
        :meth:`to_float`: e.g. an RNN gathers its ``_flat_weights`` again."""

    def __getattr__(self, name: str):
        """A quantized weight's name reads its dequantized weight."""
        if name in self.__dict__.get("quantized_names", ()):
            return self.__dict__["_modules"][name].dequantized()
        return super().__getattr__(name)

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        """Each quantized weight's child module by the Parameter's name."""
        return {name: self._modules[name] for name in self.quantized_names}

    def to_float(self, weights: dict[str, nn.Parameter] | None = None) -> nn.Module:
        """A plain float layer of the original class holding the dequantized weights (or
        ``weights``, to keep tied weights tied) and copies of the other parameters."""
        original = getattr(self, "original_class", self.float_class)
        module = _copy_layer(self, original, set(self.quantized_names))
        for name, tensor in module._parameters.items():
            if tensor is not None:
                module._parameters[name] = nn.Parameter(tensor.detach().clone(),
                                                        tensor.requires_grad)
        given = weights or {}
        quantized = {name: given[name] if given.get(name) is not None else child.float_weight()
                     for name, child in self.quantized_weights().items()}
        module._parameters = {name: quantized.get(name, module._parameters.get(name))
                              for name in self.parameter_order}
        self._after_copy(module)
        return module

    def __prepare_scriptable__(self) -> nn.Module:
        """squant's modules are not scriptable: say what works."""
        raise QuantizationError(
            f"torch.jit.script cannot compile squant's {type(self).__name__}; use "
            "torch.jit.trace(qmodel, example_inputs) or torch.compile(qmodel), or script the "
            "float model squant.dequantize(qmodel)")


def _copy_layer(module: nn.Module, cls: type, without: set[str]) -> nn.Module:
    """A new ``cls`` instance with ``module``'s attributes (lists and dicts copied, the rest
    shared), its parameters but those named in ``without``, its buffers and its children (but
    those named in ``without``)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    fresh = set(new.__dict__) | _OWN_ATTRIBUTES
    for key, value in module.__dict__.items():
        if key not in fresh:
            new.__dict__[key] = copy.copy(value) if isinstance(value, (list, dict)) else value
    new.training = module.training
    new._parameters = {n: p for n, p in module._parameters.items() if n not in without}
    new._buffers = dict(module._buffers)
    new._modules = {n: m for n, m in module._modules.items() if n not in without}
    return new
