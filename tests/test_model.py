"""The whole-model driver: ``squant.quantize(model)`` and ``squant.dequantize(qmodel)`` on the
models of ``zoo.py``.

Expectations are computed here from ``squant.quantize_weight`` on each layer's original weight
(ConvTranspose: output channels on axis 1, one call per group block), never from the driver's
own helpers.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from itertools import chain

import pytest
import torch
from torch import fx, nn
from zoo import BY_NAME, SHARED_MODULE, ZOO, ZooModel

import squant
from squant import QuantizationReport
from squant import nn as qnn

FLOAT_TO_QUANTIZED = {
    nn.Linear: qnn.QuantizedLinear,
    nn.Conv1d: qnn.QuantizedConv1d,
    nn.Conv2d: qnn.QuantizedConv2d,
    nn.Conv3d: qnn.QuantizedConv3d,
    nn.ConvTranspose1d: qnn.QuantizedConvTranspose1d,
    nn.ConvTranspose2d: qnn.QuantizedConvTranspose2d,
    nn.ConvTranspose3d: qnn.QuantizedConvTranspose3d,
    nn.Embedding: qnn.QuantizedEmbedding,
    nn.EmbeddingBag: qnn.QuantizedEmbeddingBag,
}
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
QUANTIZED_TYPES = tuple(FLOAT_TO_QUANTIZED.values())

zoo_models = pytest.mark.parametrize("entry", ZOO, ids=lambda entry: entry.name)


@dataclass
class Expected:
    """What a layer's weight should quantize to: codes, scale, zero point, dequantized weight."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    weight: torch.Tensor


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every name (a module registered twice appears twice) of a supported float layer."""
    return {name: module for name, module in model.named_modules(remove_duplicate=False)
            if type(module) in FLOAT_TO_QUANTIZED}


def expected_quantization(layer: nn.Module, bits: int = 4, mode: str = "KC") -> Expected:
    """``quantize_weight`` of the layer's weight; ConvTranspose groups quantized one by one."""
    weight = layer.weight.detach()
    if isinstance(layer, TRANSPOSED):
        blocks = torch.tensor_split(weight, layer.groups, dim=0)
        parts = [squant.quantize_weight(block, bits, mode, axis=1) for block in blocks]
    else:
        parts = [squant.quantize_weight(weight, bits, mode, axis=0)]
    return Expected(codes=torch.cat([p.codes for p in parts]),
                    scale=torch.cat([p.scale for p in parts]),
                    zero_point=torch.cat([p.zero_point for p in parts]),
                    weight=torch.cat([p.dequantize() for p in parts]).to(weight.dtype))


def assert_quantized_as(qlayer: nn.Module, expected: Expected, name: str) -> None:
    """The quantized layer holds exactly the expected codes, grid and dequantized weight."""
    assert qlayer.codes.dtype == torch.int8, name
    assert torch.equal(qlayer.codes, expected.codes), name
    assert torch.equal(qlayer.scale, expected.scale), name
    assert torch.equal(qlayer.zero_point, expected.zero_point), name
    assert qlayer.weight.dtype == expected.weight.dtype, name
    assert torch.equal(qlayer.weight, expected.weight), name


def assert_layers_quantized(model: nn.Module, qmodel: nn.Module, bits_of: dict[str, int],
                            default_bits: int = 4, mode: str = "KC") -> None:
    """Every supported layer of ``model`` not in ``bits_of`` is quantized at ``default_bits``;
    those in ``bits_of`` at their bits."""
    for name, layer in quantizable_layers(model).items():
        bits = bits_of.get(name, default_bits)
        qlayer = qmodel.get_submodule(name)
        assert type(qlayer) is FLOAT_TO_QUANTIZED[type(layer)], name
        assert (qlayer.bits, qlayer.mode) == (bits, mode), name
        assert_quantized_as(qlayer, expected_quantization(layer, bits, mode), name)


