"""``squant quantize IN.onnx OUT.onnx``: SQuant on ONNX models built here with onnx.helper."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import squant  # noqa: E402
from squant.cli import main  # noqa: E402
from squant.core.options import QuantOptions  # noqa: E402
from squant.export.onnx_input import find_weights, quantize_layers  # noqa: E402
from squant.export.onnx_quantize import quantize_onnx  # noqa: E402

OPSET = 21


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"conv1.weight": (8, 3, 3, 3), "grouped.weight": (8, 4, 3, 3),
              "depthwise.weight": (8, 1, 3, 3), "up.weight": (8, 4, 2, 2),
              "fc_t.weight": (6, 4), "fc.weight": (6, 5), "mm.weight": (5, 3),
              "tr.weight": (4, 3)}
    weights = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32)
               for name, shape in shapes.items()}
    fc = weights["fc_t.weight"]  # every row's range includes 0: a MatMulNBits zero point
    fc[:, 0], fc[:, 1] = -np.abs(fc[:, 0]) - 0.1, np.abs(fc[:, 1]) + 0.1
    return weights


def conv_net(batch: int | str = 1, weights: dict | None = None, weight_inputs: bool = False):
    """Conv → grouped Conv → depthwise Conv → ConvTranspose → pool → Gemm(transB) →
    Gemm → MatMul [K, N] → MatMul of a Transposed initializer."""
    weights = weights or _weights()
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "grouped.weight"], ["c2"], name="grouped", group=2,
                         pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "depthwise.weight"], ["c3"], name="depthwise",
                         group=8, pads=[1] * 4),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("ConvTranspose", ["r3", "up.weight"], ["c4"], name="up",
                         strides=[2, 2]),
        helper.make_node("Relu", ["c4"], ["r4"], name="relu4"),
        helper.make_node("GlobalAveragePool", ["r4"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_t.weight", "fc_t.bias"], ["g1"], name="fc_t",
                         transB=1),
        helper.make_node("Relu", ["g1"], ["r5"], name="relu5"),
        helper.make_node("Gemm", ["r5", "fc.weight"], ["g2"], name="fc"),
        helper.make_node("MatMul", ["g2", "mm.weight"], ["m"], name="mm"),
        helper.make_node("Transpose", ["tr.weight"], ["tr_t"], name="tr_transpose"),
        helper.make_node("MatMul", ["m", "tr_t"], ["y"], name="tr"),
    ]
    inits = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    inits.append(numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32), "fc_t.bias"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])]
    if weight_inputs:
        inputs += [helper.make_tensor_value_info("conv1.weight", TensorProto.FLOAT,
                                                 list(weights["conv1.weight"].shape))]
        inits = [i for i in inits if i.name != "conv1.weight"]
    graph = helper.make_graph(nodes, "net", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    return model


# Each weight's output-channel axis in the initializer's own layout.
AXES = {"conv1.weight": 0, "grouped.weight": 0, "depthwise.weight": 0, "up.weight": 1,
        "fc_t.weight": 0, "fc.weight": 1, "mm.weight": 1, "tr_t": 1}


def _save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _run(path_or_model, x: np.ndarray) -> np.ndarray:
    source = path_or_model if isinstance(path_or_model, (str, Path)) else \
        path_or_model.SerializeToString()
    options = squant.onnx_session_options(source) if isinstance(source, Path) else \
        ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(source) if isinstance(source, Path) else source,
                                   options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _reference(model, bits: int, mode: str = "KC"):
    """The float graph with every weight replaced by ``squant.quantize_weight``'s dequantized
    weight on its right axis."""
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    weights = {i.name: numpy_helper.to_array(i) for i in reference.graph.initializer}
    weights["tr_t"] = weights.pop("tr.weight").T.copy()
    for node in list(reference.graph.node):
        if node.op_type == "Transpose":
            reference.graph.node.remove(node)
    del reference.graph.initializer[:]
    for name, value in weights.items():
        if name in AXES:
            value = squant.quantize_weight(value, bits, mode, AXES[name]).dequantize().numpy()
        reference.graph.initializer.append(numpy_helper.from_array(value, name))
    return reference


def test_finds_every_weight_on_its_axis_and_codes_equal_quantize_weight():
    model = conv_net()
    entries, left = find_weights(model, Path("net.onnx"))
    assert {e["name"] for e in entries} == set(AXES) and not left
    layers = quantize_layers(model, entries, QuantOptions(4), (), {})
    arrays = {i.name: numpy_helper.to_array(i) for i in conv_net().graph.initializer}
    arrays["tr_t"] = arrays["tr.weight"].T
    for name, axis in AXES.items():
        expected = squant.quantize_weight(arrays[name], 4, "KC", axis)
        layer = layers[name]
        codes = layer.codes.numpy().T if layer.transposed or name == "fc.weight" else \
            layer.codes.numpy()  # fc: a Gemm's B [K, N], stored as B.T with transB
        np.testing.assert_array_equal(codes, expected.codes.numpy(), err_msg=name)
        np.testing.assert_array_equal(layer.scale.numpy(), expected.scale.numpy(), name)


def _grouped_up():
    """The net with a ConvTranspose of 2 groups (8 -> 2 * 2 channels)."""
    weights = _weights()
    weights["up.weight"] = np.random.default_rng(6).standard_normal((8, 2, 2, 2)).astype(
        np.float32)
    model = conv_net(weights=weights)
    for node in model.graph.node:
        if node.op_type == "ConvTranspose":
            node.attribute.append(helper.make_attribute("group", 2))
    return model


def test_grouped_conv_transpose_is_quantized_group_by_group(tmp_path):
    model = _grouped_up()
    weight = numpy_helper.to_array(next(i for i in model.graph.initializer
                                        if i.name == "up.weight"))  # (8 in, 2 out/group, 2, 2)
    entries, _ = find_weights(model, Path("net.onnx"))
    layer = quantize_layers(model, entries, QuantOptions(4), (), {})["up.weight"]
    blocks = [squant.quantize_weight(weight[4 * g:4 * g + 4], 4, "KC", 1) for g in range(2)]
    assert layer.groups_of_codes == 2
    for group, expected in enumerate(blocks):
        np.testing.assert_array_equal(layer.codes.numpy()[4 * group:4 * group + 4],
                                      expected.codes.numpy())
    # The file computes the group-by-group dequantized weight.
    source = _save(_grouped_up(), tmp_path / "net.onnx")
    quantize_onnx(source, tmp_path / "q.onnx", QuantOptions(4), accuracy_level=0)
    reference = _reference(_grouped_up(), 4)
    dequantized = np.concatenate([b.dequantize().numpy() for b in blocks])
    for index, init in enumerate(reference.graph.initializer):
        if init.name == "up.weight":
            reference.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(dequantized, "up.weight"))
    x = np.random.default_rng(5).random((1, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(tmp_path / "q.onnx", x), _run(reference, x), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_output_equals_the_dequantized_weights(tmp_path, bits):
    model = conv_net()
    source = _save(model, tmp_path / "net.onnx")
    job = quantize_onnx(source, tmp_path / "q.onnx", QuantOptions(bits), accuracy_level=0)
    x = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    expected = _run(_reference(model, bits), x)
    np.testing.assert_allclose(_run(tmp_path / "q.onnx", x), expected, rtol=1e-4, atol=1e-5)
    ops = {row.name: row.ops for row in job.report.layers}
    assert ops["fc_t.weight"] == ("MatMulNBits" if bits <= 4 else "DequantizeLinear → Gemm")
    assert ops["conv1.weight"] == ("DequantizeLinear (uint4) → Conv" if bits <= 4 else
                                   "DequantizeLinear → Conv")
    stored = onnx.load(str(tmp_path / "q.onnx"))
    floats = [i.name for i in stored.graph.initializer
              if i.data_type == TensorProto.FLOAT and len(i.dims) >= 2]
    assert not floats  # every weight stored as codes
    types = {i.name: i.data_type for i in stored.graph.initializer}
    assert types["conv1.weight_quantized"] == (TensorProto.UINT4 if bits <= 4 else
                                               TensorProto.INT8)


def test_activations_run_convs_as_qlinearconv_within_a_step(tmp_path):
    model = conv_net(batch="N")
    source = _save(model, tmp_path / "net.onnx")
    job = quantize_onnx(source, tmp_path / "q.onnx", QuantOptions(8), act_bits=8,
                        input_shape=(3, 8, 8))
    assert job.report.optimized_ops["QLinearConv"] >= 2
    integer = {row.name for row in job.report.layers if row.integer}
    assert {"grouped.weight", "depthwise.weight"} <= integer
    assert "conv1.weight" not in integer  # squant keeps the first layer's input float
    x = np.random.default_rng(2).random((4, 3, 8, 8), dtype=np.float32)
    options = squant.onnx_session_options(tmp_path / "q.onnx")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    expected = _run(_reference(model, 8), x)
    step = np.abs(expected).max() / 127
    assert np.abs(got - expected).max() <= 4 * step


def test_dynamic_input_without_shape_is_refused(tmp_path):
    source = _save(conv_net(batch="N"), tmp_path / "net.onnx")
    dynamic = conv_net()
    dynamic.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    _save(dynamic, source)
    with pytest.raises(squant.QuantizationError, match="--input-shape"):
        quantize_onnx(source, tmp_path / "q.onnx", QuantOptions(4), act_bits=8)
    assert not (tmp_path / "q.onnx").exists()


def test_cli_quantize_inspect_report_and_patterns(tmp_path, capsys):
    source = _save(conv_net(), tmp_path / "net.onnx")
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["quantize", str(source), str(out), "--bits", "4", "--skip", "mm",
                 "--layer-bits", "conv1*=8", "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0 and "onnxruntime runs such convs in float" in printed
    assert "mm" in report.read_text() and "left_float" in report.read_text()
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"conv1.weight +8b", table) and "MatMulNBits" in table
    assert "mm.weight" not in table
    assert main(["inspect", str(source)]) == 1  # not written by squant: one line
    assert capsys.readouterr().err.strip().count("\n") == 0


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    good = conv_net().SerializeToString()
    text = tmp_path / "text.onnx"
    text.write_text("not a model at all\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 2])
    future = conv_net()
    future.opset_import[0].version = 99
    custom = conv_net()
    custom.graph.node[1].op_type = "NoSuchOp"
    return {"text": text, "truncated": truncated,
            "opset": _save(future, tmp_path / "future.onnx"),
            "weight input": _save(conv_net(weight_inputs=True), tmp_path / "inputs.onnx"),
            "node kind": _save(custom, tmp_path / "custom.onnx")}


def test_bad_inputs_exit_1_with_one_line_and_no_output(tmp_path, capsys):
    for what, path in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out_{path.stem}.onnx"
        assert main(["quantize", str(path), str(out), "--quiet"]) == 1, what
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and str(path) in error, (what, error)
        assert not out.exists() and not list(tmp_path.glob(".out_*")), what
    error_of_input = capsys.readouterr().err
    del error_of_input


def _torch_net():
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
                         nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()


@pytest.mark.parametrize("act_bits", [None, 8])
def test_torch_exported_model_matches_squant_quantize_within_a_step(tmp_path, act_bits):
    """The same codes as ``squant.quantize`` of the PyTorch model; with activations, the
    same grids up to the calibration (squant's runs on quantized activations, the ONNX path on
    the float model's), so within one output step."""
    import torch

    net = _torch_net()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    source = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), str(source), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    quantize_onnx(source, tmp_path / "q.onnx", QuantOptions(8 if act_bits else 4),
                  act_bits=act_bits, input_shape=(3, 8, 8), accuracy_level=0)
    qmodel = squant.quantize(net, bits=8 if act_bits else 4, act_bits=act_bits,
                             input_shape=(3, 8, 8) if act_bits else None)
    with torch.no_grad():
        expected = qmodel(x).numpy()
    got = _run(tmp_path / "q.onnx", x.numpy())
    step = (expected.max() - expected.min()) / 255
    tolerance = step if act_bits else 1e-4 * np.abs(expected).max()
    assert np.abs(got - expected).max() <= tolerance


