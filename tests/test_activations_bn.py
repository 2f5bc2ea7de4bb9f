"""``act_range="bn"``: a layer whose input BatchNorms determine (through ReLU/ReLU6, Identity,
Dropout, flatten and residual adds) takes the range with the least expected quantization error
over that input's per-channel Gaussians; every other layer, and every layer of a model torch.fx
cannot trace, keeps the paper's rule.

The range rule itself is checked against Monte Carlo samples quantized by the real fake
quantizer; the graph walk against the distribution it must find, built by hand here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_activations import calibration_batch, layer_inputs, reference_range
from torch import nn
from torch.nn import functional as F

import squant
from squant.core.fake_quant import fake_quantize
from squant.ranges.batchnorm import ChannelGaussians, least_error_range

IMAGE = (3, 8, 8)


def bn_net() -> nn.Sequential:
    """Conv-BN-ReLU-Conv-BN-ReLU6-Flatten-Linear with gamma/beta set so that ReLU clips the
    low end (0), ReLU6 clips the high end (6) but not the positive low end, and a negative
    gamma counts by its magnitude."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.ReLU6(), nn.Flatten(),
                              nn.Linear(5 * 4 * 4, 3)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -1.0, 0.2, 0.3]))
        model[1].bias.copy_(torch.tensor([0.1, -0.2, 1.0, -3.0]))
        model[4].weight.copy_(torch.tensor([0.1, 0.2, -0.3, 0.1, 0.6]))
        model[4].bias.copy_(torch.tensor([3.0, 2.0, 4.0, 2.5, 4.0]))
    return model


def gaussians(bn: nn.BatchNorm1d | nn.BatchNorm2d, low: float = -math.inf,
              high: float = math.inf) -> ChannelGaussians:
    """By hand: per channel N(beta, gamma**2), clamped to [low, high]."""
    gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
    return ChannelGaussians(beta, gamma.abs(), low, high)