def float_model_with_expected_weights(model: nn.Module, bits: int, mode: str) -> nn.Module:
    """A float copy of ``model`` whose supported layers hold their expected dequantized weight
    (as new, untied Parameters: a float layer tied to a quantized one keeps its float weight)."""
    reference = copy.deepcopy(model)
    for name, layer in quantizable_layers(reference).items():
        expected = expected_quantization(model.get_submodule(name), bits, mode)
        layer.weight = nn.Parameter(expected.weight, requires_grad=False)
    return reference


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``||actual - reference|| / ||reference||`` in float64."""
    reference = reference.detach().double()
    return float((actual.detach().double() - reference).norm() / reference.norm())


@dataclass
class Snapshot:
    """Everything observable of a model's state: module types, parameter and buffer objects
    with a copy of their values, and the state_dict values."""

    types: list[tuple[str, type]]
    tensors: list[tuple[str, torch.Tensor, torch.Tensor]]
    state: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module) -> Snapshot:
        """The snapshot of ``model`` now."""
        modules = model.named_modules(remove_duplicate=False)
        named = chain(model.named_parameters(remove_duplicate=False),
                      model.named_buffers(remove_duplicate=False))
        return cls(types=[(name, type(m)) for name, m in modules],
                   tensors=[(name, t, t.detach().clone()) for name, t in named],
                   state={k: v.detach().clone() for k, v in model.state_dict().items()})

    def assert_unchanged(self, model: nn.Module) -> None:
        """``model`` has the same modules, the same tensor objects and the same values."""
        assert Snapshot.of(model).types == self.types
        now = dict(chain(model.named_parameters(remove_duplicate=False),
                         model.named_buffers(remove_duplicate=False)))
        assert set(now) == {name for name, _, _ in self.tensors}
        for name, tensor, value in self.tensors:
            assert now[name] is tensor, name
            assert torch.equal(tensor.detach(), value), name
        state = model.state_dict()
        assert set(state) == set(self.state)
        for key, value in self.state.items():
            assert torch.equal(state[key], value), key


def module_class(module: nn.Module) -> type:
    """The module's class; ``GraphModule`` for every GraphModule (torch gives each instance,
    and so each copy, a class of its own)."""
    return fx.GraphModule if isinstance(module, fx.GraphModule) else type(module)


def module_classes(model: nn.Module) -> list[tuple[str, type]]:
    """Name and class of every module, duplicates included."""
    return [(name, module_class(m)) for name, m in model.named_modules(remove_duplicate=False)]


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers (not its children's)."""
    return dict(chain(module.named_parameters(recurse=False),
                      module.named_buffers(recurse=False)))


@zoo_models
@pytest.mark.parametrize(("bits", "mode"), [(4, "KC"), (3, "C")])
def test_quantized_layers_hold_quantize_weight_of_original_weight(
        entry: ZooModel, bits: int, mode: str) -> None:
    """Codes, scale, zero point and dequantized weight of every layer equal ``quantize_weight``
    of its original weight (ConvTranspose: axis 1, group by group)."""
    model = entry.build()
    assert_layers_quantized(model, squant.quantize(model, bits, mode), {}, bits, mode)


