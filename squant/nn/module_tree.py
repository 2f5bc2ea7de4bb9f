"""Operations on a model's module tree shared by quantizing and loading: copying a model without
the weights about to be replaced, and putting replacement modules in place under every name."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn


def copy_replacing(model: nn.Module, replaced: Iterable[nn.Module]) -> nn.Module:
    """A deep copy of ``model`` that shares nothing with it, except the weights of the modules in
    ``replaced`` that no other module holds: those are about to be replaced by quantized ones,
    so the copy never exposes them, and copying them as float would only cost memory."""
    replaced_ids = {id(m) for m in replaced}
    holders: dict[int, set[int]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for tensor in module._parameters.values():
            if tensor is not None:
                holders.setdefault(id(tensor), set()).add(id(module))
    memo = {id(m.weight): m.weight for _, m in model.named_modules(remove_duplicate=False)
            if id(m) in replaced_ids and holders[id(m.weight)] <= replaced_ids}
    return copy.deepcopy(model, memo)


def swap_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put each replacement (keyed by ``id`` of the module it replaces) wherever that module
    sits, under every name; returns the root (itself replaced if it is a key)."""
    if id(model) in replacements:
        return replacements[id(model)]
    for _, module in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(module._modules.items()):  # every name, repeats too
            if child is not None and id(child) in replacements:
                setattr(module, child_name, replacements[id(child)])
    return model
