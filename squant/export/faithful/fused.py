"""The groups of a QDQ file that onnxruntime's CPU provider fuses into integer kernels.

onnxruntime's QDQ transformers turn ``DequantizeLinear → Conv → QuantizeLinear`` into
``QLinearConv``, ``DequantizeLinear → Gemm [→ QuantizeLinear]`` into ``QGemm``,
``DequantizeLinear → MatMul → QuantizeLinear`` into ``QLinearMatMul`` and ``DequantizeLinear ×
2 → Add → QuantizeLinear`` into ``QLinearAdd``, when the weights and biases are constants and the
op's output feeds one ``QuantizeLinear`` (or, for ``Gemm``, stays float). :func:`fused_groups`
finds those groups in the file and builds, for each, the module of :mod:`.integer_ops` that
computes it, and one for each float ``ReduceMean`` reading a ``DequantizeLinear`` (its sum's
order decides its last bit); other ops (``MaxPool`` on codes, ``Reshape``...) compute what
float ops between fake-quantizers compute.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from . import integer_ops

_UINT8 = (0, 255)


@dataclass
class FusedGroup:
    """One fused group: the tensor it computes (``output``: the name the file quantizes, or a
    float ``Gemm``'s output), the tensors its quantized inputs dequantize (``inputs``: the
    names the file's ``QuantizeLinear`` nodes read), and the module computing it from their
    dequantized values."""

    kind: str
    output: str
    inputs: tuple[str, ...]
    module: nn.Module
    # the module computes the float value before the file's QuantizeLinear, if any (a float
    # ReduceMean), rather than the dequantized output codes
    before_quantize: bool = False


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute:
                value = helper.get_attribute_value(node.attribute[0])
                if isinstance(value, onnx.TensorProto):
                    self.constants[node.output[0]] = numpy_helper.to_array(value)
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {out.name for out in graph.output}

    def grid(self, node: onnx.NodeProto) -> tuple[float, int] | None:
        """``(scale, zero_point)`` of a per-tensor uint8 Q/DQ node, else None."""
        scale = self.constants.get(node.input[1])
        zero = (self.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2]
                else np.uint8(0))
        if scale is None or zero is None or scale.size != 1 or zero.dtype != np.uint8:
            return None
        return float(scale.reshape(())), int(zero.reshape(()))

    def activation(self, name: str) -> tuple[str, float, int] | None:
        """For a tensor made by ``DequantizeLinear(QuantizeLinear(t))`` with one uint8 grid:
        ``(t, scale, zero_point)``."""
        dequantize = self.producer.get(name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return None
        quantize = self.producer.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            return None
        grid, again = self.grid(dequantize), self.grid(quantize)
        if grid is None or grid != again:
            return None
        return (quantize.input[0], *grid)

    def weight(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(codes, scale, zero_point)`` of a constant per-tensor or axis-0 per-channel
        ``DequantizeLinear`` output."""
        dequantize = self.producer.get(name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return None
        codes = self.constants.get(dequantize.input[0])
        scale = self.constants.get(dequantize.input[1])
        zero = (self.constants.get(dequantize.input[2]) if len(dequantize.input) > 2
                and dequantize.input[2] else np.zeros_like(scale, np.int8))
        attributes = {a.name: helper.get_attribute_value(a) for a in dequantize.attribute}
        if (codes is None or scale is None or zero is None or attributes.get("block_size", 0)
                or codes.dtype not in (np.int8, np.uint8, np.int32)):
            return None
        if scale.size > 1 and attributes.get("axis", 1) not in (0, -codes.ndim):
            return None
        return codes, scale.reshape(-1), zero.reshape(-1)

    def quantized_output(self, node: onnx.NodeProto) -> tuple[str, float, int] | None:
        """``(tensor, scale, zero_point)`` when ``node``'s output feeds only one uint8
        ``QuantizeLinear``."""
        out = node.output[0]
        readers = self.consumers.get(out, [])
        if out in self.outputs or len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            return None
        grid = self.grid(readers[0])
        return None if grid is None else (out, *grid)


def fused_groups(model: onnx.ModelProto) -> list[FusedGroup]:
    """The groups of the QDQ ``model`` onnxruntime runs as integer kernels (see the module
    docstring), in graph order."""
    graph = _Graph(model)
    groups = []
    for node in model.graph.node:
        build = _BUILDERS.get(node.op_type)
        group = build(graph, node) if build else None
        if group is not None:
            groups.append(group)
    return groups


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _bias(graph: _Graph, node: onnx.NodeProto, index: int) -> tuple[bool, np.ndarray | None]:
    """``(ok, int32 bias codes or None)`` of input ``index``."""
    if len(node.input) <= index or not node.input[index]:
        return True, None
    found = graph.weight(node.input[index])
    if found is None or found[0].dtype != np.int32 or np.any(found[2]):
        return False, None
    return True, found[0].astype(np.int64)


def _conv(graph: _Graph, node: onnx.NodeProto) -> FusedGroup | None:
    x, w, out = (graph.activation(node.input[0]), graph.weight(node.input[1]),
                 graph.quantized_output(node))
    ok, bias = _bias(graph, node, 2)
    attributes = _attributes(node)
    if (x is None or w is None or out is None or not ok or w[0].ndim != 4
            or attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    module = integer_ops.QLinearConv(
        x[1], w[0], w[2], w[1], bias, out[1], out[2], _UINT8,
        strides=attributes.get("strides", [1, 1]), pads=attributes.get("pads", [0, 0, 0, 0]),
        dilations=attributes.get("dilations", [1, 1]), group=attributes.get("group", 1))
    return FusedGroup("QLinearConv", out[0], (x[0],), module)


def _gemm(graph: _Graph, node: onnx.NodeProto) -> FusedGroup | None:
    x, w = graph.activation(node.input[0]), graph.weight(node.input[1])
    ok, bias = _bias(graph, node, 2)
    attributes = _attributes(node)
    if (x is None or w is None or not ok or w[0].ndim != 2 or attributes.get("transA", 0)
            or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0):
        return None
    codes = w[0] if attributes.get("transB", 0) else w[0].T
    if w[1].size > 1 and not attributes.get("transB", 0):
        return None  # per-channel scales on axis 0 of a (in, out) weight: not per output
    out = graph.quantized_output(node)
    if out is None:  # a float output: QGemm scales its sums
        return FusedGroup("QGemm", node.output[0], (x[0],), integer_ops.QGemm(
            x[1], codes, w[2], w[1], bias, None, 0, _UINT8))
    return FusedGroup("QGemm", out[0], (x[0],), integer_ops.QGemm(
        x[1], codes, w[2], w[1], bias, out[1], out[2], _UINT8))


def _matmul(graph: _Graph, node: onnx.NodeProto) -> FusedGroup | None:
    x, w, out = (graph.activation(node.input[0]), graph.weight(node.input[1]),
                 graph.quantized_output(node))
    if x is None or w is None or out is None or w[0].ndim != 2 or w[1].size > 1:
        return None  # per-channel scales of a MatMul weight (in, out) lie on axis 1
    return FusedGroup("QLinearMatMul", out[0], (x[0],), integer_ops.QGemm(
        x[1], w[0].T, w[2], w[1], None, out[1], out[2], _UINT8))


def _add(graph: _Graph, node: onnx.NodeProto) -> FusedGroup | None:
    a, b, out = (graph.activation(node.input[0]), graph.activation(node.input[1]),
                 graph.quantized_output(node))
    if a is None or b is None or out is None:
        return None
    return FusedGroup("QLinearAdd", out[0], (a[0], b[0]), integer_ops.QLinearAdd(
        a[1:], b[1:], out[1:], _UINT8))


def _reduce_mean(graph: _Graph, node: onnx.NodeProto) -> FusedGroup | None:
    x = graph.activation(node.input[0])
    attributes = _attributes(node)
    axes = (graph.constants.get(node.input[1]) if len(node.input) > 1 and node.input[1]
            else attributes.get("axes"))
    if x is None or axes is None or not len(np.atleast_1d(axes)):
        return None
    return FusedGroup("ReduceMean", node.output[0], (x[0],), integer_ops.ReduceMean(
        [int(a) for a in np.atleast_1d(axes)], attributes.get("keepdims", 1)), True)


_BUILDERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul, "Add": _add,
             "ReduceMean": _reduce_mean}