def expected_on_grid(layer: nn.Module, scheme: str, granularity: str) -> Expected:
    """4-bit KC ``quantize_weight`` on a grid. A grouped ConvTranspose's groups are stacked as
    the output channels of one ``(out, in/groups, k)`` weight, so that a per-tensor grid spans
    the whole layer while every channel keeps its own data."""
    weight = layer.weight.detach()
    if not isinstance(layer, TRANSPOSED):
        q = squant.quantize_weight(weight, 4, "KC", 0, scheme=scheme, granularity=granularity)
        return Expected(q.codes, q.scale, q.zero_point, q.dequantize().to(weight.dtype))
    groups, kernel = layer.groups, weight.shape[2:]
    blocks = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
    stacked = blocks.permute(0, 2, 1, 3).reshape(-1, weight.shape[0] // groups, blocks.shape[3])
    q = squant.quantize_weight(stacked, 4, "KC", 0, scheme=scheme, granularity=granularity)
    def back(t: torch.Tensor) -> torch.Tensor:
        grouped = t.reshape(groups, -1, weight.shape[0] // groups, blocks.shape[3])
        return grouped.permute(0, 2, 1, 3).reshape(weight.shape[0], weight.shape[1], *kernel)
    return Expected(back(q.codes), q.scale, q.zero_point,
                    back(q.dequantize()).to(weight.dtype))


@zoo_models
@pytest.mark.parametrize(("scheme", "granularity"), [
    ("symmetric", "channel"), ("symmetric", "tensor"), ("asymmetric", "tensor")])
def test_grid_options_reach_every_layer(entry: ZooModel, scheme: str, granularity: str) -> None:
    """Every layer is quantized on the grid asked for, exactly as ``quantize_weight`` does it;
    symmetric zero points are all 0 and a per-tensor grid has one scale per layer."""
    model = entry.build()
    qmodel = squant.quantize(model, 4, scheme=scheme, granularity=granularity)
    for name, layer in quantizable_layers(model).items():
        qlayer = qmodel.get_submodule(name)
        assert (qlayer.scheme, qlayer.granularity) == (scheme, granularity), name
        assert_quantized_as(qlayer, expected_on_grid(layer, scheme, granularity), name)
        if scheme == "symmetric":
            assert torch.count_nonzero(qlayer.zero_point) == 0, name
        if granularity == "tensor":
            assert torch.unique(qlayer.scale).numel() == 1, name


def test_layer_options_override_the_grid_of_matching_layers() -> None:
    """``layer_options`` sets a layer's grid and bits; the others keep the defaults."""
    model = BY_NAME["mobilenet"].build()
    qmodel = squant.quantize(model, 4, layer_options={"features.0": {"scheme": "symmetric",
                                                                     "bits": 8}})
    for name, layer in quantizable_layers(model).items():
        qlayer = qmodel.get_submodule(name)
        if name == "features.0":
            assert (qlayer.scheme, qlayer.bits) == ("symmetric", 8)
            q = squant.quantize_weight(layer.weight, 8, scheme="symmetric")
            assert torch.equal(qlayer.codes, q.codes)
        else:
            assert (qlayer.scheme, qlayer.bits) == ("asymmetric", 4), name
    with pytest.raises(squant.QuantizationError, match=r"unknown option\(s\) schem"):
        squant.quantize(model, 4, layer_options={"features.0": {"schem": "symmetric"}})
    with pytest.raises(squant.QuantizationError, match=r"layer_options pattern 'nope' matches no"):
        squant.quantize(model, 4, layer_options={"nope": {"bits": 8}})


@zoo_models
def test_supported_layers_replaced_and_other_modules_untouched(entry: ZooModel) -> None:
    """Each supported layer becomes its quantized class under every name; every other module
    keeps its class and its own parameters and buffers."""
    model = entry.build()
    qmodel = squant.quantize(model)
    assert module_class(qmodel) is module_class(model)
    for name, module in model.named_modules(remove_duplicate=False):
        qmodule = qmodel.get_submodule(name)
        if type(module) in FLOAT_TO_QUANTIZED:
            assert type(qmodule) is FLOAT_TO_QUANTIZED[type(module)], name
            continue
        assert module_class(qmodule) is module_class(module), name
        tensors, qtensors = own_tensors(module), own_tensors(qmodule)
        assert set(tensors) == set(qtensors), name
        for key, tensor in tensors.items():
            assert torch.equal(qtensors[key], tensor), f"{name}.{key}"


@zoo_models
def test_forward_equals_float_model_with_dequantized_weights(entry: ZooModel) -> None:
    """The quantized model computes what the float model computes with each layer's expected
    dequantized weight (hyper-parameters and biases carried over), with the right shape."""
    model, x = entry.build(), entry.example()
    qmodel = squant.quantize(model, 4, "KC")
    reference = float_model_with_expected_weights(model, 4, "KC")
    with torch.no_grad():
        out = qmodel(x)
        assert out.shape == model(x).shape
        torch.testing.assert_close(out, reference(x))


@zoo_models
def test_8_bit_output_close_to_float(entry: ZooModel) -> None:
    """At 8 bits the output is within 2% (relative L2) of FP32; not vacuously: the 8-bit
    output differs from FP32 and the 2-bit error is several times larger."""
    model, x = entry.build(), entry.example()
    with torch.no_grad():
        exact = model(x)
        error_8 = relative_error(squant.quantize(model, 8)(x), exact)
        error_2 = relative_error(squant.quantize(model, 2)(x), exact)
    assert 0 < error_8 < 0.02
    assert error_2 > 4 * error_8


@zoo_models
def test_input_model_is_unchanged(entry: ZooModel) -> None:
    """Quantizing (with a report), running the result and dequantizing it leave the input
    model's modules, tensor objects and values as they were."""
    model, x = entry.build(), entry.example()
    before = Snapshot.of(model)
    with torch.no_grad():
        qmodel = squant.quantize(model, 4, report=True)
        qmodel(x)
        squant.dequantize(qmodel)(x)
    before.assert_unchanged(model)


@pytest.mark.parametrize(("entry", "skip"), [
    *[pytest.param(entry, (), id=entry.name) for entry in ZOO],
    pytest.param(BY_NAME["tied_mlp"], ("decoder",), id="tied_mlp-skip-decoder"),
])
def test_changing_the_quantized_model_leaves_input_unchanged(
        entry: ZooModel, skip: tuple[str, ...]) -> None:
    """The copy shares no tensor with the input model: updating every float parameter and
    buffer of the quantized model in place (as training would) does not reach the input."""
    model = entry.build()
    before = Snapshot.of(model)
    qmodel = squant.quantize(model, skip=skip)
    with torch.no_grad():
        for tensor in chain(qmodel.parameters(), qmodel.buffers()):
            if tensor.is_floating_point():
                tensor.add_(1.0)
    before.assert_unchanged(model)


@zoo_models
def test_inplace_returns_the_input_model_quantized(entry: ZooModel) -> None:
    """``inplace=True`` returns the very model given, its layers replaced by the same
    quantization a copy would get."""
    model = entry.build()
    float_layers = quantizable_layers(model)
    qmodel = squant.quantize(model, inplace=True)
    assert qmodel is model
    for name, layer in float_layers.items():
        qlayer = model.get_submodule(name)
        assert type(qlayer) is FLOAT_TO_QUANTIZED[type(layer)], name
        assert_quantized_as(qlayer, expected_quantization(layer), name)


@pytest.mark.parametrize(("model_name", "skip", "skipped"), [
    ("resnet", ("stem.0", "*.shortcut.0"), {"stem.0", "block2.shortcut.0"}),
    ("fx_resnet", ("block?.conv1",), {"block1.conv1", "block2.conv1"}),
    ("containers", ("heads.*", "blocks.1"), {"heads.mean", "heads.scale", "blocks.1"}),
    ("decoder2d", ("up1",), {"up1"}),
    ("shared_module", ("again",), {"conv", "again", "tail.0"}),
])
def test_skip_leaves_named_and_matching_layers_float(
        model_name: str, skip: tuple[str, ...], skipped: set[str]) -> None:
    """Layers named in ``skip`` or matching a pattern keep their float class and weights (a
    module registered twice is skipped under both names); the others are quantized."""
    model = BY_NAME[model_name].build()
    qmodel = squant.quantize(model, skip=skip)
    for name in skipped:
        layer, qlayer = model.get_submodule(name), qmodel.get_submodule(name)
        assert type(qlayer) is type(layer), name
        assert torch.equal(qlayer.weight, layer.weight), name
        bias, qbias = getattr(layer, "bias", None), getattr(qlayer, "bias", None)
        assert (qbias is None) == (bias is None), name
        assert qbias is None or torch.equal(qbias, bias), name
    kept = {name: layer for name, layer in quantizable_layers(model).items()
            if name not in skipped}
    assert kept
    for name, layer in kept.items():
        assert_quantized_as(qmodel.get_submodule(name), expected_quantization(layer), name)


@pytest.mark.parametrize(("model_name", "layer_bits", "bits_of"), [
    ("resnet", {"block1.conv1": 2, "block1.*": 6, "fc": 8},
     {"block1.conv1": 2, "block1.conv2": 6, "fc": 8}),
    ("resnet", {"block1.*": 6, "block1.conv1": 2}, {"block1.conv1": 6, "block1.conv2": 6}),
    ("decoder2d", {"up*": 3}, {"up1": 3, "up2": 3}),
    ("containers", {"heads.scale": 8, "trunk.*": 2},
     {"heads.scale": 8, "trunk.0.0": 2, "trunk.1.0.0": 2}),
    ("tied_mlp", {"encoder": 8, "decoder": 8}, {"encoder": 8, "decoder": 8}),
    ("shared_module", {"again": 5}, {"conv": 5, "again": 5, "tail.0": 5}),
])
def test_layer_bits_set_bits_of_matching_layers_first_pattern_wins(
        model_name: str, layer_bits: dict[str, int], bits_of: dict[str, int]) -> None:
    """Layers matching a ``layer_bits`` pattern get the first matching pattern's bits, the
    others the default; codes stay in the asymmetric range of their bits."""
    model = BY_NAME[model_name].build()
    qmodel = squant.quantize(model, 4, layer_bits=layer_bits)
    assert_layers_quantized(model, qmodel, bits_of, 4)
    for name in quantizable_layers(model):
        half = 2 ** (bits_of.get(name, 4) - 1)
        codes = qmodel.get_submodule(name).codes
        assert -half <= int(codes.min()) and int(codes.max()) <= half - 1, name


@zoo_models
def test_state_dict_round_trip_restores_outputs_and_buffers(entry: ZooModel, tmp_path) -> None:
    """The state_dict holds int8 codes (no float weight) for every quantized layer; saved and
    loaded with ``weights_only=True`` into a model quantized differently (whose cached
    weights were already used), it restores the same buffers, weights and outputs."""
    model, x = entry.build(), entry.example()
    source = squant.quantize(model, 4, "KC")
    state = source.state_dict()
    quantized = [name for name, m in source.named_modules() if isinstance(m, QUANTIZED_TYPES)]
    for name in quantized:
        assert state[f"{name}.codes"].dtype == torch.int8, name
        assert f"{name}.weight" not in state, name
    torch.save(state, tmp_path / "quantized.pt")
    target = squant.quantize(model, 8, "E")
    with torch.no_grad():
        expected = source(x)
        assert not torch.equal(target(x), expected)
        target.load_state_dict(torch.load(tmp_path / "quantized.pt", weights_only=True))
        assert torch.equal(target(x), expected)
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key
    for name in quantized:
        assert torch.equal(target.get_submodule(name).weight, source.get_submodule(name).weight)


@zoo_models
def test_cache_weights_false_gives_identical_outputs(entry: ZooModel) -> None:
    """Without the cache the weight is recomputed at each use (a new tensor each time), with
    the cache it is kept; outputs are bit-identical."""
    model, x = entry.build(), entry.example()
    cached = squant.quantize(model, cache_weights=True)
    uncached = squant.quantize(model, cache_weights=False)
    with torch.no_grad():
        assert torch.equal(uncached(x), cached(x))
    for name in quantizable_layers(model):
        layer, qlayer = uncached.get_submodule(name), cached.get_submodule(name)
        assert layer.weight is not layer.weight, name
        assert qlayer.weight is qlayer.weight, name
        assert torch.equal(layer.weight, qlayer.weight), name


@zoo_models
def test_dequantize_gives_plain_float_model_of_original_classes(entry: ZooModel) -> None:
    """``dequantize`` puts back the exact original classes holding the dequantized weights and
    the biases, computes the same outputs, and leaves the quantized model quantized."""
    model, x = entry.build(), entry.example()
    qmodel = squant.quantize(model)
    plain = squant.dequantize(qmodel)
    assert not any(isinstance(m, squant.nn.QuantizedModule) for m in plain.modules())
    assert module_classes(plain) == module_classes(model)
    for name in quantizable_layers(model):
        layer, qlayer = plain.get_submodule(name), qmodel.get_submodule(name)
        assert isinstance(qlayer, QUANTIZED_TYPES), name
        assert torch.equal(layer.weight, qlayer.weight), name
        bias, qbias = getattr(layer, "bias", None), getattr(qlayer, "bias", None)
        assert (bias is None) == (qbias is None), name
        assert bias is None or torch.equal(bias, qbias), name
    with torch.no_grad():
        assert torch.equal(plain(x), qmodel(x))


def test_tied_weight_quantized_once_and_codes_shared() -> None:
    """Two Linear layers sharing one Parameter share one codes tensor (and grid) holding the
    quantization of that weight, and the report has one row for it."""
    model = BY_NAME["tied_mlp"].build()
    qmodel = squant.quantize(model, report=True)
    encoder, decoder = qmodel.encoder, qmodel.decoder
    assert encoder.codes.untyped_storage().data_ptr() == decoder.codes.untyped_storage().data_ptr()
    assert torch.equal(encoder.scale, decoder.scale)
    assert torch.equal(encoder.zero_point, decoder.zero_point)
    assert_quantized_as(encoder, expected_quantization(model.encoder), "encoder")
    assert len(qmodel.squant_report.layers) == 2


@pytest.mark.parametrize("inplace", [False, True])
def test_module_registered_twice_becomes_one_quantized_module(inplace: bool) -> None:
    """The same Conv2d under three names (two in one parent) is replaced by one quantized
    module under all of them, which computes the expected output; ``dequantize`` turns it
    back into one float Conv2d under all three."""
    model, x = SHARED_MODULE.build(), SHARED_MODULE.example()
    reference = float_model_with_expected_weights(model, 4, "KC")
    expected = expected_quantization(model.conv)
    qmodel = squant.quantize(model, inplace=inplace)
    for name in ("conv", "again", "tail.0"):
        assert qmodel.get_submodule(name) is qmodel.conv, name
    assert type(qmodel.conv) is qnn.QuantizedConv2d
    assert_quantized_as(qmodel.conv, expected, "conv")
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), reference(x))
    plain = squant.dequantize(qmodel)
    assert plain.conv is plain.again and plain.conv is plain.tail[0]
    assert type(plain.conv) is nn.Conv2d


