"""squant.export_faithful: the PyTorch model of an ONNX file computes, value for value, what
onnxruntime computes for it, its fused integer kernels included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import squant

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from squant.export.faithful import integer_ops  # noqa: E402
from squant.export.faithful.fused import fused_groups  # noqa: E402


class DepthwiseResidualNet(nn.Module):
    """Every kind of node the exporter fuses: convs (plain, depthwise with stride, grouped),
    BatchNorms folded, ReLU6 and ReLU removed into grids, a residual add, a max pool, a global
    average pool and Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU6())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
                                   nn.BatchNorm2d(16), nn.ReLU6(),
                                   nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),
                                  nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1, groups=4),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 7))
        generator = torch.Generator().manual_seed(3)
        for bn in (m for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5, generator=generator)
            bn.running_var.uniform_(0.5, 2.0, generator=generator)
            bn.weight.data.uniform_(0.5, 3.0, generator=generator)
            bn.bias.data.uniform_(-1.0, 2.0, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.down(x + self.block(x))
        return self.fc(x.mean((2, 3)))


def run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), squant.onnx_session_options(path),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize(("bits", "scheme", "calibrated"),
                         [(4, "asymmetric", False), (8, "symmetric", False),
                          (4, "asymmetric", True)])
def test_faithful_model_equals_onnxruntime_value_for_value(tmp_path, bits, scheme, calibrated):
    torch.manual_seed(0)
    model = DepthwiseResidualNet().eval()
    x = torch.randn(64, 3, 12, 12)
    # calibrated on small inputs: the grids saturate on these (the pooled mean's too)
    data = {"calibration_data": [x[:8] * 0.2]} if calibrated else {}
    qmodel = squant.quantize(model, bits, act_bits=8, scheme=scheme,
                             **(dict(data, act_range="percentile") if calibrated
                                else {"input_shape": (3, 12, 12)}))
    report = squant.export_onnx(qmodel, tmp_path / "m.onnx", x[:4], faithful=True,
                                **data)
    assert report.integer_layers == len(report.layers)
    assert {"QLinearConv", "QLinearAdd", "QGemm"} <= set(report.optimized_ops)
    file_output = run(tmp_path / "m.onnx", x)
    with torch.no_grad():
        faithful = report.faithful_model(x).numpy()
    np.testing.assert_array_equal(file_output, faithful)
    kinds = {name.split("_")[1] for name, _ in report.faithful_model.named_children()
             if name.startswith("squant_")}
    assert kinds == {"QLinearConv", "QLinearAdd", "QGemm", "ReduceMean"}
    # float ops between fake-quantizers (the model of the file before): not the same values
    plain = squant.export_faithful(qmodel, tmp_path / "m.onnx", x[:4], integer_kernels=False)
    with torch.no_grad():
        assert not np.array_equal(file_output, plain(x).numpy())


def _grid(name: str, scale: float, zero: int) -> list:
    return [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.array(zero, np.uint8), f"{name}_zero")]


