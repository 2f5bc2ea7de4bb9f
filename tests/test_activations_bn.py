"""``act_range="bn"``: a layer fed by a BatchNorm (through ReLU/ReLU6, Identity, Dropout,
flatten) takes its input range from the BN's gamma and beta; every other layer, and every layer
of a model torch.fx cannot trace, keeps the paper's rule.

Expected BN ranges are computed here in float64 from hand-set gamma and beta. Flatten is a
reshape: it keeps every value, so it is walked through (the Linear after it gets the BN range).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_activations import calibration_batch, layer_inputs, reference_range
from torch import nn
from torch.nn import functional as F

import squant
from squant.activations import BN_STDS

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


def expected_bn_range(bn: nn.BatchNorm2d, low: float, high: float) -> tuple[float, float]:
    """The rule in float64: per channel beta -+ k|gamma|, min/max over channels, clamped."""
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    lo, hi = np.min(beta - BN_STDS * np.abs(gamma)), np.max(beta + BN_STDS * np.abs(gamma))
    return float(np.clip(lo, low, high)), float(np.clip(hi, low, high))


def act_range(module: nn.Module) -> tuple[float, float]:
    return float(module.act_lo), float(module.act_hi)


@pytest.mark.parametrize("act_bits", [4, 8])
def test_layers_fed_by_a_batchnorm_take_its_range_clipped_by_the_activation(act_bits: int
                                                                              ) -> None:
    model = bn_net()
    qmodel = squant.quantize(model, 8, act_bits=act_bits, input_shape=IMAGE, act_range="bn")
    relu = expected_bn_range(model[1], 0.0, np.inf)
    relu6 = expected_bn_range(model[4], 0.0, 6.0)
    assert relu[0] == 0 and relu6[0] > 0 and relu6[1] == 6  # the premises: the clips matter
    assert act_range(qmodel[3]) == pytest.approx(relu, rel=1e-6)
    assert act_range(qmodel[7]) == pytest.approx(relu6, rel=1e-6)  # through Flatten


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
    assert act_range(qmodel.b) == pytest.approx(expected_bn_range(model.bn, 0, 6), rel=1e-6)
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