def report_of(model: nn.Module, bits: int = 4, mode: str = "KC") -> QuantizationReport:
    """The report of quantizing ``model``."""
    report = squant.quantize(model, bits, mode, report=True).squant_report
    assert isinstance(report, QuantizationReport)
    return report


@zoo_models
def test_report_has_one_sensible_row_per_distinct_weight(entry: ZooModel) -> None:
    """One row per distinct weight Parameter with its kind, shape, bits and mode; SQuant's mean
    channel |error sum| is at most round-to-nearest's; the max weight error is the real one."""
    model = entry.build()
    qmodel = squant.quantize(model, 4, "KC", report=True)
    report = qmodel.squant_report
    layers = quantizable_layers(model)
    assert len(report.layers) == len({id(layer.weight) for layer in layers.values()})
    assert report.seconds > 0
    for row in report.layers:
        name = row.name.split(", ")[0]
        layer = layers[name]
        assert (row.kind, row.shape, row.bits, row.mode) == (
            type(layer).__name__, tuple(layer.weight.shape), 4, "KC")
        assert row.channel_sum_eq_mean > 0
        assert row.channel_sum_squant_mean <= row.channel_sum_eq_mean
        error = (qmodel.get_submodule(name).weight - layer.weight.detach()).abs().max()
        assert row.max_abs_weight_error == pytest.approx(float(error), rel=1e-4)
        assert row.seconds >= 0