def _qdq_model(op: str, inputs: list[str], weights: dict[str, tuple], attributes: dict,
               grids: dict[str, tuple[float, int]], output_grid: bool,
               input_shapes: list[list[int]]) -> onnx.ModelProto:
    """``x_i → Q → DQ → op(…, DQ(weights)) [→ Q → DQ] → y``, one uint8 grid per tensor."""
    nodes, initializers = [], []
    op_inputs = []
    for name in inputs:
        initializers += _grid(name, *grids[name])
        nodes += [helper.make_node("QuantizeLinear", [name, f"{name}_scale", f"{name}_zero"],
                                   [f"{name}_q"]),
                  helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale",
                                                        f"{name}_zero"], [f"{name}_dq"])]
        op_inputs.append(f"{name}_dq")
    for name, (codes, scale, zero, axis) in weights.items():
        initializers += [numpy_helper.from_array(codes, f"{name}_codes"),
                         numpy_helper.from_array(scale, f"{name}_scale"),
                         numpy_helper.from_array(zero, f"{name}_zero")]
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_codes", f"{name}_scale",
                                                           f"{name}_zero"], [name], axis=axis))
        op_inputs.append(name)
    result = "t" if output_grid else "y"
    nodes.append(helper.make_node(op, op_inputs, [result], **attributes))
    if output_grid:
        initializers += _grid("t", *grids["t"])
        nodes += [helper.make_node("QuantizeLinear", ["t", "t_scale", "t_zero"], ["t_q"]),
                  helper.make_node("DequantizeLinear", ["t_q", "t_scale", "t_zero"], ["y"])]
    graph = helper.make_graph(
        nodes, "fused", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                         for n, s in zip(inputs, input_shapes)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], fused_op: str,
           exact_session: bool) -> None:
    """onnxruntime fuses the model into ``fused_op``, and the group's module gives its
    output exactly."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if exact_session:
        options.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)[0]
    (group,) = fused_groups(model)
    assert group.kind == fused_op
    grids = {n.input[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dequantized = []
    for name in group.inputs:  # DequantizeLinear(QuantizeLinear(x)), as onnxruntime does
        scale = constants[grids[name].input[1]]
        zero = int(constants[grids[name].input[2]])
        codes = np.clip(np.rint(feeds[name] / scale) + zero, 0, 255)
        dequantized.append(torch.from_numpy(((codes - zero) * scale).astype(np.float32)))
    with torch.no_grad():
        got = group.module(*dequantized).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("bits", "group", "stride", "uniform_zero"),
                         [(4, 1, 1, True), (8, 1, 2, False), (8, 48, 2, False), (4, 48, 1, False),
                          (8, 4, 1, True)])
def test_qlinearconv_is_onnxruntimes(bits, group, stride, uniform_zero):
    rng = np.random.default_rng(bits * 100 + group + stride)
    channels, high = 48, 2 ** (bits - 1) - 1
    codes = rng.integers(-high, high + 1, (channels, channels // group, 3, 3)).astype(np.int8)
    scale = rng.uniform(0.002, 0.02, channels).astype(np.float32)
    zero = np.full(channels, 3 if uniform_zero else 0, np.int8)  # one zero point: QLinearConv
    bias = rng.integers(-5000, 5000, channels).astype(np.int32)
    x_scale, y_scale = 0.031, 0.047
    model = _qdq_model(
        "Conv", ["x"], {"w": (codes, scale, zero, 0),
                        "b": (bias, (x_scale * scale).astype(np.float32),
                              np.zeros(channels, np.int32), 0)},
        {"group": group, "strides": [stride, stride], "pads": [1, 0, 1, 1]},
        {"x": (x_scale, 121), "t": (y_scale, 97)}, True, [[None, channels, 9, 10]])
    x = rng.normal(0, 2.5, (3, channels, 9, 10)).astype(np.float32)
    _check(model, {"x": x}, "QLinearConv", bits == 8)


def test_wide_convs_sum_exactly_past_float32s_integers():
    """Sums far beyond 2**24 (8-bit codes, 1,024 input channels): exact in chunks."""
    rng = np.random.default_rng(7)
    codes = rng.choice([-127, 127], (8, 1024, 3, 3), p=[0.1, 0.9]).astype(np.int8)
    module = integer_ops.QLinearConv(0.1, codes, np.zeros(8), np.full(8, 1e-5), None, 1.0,
                                     128, (0, 255), strides=[1, 1], pads=[1, 1, 1, 1],
                                     dilations=[1, 1], group=1)
    assert len(module.chunks) > 1
    x = torch.from_numpy(rng.choice([-12.8, 12.7], (1, 1024, 5, 5), p=[0.1, 0.9]).astype(
        np.float32))
    with torch.no_grad():
        acc = torch.nn.functional.conv2d(torch.round(x.double() / 0.1),
                                         torch.from_numpy(codes).double(), padding=1)
        assert float(acc.abs().max()) > 2**24
        expected = torch.round(acc.float() * module.multiplier).clamp(-128, 127) * 1.0
        np.testing.assert_array_equal(module(x).numpy(), expected.numpy())


def _every_sum(op: str, quantized_output: bool, scales: tuple[float, float, float]):
    """A ``Conv`` (1x1) or ``Gemm`` whose outputs hold every integer sum in [-65536, 65536):
    input codes 0..255 (zero point 128), weight code 1, and one int32 bias per output channel
    (512 of them, 256 apart). Returns the model, its feeds and the modules' alternatives."""
    x_scale, w_scale, y_scale = scales
    channels = 512
    bias = (np.arange(channels) * 256 - 65536).astype(np.int32)
    codes = np.arange(256, dtype=np.float32)
    weights = {"w": (np.ones((channels, 1) if op == "Gemm" else (channels, 1, 1, 1), np.int8),
                     np.full(channels, w_scale, np.float32), np.zeros(channels, np.int8), 0),
               "b": (bias, np.full(channels, np.float32(x_scale) * np.float32(w_scale),
                                   np.float32), np.zeros(channels, np.int32), 0)}
    grids = {"x": (x_scale, 128), "t": (y_scale, 3)}
    if op == "Gemm":
        model = _qdq_model("Gemm", ["x"], weights, {"transB": 1}, grids, quantized_output,
                           [[None, 1]])
        x = ((codes - 128) * np.float32(x_scale)).reshape(256, 1)
    else:
        model = _qdq_model("Conv", ["x"], weights, {}, grids, quantized_output,
                           [[None, 1, 16, 16]])
        x = ((codes - 128) * np.float32(x_scale)).reshape(1, 1, 16, 16)
    return model, {"x": x.astype(np.float32)}