def test_external_data_round_trip(tmp_path):
    model = conv_net()
    source = tmp_path / "big.onnx"
    onnx.save(conv_net(), str(source), save_as_external_data=True, all_tensors_to_one_file=True,
              location="big.onnx.data", size_threshold=0)
    out = tmp_path / "q.onnx"
    quantize_onnx(source, out, QuantOptions(8), accuracy_level=0)
    assert (tmp_path / "q.onnx.data").is_file()
    x = np.random.default_rng(4).random((1, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(out, x), _run(_reference(model, 8), x), rtol=1e-4,
                               atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data",
                                                           "q.onnx", "q.onnx.data"]


def test_initializers_listed_as_graph_inputs_are_unlisted_once_replaced(tmp_path):
    model = conv_net()
    model.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                             for i in model.graph.initializer)
    source = _save(model, tmp_path / "net.onnx")
    quantize_onnx(source, tmp_path / "q.onnx", QuantOptions(4), accuracy_level=0)
    x = np.random.default_rng(7).random((1, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(tmp_path / "q.onnx", x), _run(_reference(conv_net(), 4), x),
                               rtol=1e-4, atol=1e-5)
    stored = onnx.load(str(tmp_path / "q.onnx"))
    assert [i.name for i in stored.graph.input if i.name != "x"] == ["fc_t.bias"]


def test_batchnorms_after_convs_are_folded_before_quantizing(tmp_path):
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    gamma, beta, mean = (rng.standard_normal(4).astype(np.float32) for _ in range(3))
    var = rng.random(4).astype(np.float32) + 0.5
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"],
                              name="bn", epsilon=1e-3)]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((weight, "w"), (gamma, "g"), (beta, "b"), (mean, "m"), (var, "v"))]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    source = _save(model, tmp_path / "bn.onnx")
    job = quantize_onnx(source, tmp_path / "q.onnx", QuantOptions(8))
    assert job.folded_batchnorms == 1
    stored = onnx.load(str(tmp_path / "q.onnx"))
    assert "BatchNormalization" not in {node.op_type for node in stored.graph.node}
    k = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-3)
    folded = (weight * k.reshape(-1, 1, 1, 1)).astype(np.float32)
    codes = next(numpy_helper.to_array(i) for i in stored.graph.initializer
                 if i.name == "w.weight_quantized")
    expected = squant.quantize_weight(folded, 8)
    assert np.abs(codes.astype(np.int16) - expected.codes.numpy()).max() == 0
    x = rng.random((1, 3, 8, 8), dtype=np.float32)
    float_out = _run(model, x)
    assert np.abs(_run(tmp_path / "q.onnx", x) - float_out).max() <= \
        0.02 * np.abs(float_out).max()


