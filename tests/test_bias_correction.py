"""``bias_correction=True``: the mean output shift of each quantized layer with BatchNorm-fed
inputs is removed (checked on sampled inputs, and against the formula by hand); bias-free layers
get a bias that survives save/load and dequantize; nothing else changes."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import squant
from squant.ranges.batchnorm import ChannelGaussians
from squant.ranges.bias_correction import expected_shift


class _BnReluConv(nn.Module):
    """stem (image input) -> BN -> ReLU -> grouped conv (no bias, no padding) -> BN -> ReLU
    -> flatten -> fc: the grouped conv and nothing else has BN-determined inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.stem = nn.Conv2d(3, 8, 3)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 2 * 2, 5)
        for bn in (self.bn0, self.bn1):
            nn.init.uniform_(bn.weight, 0.2, 1.5)
            nn.init.uniform_(bn.bias, 0.5, 3.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv(x)))
        return self.fc(x.flatten(1))


def _conv_inputs(model: _BnReluConv, count: int) -> torch.Tensor:
    """Inputs of ``model.conv`` drawn as the BN says: ``relu(N(beta, gamma**2))`` per element."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(count, 8, 4, 4, generator=generator)
    beta = model.bn0.bias.detach()[None, :, None, None]
    gamma = model.bn0.weight.detach().abs()[None, :, None, None]
    return torch.relu(beta + gamma * noise)


def test_the_mean_output_shift_is_removed() -> None:
    model = _BnReluConv()
    x = _conv_inputs(model, 20_000)
    with torch.no_grad():
        want = model.conv(x).mean((0, 2, 3))
        plain = squant.quantize(model, 3).conv(x).mean((0, 2, 3))
        corrected = squant.quantize(model, 3, bias_correction=True).conv(x).mean((0, 2, 3))
    scale = model.conv(x).std().item()
    before, after = (plain - want).abs(), (corrected - want).abs()
    assert before.max() > 0.05 * scale  # the shift is there to remove...
    assert after.max() < 0.01 * scale  # ...and gone, up to sampling noise
    assert after.mean() < before.mean() / 5


def test_the_new_bias_is_the_shift_computed_by_hand() -> None:
    model = _BnReluConv()
    qmodel = squant.quantize(model, 4, bias_correction=True)
    mean, _ = ChannelGaussians.of_batchnorm(model.bn0).clamped(0.0, math.inf).moments()
    weight = model.conv.weight.detach().double().numpy()
    dequantized = qmodel.conv.dequantize_weight().double().numpy()
    error = (weight - dequantized).sum((2, 3))  # (16, 4): per output channel, its group's inputs
    group_means = mean.numpy().reshape(2, 4)[np.arange(16) // 8]
    want = (error * group_means).sum(1)
    assert model.conv.bias is None  # the input model is left alone
    assert isinstance(qmodel.conv.bias, nn.Parameter)
    np.testing.assert_allclose(qmodel.conv.bias.detach().numpy(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        expected_shift(model.conv.weight, qmodel.conv.dequantize_weight(), mean, 2),
        torch.from_numpy(want))


def test_only_layers_with_bn_inputs_change() -> None:
    model = _BnReluConv()
    plain = squant.quantize(model, 4)
    corrected = squant.quantize(model, 4, bias_correction=True)
    for name in ("stem", "fc"):  # image input; 64 features from 16 channels: no moments
        assert torch.equal(getattr(corrected, name).bias, getattr(plain, name).bias)
        assert torch.equal(getattr(corrected, name).bias, getattr(model, name).bias)
    for name in ("stem", "conv", "fc"):  # the codes are the same: only biases move
        assert torch.equal(getattr(corrected, name).codes, getattr(plain, name).codes)


def test_a_corrected_model_survives_save_load_and_dequantize(tmp_path: Path) -> None:
    model = _BnReluConv()
    qmodel = squant.quantize(model, 4, bias_correction=True)
    path = tmp_path / "q.safetensors"
    squant.save(qmodel, path)
    loaded = squant.load(path, model)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), qmodel(x), rtol=0, atol=0)
        torch.testing.assert_close(squant.dequantize(qmodel)(x), qmodel(x))
    assert model.conv.bias is None


def test_a_model_without_bn_inputs_warns_and_is_unchanged() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.warns(UserWarning, match="no bias was corrected"):
        corrected = squant.quantize(model, 4, bias_correction=True)
    plain = squant.quantize(model, 4)
    for index in (0, 2):
        assert torch.equal(corrected[index].bias, plain[index].bias)


def test_a_tied_bias_stays_tied() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.bn = nn.BatchNorm1d(6)
            nn.init.uniform_(self.bn.bias, 1.0, 2.0)
            self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)
            self.b.bias = self.a.bias
            self.eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn(x))
            return self.a(x) + self.b(x)

    model = Tied()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the layers have BN inputs: no "nothing corrected"
        qmodel = squant.quantize(model, 3, bias_correction=True)
    assert qmodel.a.bias is qmodel.b.bias
    assert torch.equal(qmodel.a.bias, model.a.bias)