@pytest.mark.parametrize("scales", [(0.016, 0.0327, 0.1014), (0.125, 0.0625, 0.25)])
@pytest.mark.parametrize(("op", "quantized_output"),
                         [("Gemm", True), ("Gemm", False), ("Conv", True)])
def test_requantization_is_onnxruntimes_for_every_sum(op, quantized_output, scales):
    """Every int32 sum in [-65536, 65536) through onnxruntime's requantization, on scales
    where float32's and float64's multipliers differ, and on scales where sums land on half
    steps (ties round to even)."""
    model, feeds = _every_sum(op, quantized_output, scales)
    _check(model, feeds, "QGemm" if op == "Gemm" else "QLinearConv", False)
    # the test can tell: the float64 multiplier, or rounding half away from zero, differ
    x, w, y = (np.float32(v) for v in scales)
    m32, m64 = x * w / y, np.float32(np.float64(x) * np.float64(w) / np.float64(y))
    sums = np.arange(-65536, 65536).astype(np.float32)
    half = sums * m32
    differs = (np.any(np.rint(half) != np.rint(sums * m64)),
               np.any(np.rint(half) != np.trunc(half + np.copysign(0.5, half))))
    assert differs[0] if scales[0] == 0.016 else differs[1]


@pytest.mark.parametrize("grids", [((0.0356, 210), (0.0575, 242), (0.0172, 63)),
                                   ((0.0157, 107), (0.0296, 110), (0.0358, 170))])
def test_qlinearadd_is_onnxruntimes_for_every_pair_of_codes(grids):
    """All 65,536 pairs of uint8 codes through onnxruntime's fused multiply-adds, on grids where
    the constant part's fused multiply-add (first grids) and its order (second) matter."""
    a_grid, b_grid, y_grid = grids
    model = _qdq_model("Add", ["a", "b"], {}, {}, {"a": a_grid, "b": b_grid, "t": y_grid},
                       True, [[None, 256], [None, 256]])
    codes = np.arange(256, dtype=np.float32)
    feeds = {"a": np.repeat(((codes - a_grid[1]) * np.float32(a_grid[0]))[:, None], 256, 1),
             "b": np.repeat(((codes - b_grid[1]) * np.float32(b_grid[0]))[None, :], 256, 0)}
    _check(model, feeds, "QLinearAdd", False)
    # the test can tell: another constant part gives other codes
    add = integer_ops.QLinearAdd(a_grid, b_grid, y_grid, (0, 255))
    ra, rb, za, zb, zy = np.float32(add.ra), np.float32(add.rb), a_grid[1], b_grid[1], y_grid[1]
    other = (np.float32(zy) - (ra * np.float32(za) + rb * np.float32(zb)) if a_grid[0] > 0.03
             else np.float32(zy) - np.float32(float(rb) * zb + float(ra * np.float32(za))))
    a, b = np.meshgrid(codes.astype(np.float64), codes.astype(np.float64), indexing="ij")

    def codes_with(fixed):
        inner = np.float32(b * add.rb + float(fixed))
        return np.clip(np.rint(np.float32(a * add.ra + inner.astype(np.float64))), 0, 255)

    assert np.any(codes_with(other) != codes_with(add.fixed))


@pytest.mark.parametrize(("shape", "axes", "keepdims"),
                         [((5, 64, 7, 7), [2, 3], 1), ((3, 40, 4, 4), [-1, -2], 0),
                          ((6, 33, 3, 3), [2, 3], 0), ((4, 24, 10), [2], 1)])
def test_reduce_mean_sums_in_onnxruntimes_order(shape, axes, keepdims):
    """A global average pool onnxruntime computes in float: the same bits, row lengths 9-49
    with every alignment of their first element."""
    rng = np.random.default_rng(len(shape) + shape[1])
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)
    graph = helper.make_graph(
        [node], "mean", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(axes, np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = ((rng.integers(0, 256, shape) - 7) * np.float32(0.0173)).astype(np.float32)
    expected = session.run(None, {"x": x})[0]
    got = integer_ops.ReduceMean(axes, keepdims)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, expected)
    # the test can tell: torch's own mean differs in the last bit
    plain = torch.from_numpy(x).mean([a % len(shape) for a in axes], keepdim=bool(keepdims))
    assert not np.array_equal(plain.numpy(), expected)
