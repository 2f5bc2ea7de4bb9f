"""squant.export_onnx: the file holds squant's codes, onnxruntime runs them as integer kernels,
and its outputs agree with the PyTorch quantized model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import squant

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import numpy_helper  # noqa: E402
from test_properties import assert_same_bits  # noqa: E402

from squant.export.nbits import matmul_nbits_weight  # noqa: E402
from squant.export.qdq import activation_grid  # noqa: E402
from squant.export.weights import weight_codes  # noqa: E402


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(y) + x)
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self, dim: int = 48) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def run(path, *inputs: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), squant.onnx_session_options(path),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]


def stored_codes(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_weight_only_cnn_is_the_dequantized_model(cnn, tmp_path, bits):
    qmodel = squant.quantize(cnn, bits)
    x = torch.rand(5, 3, 12, 12)
    report = squant.export_onnx(qmodel, tmp_path / "m.onnx", x[:2], accuracy_level=0)
    with torch.no_grad():
        expected = qmodel(x).numpy()
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), expected, rtol=1e-4, atol=1e-5)
    # the session options fold the weights once at load, not at every run
    assert report.session_config == {"session.disable_quant_qdq": "1"}
    assert "DequantizeLinear" not in report.optimized_ops
    assert [layer.name for layer in report.layers] == ["conv1", "conv2", "conv3", "fc"]
    initializers = stored_codes(tmp_path / "m.onnx")
    for name, module in qmodel.named_modules():
        if isinstance(module, squant.nn.QuantizedConv2d):
            codes = weight_codes(name, module)
            assert np.array_equal(initializers[f"{name}.weight_quantized"], codes.codes)
            # the runtime's weight is squant's, bit for bit (both multiply by fl32(1 / S))
            assert_same_bits(runtime_dequantized(codes), module.dequantize_weight().numpy())


def runtime_dequantized(codes) -> np.ndarray:
    """onnxruntime's own ``DequantizeLinear`` of a layer's stored codes, scale and zero point."""
    scale, zero, attributes = codes.onnx_params()
    tensors = [numpy_helper.from_array(array, name)
               for array, name in ((codes.codes, "q"), (scale, "s"), (zero, "zp"))]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"], **attributes)],
        "dequantize", [], [onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None)],
        tensors)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


@pytest.mark.parametrize(("bits", "scheme", "group_size"),
                         [(2, "asymmetric", None), (5, "symmetric", None),
                          (7, "asymmetric", None), (8, "symmetric", None), (4, "asymmetric", 18),
                          (8, "asymmetric", 18)])
def test_the_runtimes_dequantized_weights_are_squants_bit_for_bit(tmp_path, bits, scheme,
                                                                  group_size):
    """Every stored weight (zero point folded into the codes up to 6 bits, ``-Z`` above;
    blocked for group-wise grids) dequantizes in onnxruntime to ``qmodel``'s weight exactly,
    the widened channels of a > 6-bit grid excepted (re-quantized, with a warning)."""
    torch.manual_seed(bits)
    # group_size 18: two groups of the 3x3 conv's 36 weights a channel, one short of the 1x1's 16
    model = nn.Sequential(nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 1))
    with torch.no_grad():
        for conv in model[::2]:
            conv.weight.mul_(torch.logspace(-3, 2, conv.weight.shape[0]).view(-1, 1, 1, 1))
    qmodel = squant.quantize(model, bits, scheme=scheme, group_size=group_size,
                             include_zero=True)
    for name, module in qmodel.named_modules():
        if isinstance(module, squant.nn.QuantizedConv2d):
            codes = weight_codes(name, module)
            assert codes.widened == 0
            assert_same_bits(runtime_dequantized(codes), module.dequantize_weight().numpy())


def test_file_is_smaller_and_batch_is_dynamic(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3)).eval()
    qmodel = squant.quantize(model, 4)
    squant.export_onnx(qmodel, tmp_path / "q.onnx", torch.rand(1, 3, 12, 12))
    for batch in (1, 3):
        assert run(tmp_path / "q.onnx", torch.rand(batch, 3, 12, 12)).shape[0] == batch
    torch.onnx.export(model, (torch.rand(2, 3, 12, 12),), str(tmp_path / "f.onnx"),
                      dynamo=True, external_data=False, verbose=False)
    # int8 containers for the codes: a quarter of float32, plus per-channel scales
    assert (tmp_path / "q.onnx").stat().st_size < 0.3 * (tmp_path / "f.onnx").stat().st_size


def _metadata_keys(model) -> set[str]:
    graph = model.graph
    owners = [*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer]
    return {prop.key for owner in owners for prop in owner.metadata_props}


def test_exporter_debug_metadata_is_dropped_and_squants_kept(cnn, tmp_path):
    example = torch.rand(2, 3, 8, 8)
    squant.export_onnx(squant.quantize(cnn, 4, act_bits=8, input_shape=(3, 8, 8)),
                       tmp_path / "q.onnx", example)
    torch.onnx.export(cnn, (example,), str(tmp_path / "f.onnx"), dynamo=True,
                      external_data=False, verbose=False)
    exported = _metadata_keys(onnx.load(str(tmp_path / "f.onnx")))
    assert any(key.startswith("pkg.torch.") for key in exported)  # what there is to drop
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert not {key for key in _metadata_keys(model)
                if key.startswith(("pkg.torch.", "pkg.onnxscript.")) or key == "namespace"}
    assert {prop.key for prop in model.metadata_props} >= {"squant.producer",
                                                            "squant.session_config"}


def test_quantized_biases_use_dequantize_default_zero_point(cnn, tmp_path):
    example = torch.rand(2, 3, 8, 8)
    qmodel = squant.quantize(cnn, 4, act_bits=8, input_shape=(3, 8, 8))
    report = squant.export_onnx(qmodel, tmp_path / "q.onnx", example)
    model = onnx.load(str(tmp_path / "q.onnx"))
    int32 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT32}
    biases = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in int32]
    assert len(biases) == 4 and all(len(n.input) == 2 for n in biases)
    assert set(int32) == {n.input[0] for n in biases}  # no zero-point initializer left
    assert report.optimized_ops["QLinearConv"] == 3 and report.optimized_ops["QGemm"] == 1


def test_drop_exporter_debug_info_reaches_subgraphs_and_keeps_other_keys():
    from onnx import TensorProto, helper

    from squant.export.graph import drop_exporter_debug_info

    def tagged(node, **props):
        helper.set_metadata_props(node, props)
        return node

    branch = helper.make_graph(
        [tagged(helper.make_node("Identity", ["x"], ["y"]), namespace="a",
                **{"pkg.torch.onnx.stack_trace": "/home/me/model.py", "mine": "kept"})],
        "branch", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    condition = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])
    helper.set_metadata_props(x, {"pkg.torch.export.graph_signature.InputSpec.kind": "USER"})
    node = tagged(helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch),
                  **{"pkg.onnxscript.rewriter.rule_name": "r"})
    model = helper.make_model(helper.make_graph([node], "g", [condition, x], [out]))
    assert drop_exporter_debug_info(model) == 6  # the branch is one graph proto, copied twice
    inner = model.graph.node[0].attribute[0].g.node[0]
    assert [(p.key, p.value) for p in inner.metadata_props] == [("mine", "kept")]
    assert not model.graph.node[0].metadata_props and not model.graph.input[1].metadata_props


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_low_bit_linear_becomes_matmul_nbits(tmp_path, bits):
    torch.manual_seed(1)
    model = MLP().eval()
    qmodel = squant.quantize(model, bits)
    x = torch.randn(3, 7, 48)
    report = squant.export_onnx(qmodel, tmp_path / "m.onnx", x, accuracy_level=0)
    assert [layer.ops for layer in report.layers] == ["MatMulNBits", "MatMulNBits"]
    assert report.optimized_ops["MatMulNBits"] == 2
    with torch.no_grad():
        expected = qmodel(x).numpy()
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), expected, rtol=1e-4, atol=1e-4)


def test_matmul_nbits_packing_reads_back_squants_weight():
    torch.manual_seed(2)
    qmodel = squant.quantize(nn.Sequential(nn.Linear(40, 8)), 4)
    module = qmodel[0]
    packed, scale, zero, block, bits = matmul_nbits_weight(module)
    blocks = packed.shape[1]
    assert bits == 4 and blocks == -(-40 // block)
    low, high = packed & 0x0F, packed >> 4
    unsigned = np.stack([low, high], -1).reshape(8, blocks * block)[:, :40].astype(np.float32)
    zeros = np.stack([zero & 0x0F, zero >> 4], -1).reshape(8, -1)[:, :blocks]
    column_block = np.arange(40) // block
    weight = ((unsigned - zeros[:, column_block]) * scale.reshape(8, blocks)[:, column_block])
    assert_same_bits(weight, module.dequantize_weight().numpy())


@pytest.mark.parametrize(("bits", "scheme"), [(4, "asymmetric"), (8, "symmetric")])
def test_activation_quantized_cnn_runs_integer_kernels(cnn, tmp_path, bits, scheme):
    qmodel = squant.quantize(cnn, bits, act_bits=8, input_shape=(3, 12, 12), scheme=scheme)
    x = torch.rand(64, 3, 12, 12)
    report = squant.export_onnx(qmodel, tmp_path / "m.onnx", x[:2])
    by_name = {layer.name: layer for layer in report.layers}
    # squant keeps the first layer's input float; the file quantizes it on input_range
    assert all(by_name[n].integer for n in ("conv1", "conv2", "conv3", "fc"))
    assert report.optimized_ops["QLinearConv"] == 3 and report.optimized_ops["QGemm"] == 1
    kept = squant.export_onnx(qmodel, tmp_path / "k.onnx", x[:2], input_range=None)
    assert not {layer.name: layer for layer in kept.layers}["conv1"].integer
    assert kept.optimized_ops["QLinearConv"] == 2
    assert report.session_config == ({"session.x64quantprecision": "1"} if bits == 8 else {})
    assert "slow path" not in str(report)
    with torch.no_grad():
        expected = qmodel(x).numpy()
    # Beyond squant's own fake-quantization, the file quantizes layer outputs and residual adds
    # to 8 bits (what lets onnxruntime fuse them): a small error next to the weights' own.
    error = np.linalg.norm(run(tmp_path / "m.onnx", x) - expected) / np.linalg.norm(expected)
    assert error < 0.05


def test_activation_grid_is_squants_fake_quantizer():
    torch.manual_seed(3)
    x = torch.randn(10_000) * 3
    for lo, hi, bits in ((-4.0, 5.0, 8), (0.0, 6.5, 8), (-1.0, 1.0, 8)):
        scale, zero = activation_grid(lo, hi, bits)
        q = np.clip(np.rint(x.numpy() / scale) + int(zero), 0, 255)
        onnx_values = (q - int(zero)) * scale
        fake = squant.core.fake_quant.fake_quantize(x, torch.tensor(lo), torch.tensor(hi), bits)
        step = (hi - lo) / (2**bits - 1)
        assert np.abs(onnx_values - fake.numpy()).max() <= step * 1.001


def test_zero_excluding_channels_are_widened_with_a_warning(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight[1] = torch.linspace(0.5, 1.0, 6)  # all positive: range excludes 0
    qmodel = squant.quantize(model, 8)
    before = qmodel[0].codes.clone()
    with pytest.warns(UserWarning, match=r"layer '0': 1 channel\(s\) \(1\)"):
        report = squant.export_onnx(qmodel, tmp_path / "m.onnx", torch.rand(2, 6))
    assert "widened" in report.layers[0].reason
    assert torch.equal(qmodel[0].codes, before)  # the model is not changed
    x = torch.rand(8, 6)
    with torch.no_grad():
        expected = qmodel(x).numpy()
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), expected, rtol=0.02, atol=0.02)


def test_bad_input_is_refused_and_leaves_no_file(cnn, tmp_path):
    with pytest.raises(squant.QuantizationError, match="no squant quantized layer"):
        squant.export_onnx(cnn, tmp_path / "m.onnx", torch.rand(1, 3, 12, 12))
    with pytest.raises(TypeError, match="example_inputs"):
        squant.export_onnx(squant.quantize(cnn, 4), tmp_path / "m.onnx", [np.zeros(3)])
    with pytest.raises(squant.QuantizationError, match="could not export"):
        squant.export_onnx(squant.quantize(cnn, 4), tmp_path / "m.onnx", torch.rand(1, 5, 12))
    # the model's own error, not the exporter's banner
    with pytest.raises(squant.QuantizationError, match="expected input.* to have 3 channels"):
        squant.export_onnx(squant.quantize(cnn, 4), tmp_path / "m.onnx", torch.rand(2, 1, 8, 8))
    with pytest.raises(TypeError, match="got NoneType"):
        squant.export_onnx(squant.quantize(cnn, 4), tmp_path / "m.onnx", None)
    act = squant.quantize(cnn, 4, act_bits=8, input_shape=(3, 12, 12))
    with pytest.raises(squant.QuantizationError, match=r"batch 1, input 0: shape \(2, 1, 12, 12\)"):
        squant.export_onnx(act, tmp_path / "m.onnx", torch.rand(2, 3, 12, 12),
                           calibration_data=[torch.rand(2, 3, 12, 12), torch.rand(2, 1, 12, 12)])
    with pytest.raises(squant.QuantizationError, match="NaN or infinite"):
        squant.export_onnx(act, tmp_path / "m.onnx", torch.full((2, 3, 12, 12), float("nan")))
    assert not list(tmp_path.iterdir())
    (tmp_path / "not.onnx").write_text("not a model")
    with pytest.raises(squant.QuantizationError, match="is not an ONNX model"):
        squant.onnx_session_options(tmp_path / "not.onnx")


def test_activation_options_of_a_weight_only_model_are_ignored_with_a_warning(cnn, tmp_path):
    qmodel = squant.quantize(cnn, 4)
    x = torch.rand(2, 3, 12, 12)
    with pytest.warns(UserWarning, match="no layer of this model quantizes its input"):
        squant.export_onnx(qmodel, tmp_path / "a.onnx", x, input_range=(0.0, 1.0))
    with pytest.warns(UserWarning, match="no layer of this model quantizes its input"):
        squant.export_onnx(qmodel, tmp_path / "b.onnx", x, calibration_data=[x])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*no layer of this model quantizes its input")
        squant.export_onnx(qmodel, tmp_path / "c.onnx", x)  # the defaults say nothing


def test_float64_example_inputs_export_a_float32_model(cnn, tmp_path):
    """The exported model computes in float32 whatever the example inputs' float dtype (a
    double input once left a file onnxruntime could not load)."""
    qmodel = squant.quantize(cnn, 4)
    x = torch.rand(3, 3, 12, 12, dtype=torch.float64)
    squant.export_onnx(qmodel, tmp_path / "m.onnx", x[:2], accuracy_level=0)
    with torch.no_grad():
        expected = qmodel(x.float()).numpy()
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x.float()), expected, rtol=1e-4,
                               atol=1e-5)


def test_a_file_onnxruntime_cannot_load_is_not_left(cnn, tmp_path, monkeypatch):
    from squant.export import onnx_export

    def refuse(path, config=None):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : refused")

    monkeypatch.setattr(onnx_export, "optimized_ops", refuse)
    with pytest.raises(squant.QuantizationError, match="cannot load .* not written: .*refused"):
        squant.export_onnx(squant.quantize(cnn, 4), tmp_path / "m.onnx", torch.rand(2, 3, 12, 12))
    assert not list(tmp_path.iterdir())


def test_report_prints_a_table(cnn, tmp_path):
    report = squant.export_onnx(squant.quantize(cnn, 4), tmp_path / "m.onnx",
                                torch.rand(2, 3, 12, 12))
    text = str(report)
    assert "m.onnx" in text and "fc" in text and "MatMulNBits" in text
    assert report.file_bytes == (tmp_path / "m.onnx").stat().st_size


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("bits", [4, 8])
def test_batchnorms_fold_into_the_scales(tmp_path, bits):
    torch.manual_seed(4)
    model = ConvBN().eval()
    for bn in (model.bn1, model.bn2):
        bn.weight.data = torch.randn(16)  # negative gammas too: codes get negated
        bn.bias.data = torch.randn(16) * 0.1
        bn.running_mean = torch.randn(16) * 0.1
        bn.running_var = torch.rand(16) + 0.5
    qmodel = squant.quantize(model, bits, act_bits=8, input_shape=(3, 10, 10))
    x = torch.rand(16, 3, 10, 10)
    report = squant.export_onnx(qmodel, tmp_path / "m.onnx", x[:2])
    assert "BatchNormalization" not in report.optimized_ops
    assert report.optimized_ops["QLinearConv"] == 2  # conv1 (its input on input_range), conv2
    by_name = {layer.name: layer for layer in report.layers}
    assert all("BatchNorm folded" in by_name[name].reason for name in ("conv1", "conv2"))
    with torch.no_grad():
        expected = qmodel(x).numpy()
    error = np.linalg.norm(run(tmp_path / "m.onnx", x) - expected) / np.linalg.norm(expected)
    assert error < 0.05
    weight_only = squant.export_onnx(squant.quantize(model, bits), tmp_path / "w.onnx", x[:2],
                                     accuracy_level=0)
    assert "BatchNormalization" not in weight_only.optimized_ops
    with torch.no_grad():
        expected = squant.quantize(model, bits)(x).numpy()
    np.testing.assert_allclose(run(tmp_path / "w.onnx", x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_batchnorms_fold_into_group_wise_scales(tmp_path, bits):
    """Every group's scale of a group-wise conv takes its channel's BatchNorm factor (negative
    gammas negate the codes and zero points): the file computes the quantized model."""
    torch.manual_seed(6)
    model = ConvBN().eval()
    for bn in (model.bn1, model.bn2):
        bn.weight.data = torch.randn(16)
        bn.running_var = torch.rand(16) + 0.5
    qmodel = squant.quantize(model, bits, group_size=9, include_zero=True,
                             layer_options={"fc": {"group_size": None}})
    x = torch.rand(4, 3, 10, 10)
    report = squant.export_onnx(qmodel, tmp_path / "g.onnx", x[:2], accuracy_level=0)
    by_name = {layer.name: layer for layer in report.layers}
    assert all("BatchNorm folded" in by_name[name].reason for name in ("conv1", "conv2"))
    assert "BatchNormalization" not in report.optimized_ops
    with torch.no_grad():
        expected = qmodel(x).numpy()
    np.testing.assert_allclose(run(tmp_path / "g.onnx", x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("group_size", "ops"), [(32, "MatMulNBits"),
                                                 (24, "DequantizeLinear → MatMul")])
def test_group_wise_linears_are_exact(tmp_path, group_size, ops):
    torch.manual_seed(5)
    model = MLP(dim=56).eval()  # 56 and 224 inputs: ragged last groups
    qmodel = squant.quantize(model, 4, group_size=group_size)
    x = torch.randn(2, 5, 56)
    report = squant.export_onnx(qmodel, tmp_path / "m.onnx", x, accuracy_level=0)
    assert [layer.ops for layer in report.layers] == [ops, ops]
    with torch.no_grad():
        expected = qmodel(x).numpy()
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), expected, rtol=1e-4, atol=1e-4)


def test_group_wise_convs_use_blocked_dequantize_and_stay_float_with_activations(cnn, tmp_path):
    qmodel = squant.quantize(cnn, 4, group_size=36, layer_options={"fc": {"group_size": None}},
                             act_bits=8, input_shape=(3, 12, 12))
    x = torch.rand(8, 3, 12, 12)
    report = squant.export_onnx(qmodel, tmp_path / "m.onnx", x[:2])
    by_name = {layer.name: layer for layer in report.layers}
    assert not by_name["conv2"].integer and "group-wise" in by_name["conv2"].reason
    assert by_name["fc"].integer
    with torch.no_grad():
        expected = qmodel(x).numpy()
    error = np.linalg.norm(run(tmp_path / "m.onnx", x) - expected) / np.linalg.norm(expected)
    assert error < 0.05


def test_include_zero_exports_without_widening(tmp_path, recwarn):
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight[1] = torch.linspace(0.5, 1.0, 6)
    qmodel = squant.quantize(model, 8, include_zero=True)
    report = squant.export_onnx(qmodel, tmp_path / "m.onnx", torch.rand(2, 6),
                                accuracy_level=0)  # DequantizeLinear: the int8 codes as stored
    assert not [w for w in recwarn if "exclude 0" in str(w.message)]
    assert "widened" not in report.layers[0].reason
    stored = stored_codes(tmp_path / "m.onnx")["0.weight_quantized"]
    assert np.array_equal(stored, qmodel[0].codes.numpy())


def test_asymmetric_eight_bit_codes_warn_of_the_slow_path(cnn, tmp_path):
    qmodel = squant.quantize(cnn, 8, act_bits=8, input_shape=(3, 12, 12), include_zero=True)
    with pytest.warns(UserWarning, match="non-zero zero points"):
        report = squant.export_onnx(qmodel, tmp_path / "m.onnx", torch.rand(2, 3, 12, 12))
    assert "slow path" in {layer.name: layer for layer in report.layers}["conv2"].reason


@pytest.mark.parametrize(("accuracy_level", "ops"), [(4, "MatMulNBits"),
                                                     (0, "DequantizeLinear → MatMul")])
def test_eight_bit_linears_use_matmul_nbits_only_with_int8_activations(tmp_path, accuracy_level,
                                                                       ops):
    torch.manual_seed(6)
    model = MLP().eval()
    qmodel = squant.quantize(model, 8, include_zero=True)
    x = torch.randn(3, 7, 48)
    report = squant.export_onnx(qmodel, tmp_path / "m.onnx", x, accuracy_level=accuracy_level)
    assert [layer.ops for layer in report.layers] == [ops, ops]
    with torch.no_grad():
        expected = qmodel(x).numpy()
    error = np.linalg.norm(run(tmp_path / "m.onnx", x) - expected) / np.linalg.norm(expected)
    assert error < (0.02 if accuracy_level else 1e-5)  # int8 activations on the fly, or exact


def test_calibration_data_ranges_the_tensors_squant_does_not(cnn, tmp_path):
    batches = [torch.rand(4, 3, 12, 12) for _ in range(2)]
    qmodel = squant.quantize(cnn, 4, act_bits=8, calibration_data=batches,
                             act_range="percentile")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*calibrated on data")
        report = squant.export_onnx(qmodel, tmp_path / "m.onnx", batches[0][:2],
                                    calibration_data=batches)
    assert report.optimized_ops["QLinearConv"] == 3
    with pytest.warns(UserWarning, match=r"calibrated on data \(percentile\).*same "
                                         "calibration_data"):
        squant.export_onnx(qmodel, tmp_path / "data_free.onnx", batches[0][:2])
    x = torch.rand(16, 3, 12, 12)
    with torch.no_grad():
        expected = qmodel(x).numpy()
    error = np.linalg.norm(run(tmp_path / "m.onnx", x) - expected) / np.linalg.norm(expected)
    assert error < 0.05
    with pytest.raises(TypeError, match="calibration_data batch 0"):
        squant.export_onnx(qmodel, tmp_path / "n.onnx", batches[0], calibration_data=[[1, 2]])
    with pytest.raises(squant.QuantizationError, match="no batch"):
        squant.export_onnx(qmodel, tmp_path / "n.onnx", batches[0], calibration_data=[])
    assert not (tmp_path / "n.onnx").exists()


class BNReLU6Net(nn.Module):
    """conv-BN-ReLU6, depthwise conv-BN-ReLU6, 1x1 conv-BN with a residual add (MobileNetV2's
    block), then a classifier; BN statistics non-trivial so folded biases are not zero."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                                   nn.BatchNorm2d(8), nn.ReLU6(),
                                   nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)
        generator = torch.Generator().manual_seed(1)
        for bn in (m for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5, generator=generator)
            bn.running_var.uniform_(0.5, 2.0, generator=generator)
            bn.weight.data.uniform_(0.5, 3.0, generator=generator)  # outputs well past 6
            bn.bias.data.uniform_(-1.0, 2.0, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block(x)
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def relu6_net():
    torch.manual_seed(0)
    return BNReLU6Net().eval()


@pytest.mark.parametrize(("bits", "scheme"), [(4, "asymmetric"), (8, "symmetric")])
def test_faithful_model_computes_what_the_file_computes(relu6_net, tmp_path, bits, scheme):
    qmodel = squant.quantize(relu6_net, bits, act_bits=8, input_shape=(3, 10, 10),
                             scheme=scheme)
    x = torch.randn(48, 3, 10, 10)
    report = squant.export_onnx(qmodel, tmp_path / "m.onnx", x[:4], faithful=True)
    assert report.integer_layers == len(report.layers)
    file_output = run(tmp_path / "m.onnx", x)
    with torch.no_grad():
        faithful = report.faithful_model(x).numpy()
        plain = qmodel(x).numpy()
        single = report.faithful_model(x[:1]).numpy()
    # Every activation the file quantizes (first input, outputs, the residual add) on the
    # file's grid, and the int32 rounding of the folded biases: equal up to float rounding.
    error = np.linalg.norm(file_output - faithful) / np.linalg.norm(faithful)
    assert error < 1e-5
    assert np.linalg.norm(file_output - plain) / np.linalg.norm(plain) > 10 * error
    np.testing.assert_allclose(single, faithful[:1], rtol=1e-5, atol=1e-6)
    again = squant.export_faithful(qmodel, tmp_path / "m.onnx", x[:4])
    with torch.no_grad():
        np.testing.assert_array_equal(again(x).numpy(), faithful)
    model = onnx.load(str(tmp_path / "m.onnx"))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = [float(initializers[n.input[1]]) for n in model.graph.node
              if n.op_type == "QuantizeLinear" and "hardtanh" in n.input[0]]
    # ReLU6 outputs: the quantizer removes the Clip, so the grid must end at 6
    assert scales and max(scales) <= 6 / 255 * (1 + 1e-6)
    assert not any(n.op_type == "Clip" for n in model.graph.node)


def test_faithful_model_refuses_another_models_file(relu6_net, cnn, tmp_path):
    qmodel = squant.quantize(cnn, 4, act_bits=8, input_shape=(3, 12, 12))
    squant.export_onnx(qmodel, tmp_path / "m.onnx", torch.rand(2, 3, 12, 12))
    other = squant.quantize(relu6_net, 4, act_bits=8, input_shape=(3, 10, 10))
    with pytest.raises(squant.QuantizationError, match="written for this model"):
        squant.export_faithful(other, tmp_path / "m.onnx", torch.rand(2, 3, 10, 10))


def test_first_layer_input_range(cnn, tmp_path):
    qmodel = squant.quantize(cnn, 4, act_bits=8, input_shape=(3, 12, 12))
    x = torch.rand(2, 3, 12, 12) * 4 - 1
    squant.export_onnx(qmodel, tmp_path / "m.onnx", x, input_range=(-1.5, 3.0))
    squant.export_onnx(qmodel, tmp_path / "a.onnx", x)  # "auto": min and max of x

    def input_grid(path):
        model = onnx.load(str(path))
        initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        node = next(n for n in model.graph.node
                    if n.op_type == "QuantizeLinear" and n.input[0] == model.graph.input[0].name)
        return float(initializers[node.input[1]]), int(initializers[node.input[2]])

    scale, zero = activation_grid(-1.5, 3.0, 8)
    assert input_grid(tmp_path / "m.onnx") == (float(scale), int(zero))
    scale, zero = activation_grid(float(x.min()), float(x.max()), 8)
    assert input_grid(tmp_path / "a.onnx") == (float(scale), int(zero))
    for bad in ((1.0, 2.0), (0.0, 0.0), (0.0, float("inf")), "data", (1,)):
        with pytest.raises(squant.QuantizationError, match="input_range|input range"):
            squant.export_onnx(qmodel, tmp_path / "b.onnx", x, input_range=bad)
    assert not (tmp_path / "b.onnx").exists()


def test_faithful_model_warns_where_it_computes_a_quantized_tensor_in_float(tmp_path):
    """onnxruntime has no integer ConvTranspose: between Q/DQ pairs it runs in float, and the
    faithful model's float ConvTranspose may round otherwise, so it says so; a net of fused
    layers only gets no such warning."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1)).eval()
    qmodel = squant.quantize(model, 4, act_bits=8, input_shape=(3, 8, 8))
    with pytest.warns(UserWarning, match=r"with float ops.*\(ConvTranspose\)"):
        squant.export_onnx(qmodel, tmp_path / "t.onnx", torch.rand(2, 3, 8, 8), faithful=True)
    # A Sequential's input is a placeholder the faithful model renames (``input_1``).
    convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(400, 5)).eval()
    fused_only = squant.quantize(convs, 4, act_bits=8, input_shape=(3, 12, 12))
    x = torch.rand(6, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "the faithful model computes")
        report = squant.export_onnx(fused_only, tmp_path / "c.onnx", x[:2], faithful=True)
    with torch.no_grad():
        assert np.array_equal(report.faithful_model(x).numpy(), run(tmp_path / "c.onnx", x))


def test_faithful_model_warns_of_exporter_values_it_cannot_follow(tmp_path):
    torch.manual_seed(2)
    model = MLP().eval()
    x = torch.randn(16, 6, 48)
    qmodel = squant.quantize(model, 4, act_bits=8, input_shape=(6, 48))
    # A 3-D Linear is MatMul then Add in the file; the MatMul's output (a value of torch's
    # exporter, quantized in the file) has no node in torch's graph.
    with pytest.warns(UserWarning, match="leaves .* float"):
        report = squant.export_onnx(qmodel, tmp_path / "m.onnx", x[:2], faithful=True)
    file_output = run(tmp_path / "m.onnx", x)
    with torch.no_grad():
        faithful = report.faithful_model(x).numpy()
        plain = qmodel(x).numpy()
    assert (np.linalg.norm(file_output - faithful)
            < np.linalg.norm(file_output - plain))
