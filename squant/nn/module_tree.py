"""Operations on a model's module tree shared by quantizing and loading: copying a model without
the weights about to be replaced, and putting replacement modules in place under every name."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .base import quantized_class

# Values a module's __dict__ holds that copying may share: immutable, or empty containers.
_IMMUTABLE = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)
_EMPTY_CONTAINERS = (dict, OrderedDict, set, list)


def copy_replacing(model: nn.Module, replaced: Iterable[nn.Module]) -> nn.Module:
    """A deep copy of ``model`` that shares nothing with it, except the weights of the modules in
    ``replaced`` that no other module holds: those are about to be replaced by quantized ones,
    so the copy never exposes them, and copying them as float would only cost memory.

    The copy is :func:`copy.deepcopy`'s, made faster for modules: a module whose class copies
    and pickles as ``nn.Module`` does is rebuilt from its ``__dict__`` directly (plain tensors
    cloned, immutable values shared, empty hook dicts made anew); any other
    module (e.g. RNNs, parametrized modules) goes through ``copy.deepcopy``. Objects reachable
    several times (a module under two names, a tied parameter) stay shared in the copy.
    """
    replaced_ids = {id(m) for m in replaced}
    holders: dict[int, set[int]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for tensor in module._parameters.values():
            if tensor is not None:
                holders.setdefault(id(tensor), set()).add(id(module))
    memo = {}
    for _, module in model.named_modules(remove_duplicate=False):
        if id(module) not in replaced_ids:
            continue
        cls = quantized_class(module)
        for name in cls.weight_names(module) if cls is not None else ["weight"]:
            weight = module._parameters.get(name)
            if weight is not None and holders[id(weight)] <= replaced_ids:
                memo[id(weight)] = weight
    return _copy_module(model, memo)


# __setstate__ methods that only fill in attributes missing from old pickles (a live module's
# __dict__ has them all), so that copying the __dict__ is what deepcopy would do.
_PLAIN_SETSTATE = (nn.Module.__setstate__, _ConvNd.__setstate__,
                   nn.MultiheadAttention.__setstate__)


def _copies_like_a_module(cls: type) -> bool:
    """Whether instances of ``cls`` copy exactly as a plain ``nn.Module`` does."""
    return (getattr(cls, "__deepcopy__", None) is None
            and cls.__reduce_ex__ is nn.Module.__reduce_ex__
            and cls.__getstate__ is nn.Module.__getstate__
            and cls.__setstate__ in _PLAIN_SETSTATE)


def _copy_module(module: nn.Module, memo: dict) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _copies_like_a_module(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = {name: None if child is None else _copy_module(child, memo)
                          for name, child in value.items()}
        elif key in ("_parameters", "_buffers"):
            state[key] = {name: _copy_tensor(tensor, memo) for name, tensor in value.items()}
        else:
            state[key] = _copy_value(value, memo)
    new.__dict__.update(state)
    return new


def _copy_tensor(tensor: torch.Tensor | None, memo: dict) -> torch.Tensor | None:
    """A plain tensor or Parameter (no grad, no attributes of its own) by ``clone``; anything
    else by its own ``__deepcopy__``."""
    if tensor is None or id(tensor) in memo:
        return None if tensor is None else memo[id(tensor)]
    if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.grad is not None or (
            tensor.__dict__ or not tensor.is_leaf):
        return copy.deepcopy(tensor, memo)
    new = tensor.detach().clone(memory_format=torch.preserve_format)
    if type(tensor) is nn.Parameter:
        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
    memo[id(tensor)] = new
    return new


def _copy_value(value: object, memo: dict) -> object:
    if isinstance(value, _IMMUTABLE):
        return value
    if type(value) is tuple and all(isinstance(item, _IMMUTABLE) for item in value):
        return value
    if type(value) in _EMPTY_CONTAINERS and not value:
        return type(value)()
    if isinstance(value, torch.Tensor) and not value.is_leaf:
        # A weight computed by a hook (the old torch.nn.utils.weight_norm): recomputed before
        # each forward, so its value is all there is to copy (deepcopy refuses non-leaves).
        memo[id(value)] = value.detach().clone()
        return memo[id(value)]
    return copy.deepcopy(value, memo)


def swap_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put each replacement (keyed by ``id`` of the module it replaces) wherever that module
    sits, under every name, inside replacements too (an attention layer's ``out_proj``);
    returns the root (itself replaced if it is a key)."""
    root = replacements.get(id(model), model)
    pending, seen = [root], {id(root)}
    while pending:
        module = pending.pop()
        for child_name, child in list(module._modules.items()):  # every name, repeats too
            if child is None:
                continue
            if id(child) in replacements:
                child = replacements[id(child)]
                setattr(module, child_name, child)
            if id(child) not in seen:
                seen.add(id(child))
                pending.append(child)
    return root