def samples(values: ChannelGaussians, count: int = 200_000, seed: int = 0) -> torch.Tensor:
    """``count`` draws of each channel's clamped Gaussian, all channels together (float64)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((values.mean.numel(), count), generator=generator, dtype=torch.float64)
    return (values.mean[:, None] + values.std[:, None] * z).clamp(values.low, values.high)


def sample_error(x: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    """Mean squared error of the real fake quantizer with range [lo, hi] on the samples."""
    q = fake_quantize(x.float(), torch.tensor(lo), torch.tensor(hi), bits).double()
    return float(((q - x) ** 2).mean())


def act_range(module: nn.Module) -> tuple[float, float]:
    return float(module.act_lo), float(module.act_hi)


@pytest.mark.parametrize("act_bits", [4, 8])
def test_layers_fed_by_a_batchnorm_take_its_range_clipped_by_the_activation(act_bits: int
                                                                              ) -> None:
    model = bn_net()
    qmodel = squant.quantize(model, 8, act_bits=act_bits, input_shape=IMAGE, act_range="bn")
    relu = least_error_range(gaussians(model[1], 0.0, math.inf), act_bits)
    relu6 = least_error_range(gaussians(model[4], 0.0, 6.0), 8)  # the last layer: 8 bits
    assert relu[0] == 0 and relu6[0] > 0  # the premises: ReLU clips the low end, ReLU6 not
    assert act_range(qmodel[3]) == (float(relu[0]), float(relu[1]))
    assert act_range(qmodel[7]) == (float(relu6[0]), float(relu6[1]))  # through Flatten


def test_first_layer_keeps_a_float_input_and_the_last_uses_8_bits() -> None:
    qmodel = squant.quantize(bn_net(), 4, act_bits=3, input_shape=IMAGE, act_range="bn")
    assert not qmodel[0].act_enabled
    assert int(qmodel[3].act_bits) == 3
    assert int(qmodel[7].act_bits) == 8


class Mixed(nn.Module):
    """``b`` is fed by a BN through F.relu6 and Dropout; ``c`` by a residual add, ``d`` by a
    pooling, ``e`` by a plain Linear: those three keep the paper's rule."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.drop = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.1)
        self.b, self.c, self.d, self.e = (nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(3, 5),
                                          nn.Linear(5, 2))
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([0.5, 1.0, 0.2, 0.3, 0.4, 0.1]))
            self.bn.bias.copy_(torch.tensor([0.1, -0.2, 1.0, 3.0, 0.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu6(self.bn(self.a(x))))
        h = self.c(self.b(h) + h)
        h = F.avg_pool1d(h.unsqueeze(1), 2).squeeze(1)
        return self.e(self.d(h))


def test_layers_without_a_batchnorm_before_them_keep_the_paper_rule() -> None:
    model = Mixed().eval()
    qmodel = squant.quantize(model, 8, act_bits=6, input_shape=(4,), act_range="bn")
    expected = least_error_range(gaussians(model.bn, 0.0, 6.0), 6)
    assert act_range(qmodel.b) == (float(expected[0]), float(expected[1]))
    inputs = layer_inputs(qmodel, calibration_batch((4,)))
    for name, bits, sigma in (("c", 6, 14), ("d", 6, 14), ("e", 8, 25)):
        expected = reference_range(inputs[name], bits, sigma)
        assert act_range(qmodel.get_submodule(name)) == pytest.approx(expected, rel=1e-5,
                                                                      abs=1e-7)


def test_a_folded_model_without_batchnorm_equals_paper() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Linear(5, 3)).eval()
    paper = squant.quantize(model, 4, act_bits=4, input_shape=(4,))
    bn = squant.quantize(model, 4, act_bits=4, input_shape=(4,), act_range="bn")
    for key, value in paper.state_dict().items():
        assert torch.equal(bn.state_dict()[key], value), key


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = bn_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if x.sum() > 0 else -self.net(x)


def test_an_untraceable_model_warns_and_equals_paper() -> None:
    model = Untraceable().eval()
    paper = squant.quantize(model, 4, act_bits=4, input_shape=IMAGE)
    with pytest.warns(UserWarning, match="cannot trace Untraceable"):
        bn = squant.quantize(model, 4, act_bits=4, input_shape=IMAGE, act_range="bn")
    for key, value in paper.state_dict().items():
        assert torch.equal(bn.state_dict()[key], value), key


def test_report_shows_the_bn_ranges() -> None:
    qmodel = squant.quantize(bn_net(), 8, act_bits=8, input_shape=IMAGE, act_range="bn",
                             report=True)
    rows = {row.name: row for row in qmodel.squant_report.layers}
    assert (rows["3"].act_lo, rows["3"].act_hi) == act_range(qmodel[3])


def test_unknown_act_range_is_refused() -> None:
    with pytest.raises(squant.QuantizationError, match="unknown act_range 'BN'.*paper, bn"):
        squant.quantize(bn_net(), 4, act_bits=4, input_shape=IMAGE, act_range="BN")


MIXTURES = {
    "standard normal": ChannelGaussians(torch.zeros(1, dtype=torch.float64),
                                        torch.ones(1, dtype=torch.float64)),
    "relu of a mixture": ChannelGaussians(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64),
                                          torch.tensor([1.0, 2.0, 0.3], dtype=torch.float64),
                                          0.0, math.inf),
    "relu6, positive": ChannelGaussians(torch.tensor([3.0, 5.0], dtype=torch.float64),
                                        torch.tensor([0.4, 1.5], dtype=torch.float64), 0.0, 6.0),
    "signed, skewed": ChannelGaussians(torch.tensor([-2.0, 0.0, 4.0], dtype=torch.float64),
                                       torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)),
}


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("name", list(MIXTURES))
def test_the_range_has_the_least_quantization_error_on_samples(name: str, bits: int) -> None:
    """No other range does clearly better on real draws through the real fake quantizer:
    not the samples' min/max, not k-sigma ranges, not the chosen range shrunk or widened."""
    values = MIXTURES[name]
    lo, hi = map(float, least_error_range(values, bits))
    x = samples(values).flatten()
    chosen = sample_error(x, lo, hi, bits)
    mean, std = float(values.moments()[0].mean()), float(values.moments()[1].mean()) ** 0.5
    others = [(float(x.min()), float(x.max()))]
    others += [(max(mean - k * std, values.low), min(mean + k * std, values.high))
               for k in (2.0, 3.0, 4.0, 6.0)]
    others += [(lo, lo + f * (hi - lo)) for f in (0.8, 0.9, 1.1, 1.25)]
    others += [(lo + f * (hi - lo), hi) for f in (0.05, 0.1)] if values.low == -math.inf else []
    for other_lo, other_hi in others:
        assert chosen <= 1.03 * sample_error(x, other_lo, other_hi, bits), (other_lo, other_hi)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_range_matches_a_brute_force_search_on_samples(bits: int) -> None:
    """As good as the best symmetric range on N(0, 1) draws (the optimum need not be symmetric:
    the fake quantizer's grid holds 0, so 2**bits levels cannot sit symmetrically around it)."""
    values = MIXTURES["standard normal"]
    x = samples(values).flatten()
    alphas = np.arange(1.0, 5.0, 0.05)
    brute_force = min(sample_error(x, -a, a, bits) for a in alphas)
    lo, hi = map(float, least_error_range(values, bits))
    assert sample_error(x, lo, hi, bits) <= 1.02 * brute_force


