"""``range="search"`` weighted by the BatchNorm-determined input moments: per channel the kept
range never has a larger expected output error than minmax's, that expectation is the one
sampled inputs show, the driver hands each layer (and each group) its own moments, and layers
without BN inputs fall back to the weight error."""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import squant
from squant.core.batch import BatchResult, quantize_batch
from squant.core.options import QuantOptions
from squant.nn import QuantizedModule
from squant.ranges.batchnorm import ChannelGaussians, bn_input_moments


def _dequantized(result) -> np.ndarray:
    codes = result.codes.astype(np.float64)
    return (codes + result.zero_point[:, None, None]) / result.scale.astype(np.float64)[:, None,
                                                                                       None]


def _output_errors(weight: np.ndarray, result, moments: np.ndarray) -> np.ndarray:
    """Per channel ``sum var * d**2 + (sum mean * d)**2`` for a ``(O, I, K)`` weight and
    ``(G, 2, I)`` moments, in numpy float64 (independent of the kernels)."""
    o = weight.shape[0]
    diff = weight.astype(np.float64) - _dequantized(result)
    group = np.arange(o) // (o // moments.shape[0])
    variance, mean = moments[group, 0][:, :, None], moments[group, 1][:, :, None]
    return (variance * diff * diff).sum((1, 2)) + ((mean * diff).sum((1, 2))) ** 2


