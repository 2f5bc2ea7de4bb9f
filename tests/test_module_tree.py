"""copy_replacing: a deep copy of a model, as copy.deepcopy makes it, only faster."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zoo import BY_NAME, ZooModel

from squant.nn.module_tree import copy_replacing

ENTRIES = sorted(BY_NAME.values(), key=lambda e: e.name)


def sharing(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of names (modules, parameters, buffers) that reach the same object."""
    first: dict[int, str] = {}
    pairs = []
    named = [*model.named_modules(remove_duplicate=False),
             *model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    for name, item in named:
        if id(item) in first:
            pairs.append((first[id(item)], name))
        else:
            first[id(item)] = name
    return pairs


def storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
            if t.numel()}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_the_copy_is_a_deep_copy(entry: ZooModel) -> None:
    model = entry.build()
    copied = copy_replacing(model, [])
    reference = copy.deepcopy(model)
    assert [(n, type(m).__qualname__) for n, m in copied.named_modules(remove_duplicate=False)] == \
        [(n, type(m).__qualname__) for n, m in reference.named_modules(remove_duplicate=False)]
    assert sharing(copied) == sharing(model)
    assert not storages(copied) & storages(model)
    state, expected = copied.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    for (name, p), (_, q) in zip(copied.named_parameters(), model.named_parameters()):
        assert type(p) is type(q) and p.requires_grad == q.requires_grad, name
    with torch.no_grad():
        assert torch.equal(copied(entry.example()), model(entry.example()))


def test_weights_held_only_by_replaced_layers_are_not_copied() -> None:
    model = BY_NAME["tied_mlp"].build()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    copied = copy_replacing(model, linears)
    copied_linears = [m for m in copied.modules() if isinstance(m, nn.Linear)]
    for old, new in zip(linears, copied_linears):
        assert new is not old
        assert new.weight is old.weight  # about to be replaced: shared, never copied
        assert new.bias is None or new.bias is not old.bias


def test_modules_with_their_own_copy_rules_are_deep_copied() -> None:
    model = nn.Sequential(nn.LSTM(4, 3), nn.Linear(3, 2))
    copied = copy_replacing(model, [])
    lstm = copied[0]
    assert lstm is not model[0]
    assert all(a is b for a, b in zip(lstm._flat_weights, lstm.parameters()))
    x = torch.randn(5, 1, 4)
    assert torch.equal(lstm(x)[0], model[0](x)[0])