def test_the_range_widens_with_the_bits_and_respects_the_clamp() -> None:
    for values in MIXTURES.values():
        ranges = [tuple(map(float, least_error_range(values, bits))) for bits in range(2, 9)]
        widths = [hi - lo for lo, hi in ranges]
        assert widths == sorted(widths)
        assert all(values.low <= lo < hi <= values.high for lo, hi in ranges)
    assert least_error_range(MIXTURES["relu of a mixture"], 4)[0] == 0  # the ReLU's zeros


def test_constant_channels_at_one_value_have_no_range() -> None:
    values = ChannelGaussians(torch.full((3,), 2.0, dtype=torch.float64),
                              torch.zeros(3, dtype=torch.float64))
    assert least_error_range(values, 4) is None
    assert least_error_range(MIXTURES["relu of a mixture"].clamped(-1.0, -0.5), 4) is None


@settings(max_examples=30, deadline=None)
@given(mean=st.floats(-3, 3), std=st.floats(0.05, 3), low=st.sampled_from([-math.inf, 0.0]),
       high=st.sampled_from([math.inf, 6.0, 1.0]))
def test_clamped_moments_match_samples(mean: float, std: float, low: float,
                                       high: float) -> None:
    values = ChannelGaussians(torch.tensor([mean], dtype=torch.float64),
                              torch.tensor([std], dtype=torch.float64), low, high)
    x = samples(values, 400_000)
    moment_mean, moment_var = values.moments()
    assert float(moment_mean[0]) == pytest.approx(float(x.mean()), abs=0.01 * std + 1e-3)
    assert float(moment_var[0]) == pytest.approx(float(x.var()), rel=0.02, abs=1e-4)


class Residual(nn.Module):
    """``c`` reads ``bn2(b(h)) + h`` with ``h = bn1(a(x))`` (both sides Gaussians); ``d`` reads
    ``relu(bn3(c(y))) + y`` (a clamped side: matched by its moments)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 3),
                                          nn.Linear(3, 2))
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)
        with torch.no_grad():
            for bn, gamma, beta in ((self.bn1, [0.5, -1.0, 0.2], [0.1, -0.2, 1.0]),
                                    (self.bn2, [0.3, 0.1, 2.0], [1.0, 0.5, -0.5]),
                                    (self.bn3, [1.0, 0.4, 0.6], [0.2, -1.0, 0.3])):
                bn.weight.copy_(torch.tensor(gamma))
                bn.bias.copy_(torch.tensor(beta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.a(x))
        y = self.bn2(self.b(h)) + h
        return self.d(F.relu(self.bn3(self.c(y))) + y)


def test_residual_adds_sum_means_and_standard_deviations() -> None:
    model = Residual().eval()
    qmodel = squant.quantize(model, 8, act_bits=5, input_shape=(4,), act_range="bn")
    bn1, bn2, bn3 = gaussians(model.bn1), gaussians(model.bn2), gaussians(model.bn3)
    y = ChannelGaussians(bn1.mean + bn2.mean, bn1.std + bn2.std)
    relu_mean, relu_var = bn3.clamped(0.0, math.inf).moments()
    d_input = ChannelGaussians(relu_mean + y.mean, relu_var.sqrt() + y.std)
    for layer, values, bits in ((qmodel.c, y, 5), (qmodel.d, d_input, 8)):
        lo, hi = least_error_range(values, bits)
        assert act_range(layer) == (float(lo), float(hi))
    # the premise: a side clamped by ReLU is not the plain Gaussian
    assert not torch.allclose(relu_mean, bn3.mean)