@zoo_models
def test_report_table_and_json_name_every_quantized_layer(entry: ZooModel) -> None:
    """Every quantized layer (tied ones included) is named by a report row, appears in
    ``table()``, and ``to_json()`` parses to the same rows as ``to_dict()``."""
    model = entry.build()
    report = report_of(model)
    named = {name for row in report.layers for name in row.name.split(", ")}
    assert named == set(quantizable_layers(model))
    table = report.table()
    for name in quantizable_layers(model):
        assert name in table, name
    parsed = json.loads(report.to_json())
    assert parsed == json.loads(json.dumps(report.to_dict()))
    assert [layer["name"] for layer in parsed["layers"]] == [row.name for row in report.layers]


@pytest.mark.parametrize("model_name", ["resnet", "decoder2d", "transpose1d"])
def test_report_eq_statistics_are_those_of_mode_e(model_name: str) -> None:
    """The report's round-to-nearest (EQ) statistics under KC are the statistics of the codes
    that mode "E" produces, and under mode "E" the SQuant statistics equal the EQ ones."""
    model = BY_NAME[model_name].build()
    kc, e = report_of(model, 4, "KC"), report_of(model, 4, "E")
    for row_kc, row_e in zip(kc.layers, e.layers, strict=True):
        assert row_e.channel_sum_squant_mean == pytest.approx(row_e.channel_sum_eq_mean)
        assert row_e.kernel_sum_squant_max == pytest.approx(row_e.kernel_sum_eq_max)
        assert row_kc.channel_sum_eq_mean == pytest.approx(row_e.channel_sum_squant_mean)
        assert row_kc.kernel_sum_eq_mean == pytest.approx(row_e.kernel_sum_squant_mean)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 1}, r"bits must be in 2\.\.8, got 1"),
    ({"bits": 9}, r"bits must be in 2\.\.8, got 9"),
    ({"mode": "X"}, r"unknown mode 'X'"),
    ({"skip": ["nope*"]}, r"skip pattern 'nope\*' matches no quantizable layer"),
    ({"layer_bits": {"block3.*": 8}}, r"layer_bits pattern 'block3\.\*' matches no quantizable"),
    ({"layer_bits": {"fc": 9}}, r"layer_bits\['fc'\] must be in 2\.\.8, got 9"),
    ({"skip": ["*"]}, r"every layer is skipped"),
    ({"skip": ["stem.0", "block*", "fc"]}, r"every layer is skipped"),
])
def test_bad_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    """Out-of-range bits, an unknown mode, patterns matching nothing and skipping every layer
    are ``QuantizationError``s saying what is wrong."""
    with pytest.raises(squant.QuantizationError, match=message):
        squant.quantize(BY_NAME["resnet"].build(), **kwargs)