def test_group_wise_grids_leave_conv_transpose_float(tmp_path):
    source = _save(conv_net(), tmp_path / "net.onnx")
    job = quantize_onnx(source, tmp_path / "q.onnx", QuantOptions(4, group_size=9),
                        accuracy_level=0)
    assert "up" in job.left_float and "up.weight" not in {r.name for r in job.report.layers}
    stored = onnx.load(str(tmp_path / "q.onnx"))
    blocked = [n for n in stored.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert blocked  # the convs' groups of one kernel each
    x = np.random.default_rng(9).random((1, 3, 8, 8), dtype=np.float32)
    assert np.isfinite(_run(tmp_path / "q.onnx", x)).all()


def test_a_channel_whose_grid_excludes_zero_keeps_int8_codes(tmp_path):
    weights = _weights()
    weights["conv1.weight"][0] = np.abs(weights["conv1.weight"][0]) + 0.5  # all positive
    model = conv_net(weights=weights)
    source = _save(model, tmp_path / "net.onnx")
    quantize_onnx(source, tmp_path / "q.onnx", QuantOptions(4), accuracy_level=0)
    types = {i.name: i.data_type for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert types["conv1.weight_quantized"] == TensorProto.INT8
    assert types["grouped.weight_quantized"] == TensorProto.UINT4
    x = np.random.default_rng(10).random((1, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(tmp_path / "q.onnx", x), _run(_reference(model, 4), x),
                               rtol=1e-4, atol=1e-5)
