"""Data-free activation quantization (``act_bits``): the paper's range rule, where it applies,
and how the ranges survive state_dict, save and load.

Expected ranges are recomputed here, in float64 from the spec's formulas, on the exact tensor
each layer received (captured with forward pre-hooks), never with squant's own helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from zoo import ZOO, ZooModel

import squant
from squant.core.fake_quant import fake_quantize
from squant.ranges.activations import paper_range

SHAPE = (4,)
ACT_KEYS = ("act_lo", "act_hi", "act_bits")


def mlp(seed: int = 0) -> nn.Sequential:
    """Linear -> ReLU -> Linear -> Linear: the second layer's input is unsigned (after ReLU),
    the third's signed (after a plain Linear)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Linear(5, 3)).eval()


def reference_range(x: torch.Tensor, bits: int, sigma: float) -> tuple[float, float]:
    """The spec's rule, in float64."""
    x = x.detach().double().flatten().numpy()
    signed = x.min() < 0
    values = x if signed else x[x > 0]
    alpha = sigma * values.std(ddof=1) / (1.25 if signed else 1.0)
    if bits < 6:
        alpha = min(alpha, x.max())
    return (-alpha, alpha) if signed else (0.0, alpha)


def reference_fake_quantize(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """The spec's fake quantizer, in float64."""
    n = 2 ** (bits - 1)
    scale = (2**bits - 1) / max(hi - lo, 1e-8)
    zp = np.round(scale * lo) + (n if lo < 0 else 0)
    low, high = (-n, n - 1) if lo < 0 else (0, 2 * n - 1)
    q = np.clip(np.round(scale * x - zp), low, high)
    return (q + zp) / scale


def calibration_batch(shape: tuple[int, ...] = SHAPE, batch: int = 256, seed: int = 0
                      ) -> torch.Tensor:
    return torch.rand((batch, *shape), generator=torch.Generator().manual_seed(seed))


def layer_inputs(qmodel: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each quantized layer receives (before its own fake quantization)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_pre_hook(
                   lambda m, args, name=name: seen.setdefault(name, args[0].detach().clone()))
               for name, module in qmodel.named_modules()
               if isinstance(module, squant.nn.QuantizedModule)]
    with torch.no_grad():
        qmodel(inputs)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("act_bits", [3, 4, 6, 8])
def test_each_range_is_the_paper_rule_on_the_input_the_layer_received(act_bits: int) -> None:
    """The calibration batch run again through the calibrated model feeds every layer what it
    received during calibration (earlier ranges are fixed): each range is the rule on it."""
    qmodel = squant.quantize(mlp(), 4, act_bits=act_bits, input_shape=SHAPE)
    inputs = layer_inputs(qmodel, calibration_batch())
    for name, bits in (("2", act_bits), ("3", 8)):
        module = qmodel.get_submodule(name)
        assert int(module.act_bits) == bits
        sigma = 12 if bits <= 4 else 14 if bits <= 6 else 25
        lo, hi = reference_range(inputs[name], bits, sigma)
        assert float(module.act_lo) == pytest.approx(lo, rel=1e-5, abs=1e-7)
        assert float(module.act_hi) == pytest.approx(hi, rel=1e-5)


def test_first_layer_keeps_a_float_input_and_the_last_uses_8_bits() -> None:
    qmodel = squant.quantize(mlp(), 4, act_bits=3, input_shape=SHAPE)
    assert not any(hasattr(qmodel[0], key) for key in ACT_KEYS)
    assert int(qmodel[2].act_bits) == 3
    assert int(qmodel[3].act_bits) == 8


def test_signed_after_linear_unsigned_after_relu() -> None:
    qmodel = squant.quantize(mlp(), 4, act_bits=4, input_shape=SHAPE)
    inputs = layer_inputs(qmodel, calibration_batch())
    assert inputs["2"].min() >= 0 and float(qmodel[2].act_lo) == 0
    assert inputs["3"].min() < 0
    assert float(qmodel[3].act_lo) < 0
    assert float(qmodel[3].act_lo) == pytest.approx(-float(qmodel[3].act_hi))


def test_below_6_bits_the_range_is_clipped_to_the_input_max() -> None:
    """With sigma 12 the unbounded rule would pass max(x); 4 bits clips it, 6 bits does not."""
    sigma = 12.0
    clipped = squant.quantize(mlp(), 4, act_bits=4, input_shape=SHAPE, sigma=sigma)
    free = squant.quantize(mlp(), 4, act_bits=6, input_shape=SHAPE, sigma=sigma)
    x = layer_inputs(clipped, calibration_batch())["2"]
    unclipped = sigma * x[x > 0].double().std().item()
    assert unclipped > x.max().item()  # the premise: the clip matters here
    assert float(clipped[2].act_hi) == pytest.approx(x.max().item(), rel=1e-6)
    assert float(free[2].act_hi) == pytest.approx(unclipped, rel=1e-5)


@pytest.mark.parametrize("bits", [3, 5, 7])
@pytest.mark.parametrize("shift", [0.0, -0.5])
def test_paper_range_is_the_rule_with_the_default_sigma_by_bits(bits: int, shift: float) -> None:
    x = torch.relu(torch.randn(500, generator=torch.Generator().manual_seed(bits))) + shift
    lo, hi = paper_range(x, bits)
    expected = reference_range(x, bits, {3: 12, 5: 14, 7: 25}[bits])
    assert (float(lo), float(hi)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("lo, hi", [(0.0, 1.5), (-0.7, 0.7), (-0.3, 1.1)])
def test_fake_quantize_is_the_spec_formula(bits: int, lo: float, hi: float) -> None:
    x = torch.linspace(-2, 2, 1001)
    got = fake_quantize(x, torch.tensor(lo), torch.tensor(hi), bits)
    expected = reference_fake_quantize(x.double().numpy(), lo, hi, bits)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert len(torch.unique(got)) <= 2**bits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("lo, hi", [(0.0, 1.5), (-0.7, 0.7), (-0.3, 1.1)])
def test_fake_quantize_gives_the_same_bits_with_and_without_autograd(
        bits: int, dtype: torch.dtype, lo: float, hi: float) -> None:
    """Inference runs the operations in place, autograd out of place: the same bits; the
    input is never modified."""
    x = torch.randn(3, 257, generator=torch.Generator().manual_seed(bits)).to(dtype) * 1.3
    before = x.clone()
    inference = fake_quantize(x, torch.tensor(lo), torch.tensor(hi), bits)
    assert torch.equal(x, before)
    with_grad = fake_quantize(x.clone().requires_grad_(), torch.tensor(lo), torch.tensor(hi),
                              bits)
    assert with_grad.requires_grad and with_grad.dtype == inference.dtype == dtype
    assert torch.equal(with_grad.detach(), inference)


@pytest.mark.parametrize("act_bits", [2, 4])
def test_a_layer_computes_on_its_quantized_input(act_bits: int) -> None:
    """The layer's output is the float layer on an input with at most 2**bits values."""
    qmodel = squant.quantize(mlp(), 4, act_bits=act_bits, input_shape=SHAPE)
    x = layer_inputs(qmodel, calibration_batch(seed=5))["2"]
    layer = qmodel[2]
    quantized = torch.from_numpy(reference_fake_quantize(
        x.double().numpy(), float(layer.act_lo), float(layer.act_hi), act_bits)).float()
    assert len(torch.unique(quantized)) <= 2**act_bits
    with torch.no_grad():
        got = layer(x)
        expected = nn.functional.linear(quantized, layer.weight, layer.bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_ranges_are_fixed_after_calibration() -> None:
    qmodel = squant.quantize(mlp(), 4, act_bits=4, input_shape=SHAPE)
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if k.endswith(ACT_KEYS)}
    with torch.no_grad():
        qmodel(10 * torch.randn(8, *SHAPE))
    after = {k: v for k, v in qmodel.state_dict().items() if k.endswith(ACT_KEYS)}
    assert before.keys() == after.keys() and len(before) == 6
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_the_input_model_is_unchanged_and_gradients_flow() -> None:
    model = mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = squant.quantize(model, 4, act_bits=4, input_shape=SHAPE)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    qmodel(torch.rand(2, *SHAPE)).sum().backward()  # nothing cached under inference_mode


def test_without_act_bits_modules_have_no_activation_state() -> None:
    qmodel = squant.quantize(mlp(), 4)
    assert not any(key.endswith(ACT_KEYS) for key in qmodel.state_dict())
    assert not any(getattr(m, "act_enabled", False) for m in qmodel.modules())


@pytest.mark.parametrize("kwargs, message", [
    ({"act_bits": 1, "input_shape": SHAPE}, "act_bits must be in 2..8"),
    ({"act_bits": 9, "input_shape": SHAPE}, "act_bits must be in 2..8"),
    ({"act_bits": 4}, "needs input_shape"),
    ({"act_bits": 4, "input_shape": (5,)}, r"calibration batch of shape \(256, 5\) does not run"),
    ({"act_bits": 4, "input_shape": SHAPE, "act_range": "entropy"}, "unknown act_range .entropy."),
    ({"act_bits": 4, "input_shape": SHAPE, "act_range": "minmax"},
     "act_range='minmax' sets the ranges from real inputs: give calibration_data"),
    ({"act_bits": 4, "input_shape": SHAPE, "sigma": -1.0}, "sigma must be a positive"),
    ({"act_bits": 4, "input_shape": (0,)}, "input_shape must be"),
])
def test_bad_activation_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(squant.QuantizationError, match=message):
        squant.quantize(mlp(), 4, **kwargs)


def test_act_bits_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="act_bits must be an int"):
        squant.quantize(mlp(), 4, act_bits=4.0, input_shape=SHAPE)


@pytest.mark.parametrize("keywords", [
    {"act_bits": 4, "input_shape": SHAPE},
    {"act_bits": 3, "input_shape": [4], "act_range": "bn", "sigma": 9.0, "calibration_batch": 32,
     "seed": 5},
])
def test_activation_options_object_is_the_keywords(keywords: dict) -> None:
    """``activations=ActivationOptions(...)`` gives the same model, buffer for buffer."""
    options = squant.ActivationOptions(
        keywords["act_bits"], keywords["input_shape"], keywords.get("act_range", "paper"),
        keywords.get("sigma"), keywords.get("calibration_batch", 256), keywords.get("seed", 0))
    by_object = squant.quantize(mlp(), 4, activations=options).state_dict()
    by_keywords = squant.quantize(mlp(), 4, **keywords).state_dict()
    assert by_object.keys() == by_keywords.keys()
    for key, value in by_object.items():
        assert torch.equal(value, by_keywords[key]), key
    assert options.input_shape == tuple(keywords["input_shape"])


@pytest.mark.parametrize("kwargs, message", [
    ({"activations": squant.ActivationOptions(4, SHAPE), "act_bits": 4},
     "either as activations=ActivationOptions.* or as keywords, not both.*act_bits"),
    ({"activations": squant.ActivationOptions(4, SHAPE), "seed": 1}, "not both.*seed"),
    ({"input_shape": SHAPE, "act_range": "bn"}, "input_shape, act_range only apply with act_bits"),
])
def test_activation_options_are_given_one_way(kwargs: dict, message: str) -> None:
    with pytest.raises(squant.QuantizationError, match=message):
        squant.quantize(mlp(), 4, **kwargs)


def test_activations_must_be_activation_options() -> None:
    with pytest.raises(TypeError, match="activations must be a squant.ActivationOptions"):
        squant.quantize(mlp(), 4, activations={"bits": 4})


def test_activation_options_are_frozen_and_checked() -> None:
    options = squant.ActivationOptions(8, (3, 4))
    with pytest.raises(AttributeError):
        options.bits = 4
    with pytest.raises(squant.QuantizationError, match="calibration_batch must be a positive"):
        squant.ActivationOptions(8, (3, 4), calibration_batch=0)
    with pytest.raises(squant.QuantizationError, match="seed must be an int"):
        squant.ActivationOptions(8, (3, 4), seed=1.5)


def test_state_dict_round_trip_restores_the_ranges() -> None:
    """Another calibration seed gives other ranges; loading the state_dict restores outputs."""
    source = squant.quantize(mlp(), 4, act_bits=4, input_shape=SHAPE, seed=0)
    target = squant.quantize(mlp(), 4, act_bits=4, input_shape=SHAPE, seed=1)
    x = torch.rand(16, *SHAPE)
    assert not torch.equal(source(x), target(x))
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_save_and_load_keep_the_ranges(tmp_path) -> None:
    qmodel = squant.quantize(mlp(), 4, act_bits=4, input_shape=SHAPE)
    squant.save(qmodel, tmp_path / "q.safetensors")
    loaded = squant.load(tmp_path / "q.safetensors", mlp())
    x = torch.rand(16, *SHAPE)
    torch.testing.assert_close(loaded(x), qmodel(x), rtol=0, atol=0)
    for name in ("2", "3"):
        for key in ACT_KEYS:
            assert torch.equal(getattr(loaded[int(name)], key), getattr(qmodel[int(name)], key))
    assert not loaded[0].act_enabled


def test_a_weight_only_file_loads_without_activation_state(tmp_path) -> None:
    squant.save(squant.quantize(mlp(), 4), tmp_path / "w.safetensors")
    loaded = squant.load(tmp_path / "w.safetensors", mlp())
    assert not any(getattr(m, "act_enabled", False) for m in loaded.modules())


def test_report_gives_each_layer_its_activation_range() -> None:
    qmodel = squant.quantize(mlp(), 4, act_bits=4, input_shape=SHAPE, report=True)
    rows = {row.name: row for row in qmodel.squant_report.layers}
    assert (rows["0"].act_bits, rows["0"].act_lo, rows["0"].act_hi) == (None, None, None)
    for name in ("2", "3"):
        module = qmodel.get_submodule(name)
        assert rows[name].act_bits == int(module.act_bits)
        assert rows[name].act_lo == float(module.act_lo)
        assert rows[name].act_hi == float(module.act_hi)
    assert "A8" in qmodel.squant_report.table()


def test_conv_transpose_keeps_its_output_size_argument() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ConvTranspose2d(4, 2, 3, stride=2)).eval()
    qmodel = squant.quantize(model, 8, act_bits=8, input_shape=(2, 6, 6))
    layer = qmodel[1]
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        out = layer(x, output_size=[10, 10])
        expected = nn.functional.conv_transpose2d(
            fake_quantize(x, layer.act_lo, layer.act_hi, 8), layer.weight, layer.bias, 2,
            output_padding=1)
    assert out.shape[-2:] == (10, 10)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("entry", [e for e in ZOO if not e.vocab], ids=lambda e: e.name)
def test_every_zoo_model_calibrates_and_stays_close_at_8_bits(entry: ZooModel) -> None:
    """W8A8 on every kind of layer and container: every quantized layer but the first gets a
    finite range, and the output stays near the float model's."""
    model = entry.build()
    qmodel = squant.quantize(model, 8, act_bits=8, input_shape=entry.input_shape[1:],
                             calibration_batch=32)
    layers = [m for m in qmodel.modules() if isinstance(m, squant.nn.QuantizedModule)]
    assert not layers[0].act_enabled
    for layer in layers[1:]:
        assert torch.isfinite(layer.act_lo) and torch.isfinite(layer.act_hi)
    x = torch.rand(entry.input_shape)
    with torch.no_grad():
        expected, got = model(x), qmodel(x)
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max() + 1e-3
