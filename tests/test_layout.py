"""The package's layout: the import paths of squant 0.1's flat layout still resolve."""

import importlib
import pickle

import pytest
import torch

import squant
from squant._compat import MOVED


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_module_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_names_resolve_to_the_same_objects():
    from squant.bn_ranges import ChannelGaussians
    from squant.storage import load
    from squant.tensor import QuantizedTensor

    assert QuantizedTensor is squant.QuantizedTensor
    assert load is squant.load
    assert ChannelGaussians is squant.ranges.batchnorm.ChannelGaussians
    assert squant.nn.QuantizedLinear.__module__.startswith("squant.nn")


def test_a_pickle_written_with_the_old_path_loads():
    qtensor = squant.quantize_weight(torch.randn(4, 3), bits=4)
    written = pickle.dumps(qtensor, protocol=0)  # text protocol: module paths spelled out
    assert b"squant.core.tensor" in written
    again = pickle.loads(written.replace(b"squant.core.tensor", b"squant.tensor"))
    assert type(again) is squant.QuantizedTensor
    assert torch.equal(again.codes, qtensor.codes)