@st.composite
def _weights_and_moments(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    groups = draw(st.sampled_from([1, 2, 4]))
    out = groups * draw(st.integers(1, 6))
    inner, ksize = draw(st.integers(1, 24)), draw(st.sampled_from([1, 3, 9]))
    weight = rng.standard_t(draw(st.sampled_from([2, 4, 30])), (out, inner, ksize))
    variance = rng.uniform(0.0, 4.0, (groups, inner))
    mean = rng.normal(0.0, draw(st.sampled_from([0.0, 1.0, 5.0])), (groups, inner))
    return weight.astype(np.float32), np.stack([variance, mean], axis=1), draw(st.integers(2, 8))


@settings(max_examples=80, deadline=None)
@given(_weights_and_moments(), st.sampled_from(["E", "KC"]))
def test_weighted_search_never_has_a_larger_output_error_than_minmax(case, mode: str) -> None:
    weight, moments, bits = case
    minmax = quantize_batch([weight], [QuantOptions(bits, mode)])[0]
    search = quantize_batch([weight], [QuantOptions(bits, mode, range="search")],
                            moments=[moments])[0]
    before = _output_errors(weight, minmax, moments)
    after = _output_errors(weight, search, moments)
    assert (after <= before * (1 + 1e-9) + 1e-300).all()
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert search.codes.min() >= low and search.codes.max() <= high


@settings(max_examples=30, deadline=None)
@given(_weights_and_moments())
def test_unit_variances_and_zero_means_are_the_plain_search(case) -> None:
    weight, moments, bits = case
    plain = np.stack([np.ones_like(moments[:, 0]), np.zeros_like(moments[:, 1])], axis=1)
    options = [QuantOptions(bits, "KC", range="search")]
    weighted = quantize_batch([weight], options, moments=[plain])[0]
    unweighted = quantize_batch([weight], options)[0]
    assert np.array_equal(weighted.codes, unweighted.codes)
    assert np.array_equal(weighted.scale, unweighted.scale)


def test_the_criterion_is_the_expected_output_error_of_sampled_inputs() -> None:
    """Inputs drawn independently per element with the given moments: the searched weight's
    mean squared output error is below minmax's, as the criterion says, and matches it."""
    rng = np.random.default_rng(5)
    weight = rng.standard_t(3, (32, 16, 9)).astype(np.float32)
    variance, mean = rng.uniform(0.2, 2.0, 16), rng.uniform(0.0, 3.0, 16)
    moments = np.stack([variance, mean])[None]
    minmax = quantize_batch([weight], [QuantOptions(3)])[0]
    search = quantize_batch([weight], [QuantOptions(3, range="search")], moments=[moments])[0]
    x = mean[:, None] + np.sqrt(variance)[:, None] * rng.standard_normal((200_000, 16, 9))
    sampled = {}
    for name, result in (("minmax", minmax), ("search", search)):
        diff = (weight.astype(np.float64) - _dequantized(result)).reshape(32, -1)
        sampled[name] = ((x.reshape(len(x), -1) @ diff.T) ** 2).mean(0)
        expected = _output_errors(weight, result, moments)
        np.testing.assert_allclose(sampled[name], expected, rtol=0.05)
    assert sampled["search"].sum() < 0.9 * sampled["minmax"].sum()


def test_weighted_search_does_not_depend_on_the_thread_count() -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((256, 64, 9)).astype(np.float32)
    moments = np.stack([rng.uniform(0, 2, (4, 64)), rng.normal(0, 2, (4, 64))], axis=1)
    threads = numba.get_num_threads()
    try:
        results = []
        for count in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(count)
            results.append(quantize_batch([weight], [QuantOptions(4, range="search")],
                                          moments=[moments])[0])
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(results[0].codes, results[1].codes)
    assert np.array_equal(results[0].scale, results[1].scale)


def test_moments_that_do_not_fit_the_weight_are_refused() -> None:
    weight = np.ones((6, 4, 1), np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        quantize_batch([weight], [QuantOptions(4, range="search")],
                       moments=[np.ones((4, 2, 4))])  # 4 groups do not divide 6 channels


class _BnReluConv(nn.Module):
    """conv0 (image input) -> BN -> ReLU -> grouped conv1 -> BN -> ReLU6 -> flatten -> fc."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.bn1 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)
        for bn in (self.bn0, self.bn1):
            nn.init.uniform_(bn.weight, 0.2, 2.0)
            nn.init.uniform_(bn.bias, -1.0, 3.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.conv0(x)))
        x = nn.functional.relu6(self.bn1(self.conv1(x)))
        return self.fc(x.flatten(1))


def _relu_moments(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form mean and variance of ``max(N(mean, std**2), 0)``."""
    a = mean / std
    pdf = torch.exp(-0.5 * a**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    first = mean * cdf + std * pdf
    second = (mean**2 + std**2) * cdf + mean * std * pdf
    return first, second - first**2


def test_bn_input_moments_are_the_clamped_gaussians() -> None:
    model = _BnReluConv()
    found = bn_input_moments(model, [model.conv0, model.conv1, model.fc], "test", "fall back")
    assert set(found) == {id(model.conv1)}  # image input: none; fc: 256 features, 16 channels
    mean, variance = found[id(model.conv1)]
    want_mean, want_variance = _relu_moments(model.bn0.bias.detach().double(),
                                             model.bn0.weight.detach().double().abs())
    torch.testing.assert_close(mean, want_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(variance, want_variance, rtol=1e-4, atol=1e-6)


def test_quantize_hands_each_group_its_own_moments() -> None:
    model = _BnReluConv()
    qmodel = squant.quantize(model, 3, range="search")
    weight = model.conv1.weight.detach().numpy().reshape(16, 4, 9)
    mean, variance = ChannelGaussians.of_batchnorm(model.bn0).clamped(0.0, math.inf).moments()
    moments = torch.stack([variance.reshape(2, 4), mean.reshape(2, 4)], dim=1).numpy()
    options = [QuantOptions(3, range="search")]
    want = quantize_batch([weight], options, moments=[moments])[0]
    plain = quantize_batch([weight], options)[0]
    got = qmodel.conv1
    assert np.array_equal(got.codes.numpy().reshape(16, 4, 9), want.codes)
    assert np.array_equal(got.scale.numpy(), want.scale)
    assert not np.array_equal(want.scale, plain.scale)  # the moments changed the choice
    swapped = quantize_batch([weight], options, moments=[moments[::-1].copy()])[0]
    assert not np.array_equal(want.scale, swapped.scale)  # and the groups' moments differ
    for name in ("conv0", "fc"):  # no BN input of the right width: the weight error decides
        layer = getattr(model, name)
        flat = layer.weight.detach().numpy().reshape(layer.weight.shape[0],
                                                     layer.weight.shape[1], -1)
        alone = quantize_batch([flat], options)[0]
        assert np.array_equal(getattr(qmodel, name).scale.numpy(), alone.scale)


def test_search_lowers_the_expected_output_error_of_a_bn_model() -> None:
    model = _BnReluConv()
    weight = model.conv1.weight.detach().numpy().reshape(16, 4, 9)
    mean, variance = ChannelGaussians.of_batchnorm(model.bn0).clamped(0.0, math.inf).moments()
    moments = torch.stack([variance.reshape(2, 4), mean.reshape(2, 4)], dim=1).numpy()

    def conv1_result(qmodel: nn.Module) -> BatchResult:
        q = qmodel.conv1
        return BatchResult(q.codes.numpy().reshape(16, 4, 9), q.scale.numpy(),
                           q.zero_point.numpy(), True)

    errors = {r: _output_errors(weight, conv1_result(squant.quantize(model, 3, range=r)), moments)
              for r in ("minmax", "search")}
    assert (errors["search"] <= errors["minmax"] * (1 + 1e-9)).all()
    assert errors["search"].sum() < errors["minmax"].sum()


class _Untraceable(_BnReluConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 1.0
        return super().forward(x)


def test_an_untraceable_model_warns_and_searches_by_weight_error() -> None:
    model = _Untraceable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = squant.quantize(model, 3, range="search")
    messages = [str(w.message) for w in caught]
    assert any('range="search" cannot trace _Untraceable' in m for m in messages)
    assert any("weight error alone" in m for m in messages)
    weight = model.conv1.weight.detach().numpy().reshape(16, 4, 9)
    plain = quantize_batch([weight], [QuantOptions(3, range="search")])[0]
    assert np.array_equal(qmodel.conv1.scale.numpy(), plain.scale)
    assert all(m.range == "search" for m in qmodel.modules() if isinstance(m, QuantizedModule))


def test_minmax_never_traces() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        squant.quantize(_Untraceable(), 4)


class _SharedWeight(nn.Module):
    """Two Linear layers sharing one weight, each after its own BatchNorm and ReLU."""

    def __init__(self, same_inputs: bool) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.bn_a, self.bn_b = nn.BatchNorm1d(16), nn.BatchNorm1d(16)
        nn.init.uniform_(self.bn_a.weight, 0.2, 2.0)
        nn.init.uniform_(self.bn_a.bias, 0.0, 4.0)
        if same_inputs:
            self.bn_b.load_state_dict(self.bn_a.state_dict())
        self.fc_a, self.fc_b = nn.Linear(16, 32), nn.Linear(16, 32)
        nn.init.normal_(self.fc_a.weight)
        self.fc_b.weight = self.fc_a.weight
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_a(torch.relu(self.bn_a(x))) + self.fc_b(torch.relu(self.bn_b(x)))


@pytest.mark.parametrize("same_inputs", [True, False])
def test_a_shared_weight_is_weighted_only_if_its_layers_see_the_same_inputs(
        same_inputs: bool) -> None:
    model = _SharedWeight(same_inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = squant.quantize(model, 3, range="search")
    # different inputs: the only searched weight is not weighted, which the warning says
    assert any("weight error alone" in str(w.message) for w in caught) is not same_inputs
    assert qmodel.fc_a.codes is qmodel.fc_b.codes
    weight = model.fc_a.weight.detach().numpy()[:, :, None]
    mean, variance = ChannelGaussians.of_batchnorm(model.bn_a).clamped(0.0, math.inf).moments()
    options = [QuantOptions(3, range="search")]
    weighted = quantize_batch([weight], options,
                              moments=[torch.stack([variance, mean])[None].numpy()])[0]
    plain = quantize_batch([weight], options)[0]
    assert not np.array_equal(weighted.scale, plain.scale)
    want = weighted if same_inputs else plain
    assert np.array_equal(qmodel.fc_a.scale.numpy(), want.scale)
    assert np.array_equal(qmodel.fc_a.codes.numpy(), want.codes[:, :, 0])


def test_a_model_without_bn_inputs_warns_that_the_search_uses_the_weight_error() -> None:
    torch.manual_seed(2)
    folded = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.warns(UserWarning, match="weight error alone"):
        qmodel = squant.quantize(folded, 3, range="search")
    weight = folded[2].weight.detach().numpy().reshape(4, 8, 9)
    plain = quantize_batch([weight], [QuantOptions(3, range="search")])[0]
    assert np.array_equal(qmodel[2].codes.numpy().reshape(4, 8, 9), plain.codes)


def test_a_model_with_bn_inputs_searches_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        squant.quantize(_BnReluConv(), 3, range="search")