def test_model_with_nothing_to_quantize_raises() -> None:
    """A model without any supported layer is an error, not a silent no-op."""
    with pytest.raises(squant.QuantizationError, match=r"Sequential has no layer to quantize"):
        squant.quantize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


@pytest.mark.parametrize(("model_name", "layer", "index", "message"), [
    ("mobilenet", "features.0", (0, 0, 0, 0), r"layer 'features\.0' \(Conv2d\) weight.*NaN"),
    ("decoder2d", "up1", (3, 1, 0, 0), r"layer 'up1' \(ConvTranspose2d\) weight, group 1.*NaN"),
])
def test_nan_weight_error_names_the_layer(model_name: str, layer: str, index: tuple,
                                          message: str) -> None:
    """A NaN weight is reported with the layer's name (and group for a grouped ConvTranspose)."""
    model = BY_NAME[model_name].build()
    with torch.no_grad():
        model.get_submodule(layer).weight[index] = float("nan")
    with pytest.raises(squant.QuantizationError, match=message):
        squant.quantize(model)


@pytest.mark.parametrize("function", [squant.quantize, squant.dequantize])
def test_non_module_argument_is_a_type_error(function) -> None:
    """Passing a tensor instead of a model is a ``TypeError`` naming what was expected."""
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module, got Tensor"):
        function(torch.ones(3, 3))


def test_tied_weight_with_conflicting_layer_bits_raises() -> None:
    """One Parameter cannot be quantized at two bit widths: the error names both layers."""
    model = BY_NAME["tied_mlp"].build()
    with pytest.raises(squant.QuantizationError, match=r"'encoder' and 'decoder' share one weight"):
        squant.quantize(model, 4, layer_bits={"decoder": 8})


@zoo_models
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
def test_low_and_double_precision_models_quantize(entry: ZooModel, dtype: torch.dtype) -> None:
    """A half, bfloat16 or double model quantizes its weights as ``quantize_weight`` does,
    keeps its dtype for weights and outputs, and at 8 bits stays close to its float output."""
    model = entry.build().to(dtype)
    x = entry.example()
    x = x if entry.vocab else x.to(dtype)
    qmodel = squant.quantize(model, 8)
    for name, layer in quantizable_layers(model).items():
        qlayer = qmodel.get_submodule(name)
        assert qlayer.weight.dtype == dtype, name
        qbias = getattr(qlayer, "bias", None)
        assert qbias is None or qbias.dtype == dtype, name
        assert_quantized_as(qlayer, expected_quantization(layer, 8), name)
    with torch.no_grad():
        out, exact = qmodel(x), model(x)
    assert out.dtype == dtype
    assert relative_error(out, exact) < 0.03


def test_the_cached_weight_follows_the_codes_memory_layout() -> None:
    """After ``.to(memory_format=torch.channels_last)`` the dequantized weight is channels-last
    too (a conv then converts no activations), with the same values."""
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2),
                         nn.Conv2d(8, 8, 3, groups=8))  # (O, 1, k, k): an ambiguous layout
    plain = squant.quantize(conv, 4)
    last = squant.quantize(conv, 4).to(memory_format=torch.channels_last)
    for a, b in zip(plain, last):
        assert b.codes.is_contiguous(memory_format=torch.channels_last)
        assert b.weight.stride() == b.codes.stride()  # the very strides, not just "contiguous"
        assert torch.equal(a.weight, b.weight)
    x = torch.randn(2, 3, 11, 11)
    assert torch.allclose(plain(x), last(x.contiguous(memory_format=torch.channels_last)),
                          atol=1e-5)


def test_a_forward_under_inference_mode_then_one_with_autograd() -> None:
    """The weight cached by a forward under ``torch.inference_mode()`` is no inference tensor:
    a later forward that autograd records (and its backward) works, with the same output."""
    qmodel = squant.quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                           nn.Linear(4 * 6 * 6, 2)), 4)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        first = qmodel(x)
    leaf = x.clone().requires_grad_()
    again = qmodel(leaf)
    again.sum().backward()
    assert leaf.grad is not None and torch.equal(again.detach(), first)


def test_quantizing_a_quantized_model_says_so() -> None:
    qmodel = squant.quantize(nn.Sequential(nn.Linear(4, 3)), 4)
    with pytest.raises(squant.QuantizationError, match="is already quantized"):
        squant.quantize(qmodel, 4)
    squant.quantize(squant.dequantize(qmodel), 4)  # the way the message points to


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_scripting_says_what_works_instead() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    qmodel = squant.quantize(model, 4)
    before = [type(m) for m in qmodel.modules()]
    with pytest.raises(squant.QuantizationError, match=r"torch.jit.trace\(qmodel"):
        torch.jit.script(qmodel)
    assert [type(m) for m in qmodel.modules()] == before
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(torch.jit.trace(qmodel, x)(x), qmodel(x))  # what the message offers
    scripted = torch.jit.script(squant.dequantize(qmodel))
    assert torch.allclose(scripted(x), qmodel(x), atol=1e-6)


class _PlainSubclass(nn.Linear):
    """A Linear subclass that keeps Linear's forward: quantized as a Linear."""


class _OwnForward(nn.Linear):
    """A Linear subclass with a forward of its own: left float, with a warning."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_subclasses_are_matched_by_their_registered_base() -> None:
    model = nn.Sequential(_PlainSubclass(6, 5), nn.ReLU(), _OwnForward(5, 4), nn.Linear(4, 3))
    x = torch.randn(7, 6)
    with pytest.warns(UserWarning, match=r"left in float: 2.weight \(_OwnForward, a Linear sub"):
        qmodel = squant.quantize(model, 8)
    assert isinstance(qmodel[0], squant.nn.QuantizedLinear)
    assert type(qmodel[2]) is _OwnForward and isinstance(qmodel[3], squant.nn.QuantizedLinear)
    assert torch.allclose(qmodel(x), model(x), rtol=0.05, atol=0.02)
    assert type(squant.dequantize(qmodel)[0]) is _PlainSubclass


def test_attention_output_projections_are_quantized() -> None:
    """``nn.MultiheadAttention.out_proj`` is a Linear subclass with Linear's forward."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                       batch_first=True).eval()
    qlayer = squant.quantize(layer, 8)
    assert isinstance(qlayer.self_attn.out_proj, squant.nn.QuantizedLinear)
    assert isinstance(qlayer.linear1, squant.nn.QuantizedLinear)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(qlayer(x), layer(x), atol=0.05)


def test_a_state_dict_with_codes_outside_the_layers_bits_is_refused() -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    eight = squant.quantize(model, 8).state_dict()
    four = squant.quantize(model, 4)
    before = {k: v.clone() for k, v in four.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"0\.codes hold values in -?\d+\.\.\d+, outside the "
                                           r"4-bit asymmetric range -8\.\.7"):
        four.load_state_dict(eight)
    assert torch.equal(four[0].codes, before["0.codes"])  # the refused layer is as it was
    squant.quantize(model, 8).load_state_dict(eight)
    symmetric = squant.quantize(model, 4, scheme="symmetric")
    with pytest.raises(RuntimeError, match="4-bit symmetric range -7..7"):
        symmetric.load_state_dict(four.state_dict() | {"0.codes": torch.full((8, 16), -8,
                                                                            dtype=torch.int8)})


class _Mixed(nn.Module):
    """Layers squant quantizes, and weights it cannot: each left one must be named."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(30, 8)
        self.rnn = nn.GRU(8, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 8)
        self.normed = nn.utils.parametrizations.weight_norm(nn.GRU(8, 8), "weight_hh_l0")
        self.head = nn.Linear(8, 30)
        self.raw = nn.Parameter(torch.randn(3, 8))
        self.register_buffer("table", torch.randn(2, 2))
        self.register_buffer("steps", torch.zeros(4, 4, dtype=torch.int64))  # not floating


def quantized_tensor_names(qmodel: nn.Module) -> set[str]:
    """The state_dict names of the float tensors the quantized layers stand for."""
    names = set()
    for name, module in qmodel.named_modules():
        if isinstance(module, squant.nn.QuantizedModule):
            names.add(f"{name}.weight" if name else "weight")
        elif isinstance(module, squant.nn.QuantizedWeight):
            names.add(name)
    return names


def test_every_float_matrix_left_is_listed_once_with_its_reason() -> None:
    with pytest.warns(UserWarning, match="left in float") as caught:
        qmodel = squant.quantize(_Mixed(), 4, skip="head", report=True)
    left = dict(qmodel.squant_report.left_float)
    state = qmodel.state_dict()
    expected = {k for k, v in state.items() if v.is_floating_point() and v.dim() >= 2}
    quantized = quantized_tensor_names(qmodel)
    assert {"wte.weight", "attn.in_proj_weight", "attn.out_proj.weight", "rnn.weight_ih_l0",
            "rnn.weight_hh_l0", "fc.weight"} == quantized
    assert set(left) == expected  # every float matrix left: listed
    assert left["head.weight"] == "skipped" and left["raw"].startswith("_Mixed")
    assert "computed weight" in left["normed.parametrizations.weight_hh_l0.original1"]
    messages = [str(w.message) for w in caught if "left in float" in str(w.message)]
    assert len(messages) == 1 and "head.weight" not in messages[0]  # asked for: no warning
    assert "left in float: raw (_Mixed" in qmodel.squant_report.table()
    assert {"name": "table", "reason": left["table"]} in qmodel.squant_report.to_dict()[
        "left_float"]


def test_quantized_tensor_to_a_device() -> None:
    qtensor = squant.quantize_weight(torch.randn(4, 3), 4)
    assert qtensor.to("cpu") is qtensor
    meta = qtensor.to("meta")
    assert meta.codes.is_meta and meta.scale.is_meta and meta.zero_point.is_meta
    assert (meta.bits, meta.axis, meta.scheme) == (qtensor.bits, qtensor.axis, qtensor.scheme)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_cuda_stays_there_with_the_cpu_codes() -> None:
    entry = BY_NAME["tied_mlp"]
    model = entry.build()
    on_cpu = squant.quantize(model, 4)
    on_cuda = squant.quantize(model.cuda(), 4)
    for (name, a), (_, b) in zip(on_cpu.named_buffers(), on_cuda.named_buffers()):
        assert b.is_cuda and torch.equal(a, b.cpu()), name
    x = entry.example()
    assert torch.allclose(on_cuda(x.cuda()).cpu(), on_cpu(x), atol=1e-5)
    codes = [m.codes for m in on_cuda.modules() if isinstance(m, squant.nn.QuantizedModule)]
    assert len({c.data_ptr() for c in codes}) < len(codes)  # tied layers still share codes


def test_patterns_that_name_a_container_cover_the_layers_inside() -> None:
    """torchvision-style names: ``"features.0"`` is a container, ``"fc"`` a top-level layer."""
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
                               nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1))),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 2)))
    qmodel = squant.quantize(model, 4, skip=["features.0", "fc"], layer_bits={"features.1": 8},
                             report=True)
    assert type(qmodel.features[0][0]) is nn.Conv2d and type(qmodel.fc) is nn.Linear
    assert [m.bits for m in qmodel.features[1]] == [8, 8]
    assert dict(qmodel.squant_report.left_float)["features.0.0.weight"] == "skipped"
    with pytest.raises(squant.QuantizationError, match="'features.9' matches no"):
        squant.quantize(model, 4, skip="features.9")
    assert squant.quantize(model, 4, skip="feat*").fc.bits == 4  # fnmatch on ancestors too


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "hook_weight_norm",
                                  "hook_spectral_norm"])
def test_norm_wrapped_layers_quantize_their_effective_weight(wrap: str, tmp_path) -> None:
    """A layer whose weight is computed (parametrizations, the old hooks) is replaced by the
    plain quantized layer holding quantize_weight of its effective (eval-mode) weight; the
    report says so; the input model is unchanged; save/load into the wrapped model works."""
    from torch.nn.utils import parametrizations, spectral_norm, weight_norm

    def build() -> nn.Module:
        torch.manual_seed(0)
        wrapped = {"weight_norm": parametrizations.weight_norm,
                   "spectral_norm": parametrizations.spectral_norm,
                   "hook_weight_norm": weight_norm,
                   "hook_spectral_norm": spectral_norm}[wrap](nn.Linear(6, 5))
        return nn.Sequential(wrapped, nn.ReLU(), nn.Linear(5, 3))

    model = build().eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = model(x)  # a hook sets .weight before the forward: the effective weight
        effective = model[0].weight.detach().clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        qmodel = squant.quantize(model.train(), 8, report=True)  # train: no power iteration
    model.eval()
    assert type(qmodel[0]) is squant.nn.QuantizedLinear and not qmodel[0]._forward_pre_hooks
    want = squant.quantize_weight(effective, 8)
    assert torch.equal(qmodel[0].codes, want.codes)
    row = qmodel.squant_report.layers[0]
    assert row.kind.startswith("Linear (effective weight of ") and "norm" in row.kind
    assert qmodel.squant_report.left_float == []
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before)  # the input model is unchanged
    with torch.no_grad():
        assert torch.allclose(qmodel(x), expected, rtol=0.02, atol=0.02 * expected.abs().max())
        assert torch.equal(model(x), expected)
    assert type(squant.dequantize(qmodel)[0]) is nn.Linear
    path = tmp_path / "normed.safetensors"
    squant.save(qmodel, path)
    loaded = squant.load(path, build().eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
