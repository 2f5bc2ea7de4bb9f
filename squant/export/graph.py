"""Graph surgery on an ONNX model: find each quantized layer's weight, swap it for its codes.

The float model is exported by torch (``squant.dequantize`` then ``torch.onnx.export``), so
each quantized layer's weight appears as a float initializer equal to squant's dequantized
weight, or to its transpose (a Linear on 3-D inputs becomes ``MatMul`` with the weight folded to
``(in, out)``). Initializers are found by value, not by name, because the exporter renames folded
constants.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .weights import WeightCodes

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# Debugging metadata torch's exporter (and onnxscript's optimizer) attach to nodes and values.
_EXPORTER_DEBUG_KEYS = ("pkg.torch.", "pkg.onnxscript.", "namespace")


def drop_exporter_debug_info(model: onnx.ModelProto) -> int:
    """Remove, in place, the debugging metadata torch's dynamo exporter attaches to every node
    and value: ``pkg.torch.*`` (stack traces holding the exporting machine's file paths, fx node
    dumps, module scopes and class hierarchies), ``namespace``, and onnxscript's rewrite-rule
    names. Runtimes ignore them; on MobileNetV2 they are 116 KB, 3% of its 8-bit file. Other
    metadata, and the model's own properties, are kept. Subgraphs and functions included.
    Returns the number of entries removed."""
    removed = 0
    graphs = [model.graph]
    owners: list = []
    while graphs:
        graph = graphs.pop()
        owners += [*graph.node, *graph.input, *graph.output, *graph.value_info,
                   *graph.initializer]
        for node in graph.node:
            for attribute in node.attribute:
                graphs += [attribute.g] if attribute.HasField("g") else []
                graphs += list(attribute.graphs)
    for function in model.functions:
        owners += list(function.node)
    for owner in owners:
        kept = [prop for prop in owner.metadata_props
                if not prop.key.startswith(_EXPORTER_DEBUG_KEYS)]
        removed += len(owner.metadata_props) - len(kept)
        del owner.metadata_props[:]
        owner.metadata_props.extend(kept)
    return removed


@dataclass
class LayerSite:
    """Where a quantized layer's weight sits in the graph.

    ``initializer``: the float initializer's name; ``transposed``: it holds the weight's
    transpose (``(in, out)``); ``nodes``: the nodes reading it (usually one).
    """

    initializer: str
    transposed: bool
    nodes: list[onnx.NodeProto]


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()


def find_sites(model: onnx.ModelProto, weights: dict[str, np.ndarray],
               renamed: dict[str, str] | None = None) -> dict[str, LayerSite]:
    """``{layer name: site}`` for each float weight of ``weights`` found in ``model`` (or, for
    the layers of ``renamed``, at the initializer it names); a weight the exporter transformed
    (split, reordered, computed) has no site."""
    renamed = renamed or {}
    by_digest: dict[str, str] = {}
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and len(init.dims) >= 2:
            by_digest.setdefault(_digest(numpy_helper.to_array(init)), init.name)
    consumers = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    sites = {}
    for layer, weight in weights.items():
        name, transposed = renamed.get(layer) or by_digest.get(_digest(weight)), False
        if name is None and weight.ndim == 2:
            name, transposed = by_digest.get(_digest(weight.T)), True
        if name is not None and consumers[name]:
            sites[layer] = LayerSite(name, transposed, consumers[name])
    return sites


def missing_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
    """The layers of ``weights`` whose float weight is no initializer of ``model`` as is."""
    digests = {_digest(numpy_helper.to_array(init)) for init in model.graph.initializer
               if init.data_type == TensorProto.FLOAT and len(init.dims) >= 2}
    return {layer: weight for layer, weight in weights.items()
            if _digest(weight) not in digests
            and not (weight.ndim == 2 and _digest(weight.T) in digests)}


def in_layout(codes: WeightCodes, site: LayerSite) -> WeightCodes:
    """``codes`` in the initializer's layout (transposed for a folded ``x @ W.T``)."""
    return codes.transposed() if site.transposed else codes


def replace_with_dequantize(model: onnx.ModelProto, layer: str, site: LayerSite,
                            codes: WeightCodes) -> None:
    """Store ``codes`` (int8), ``scale`` and ``zero_point`` and let a ``DequantizeLinear`` give
    the readers of the float initializer their weight; the float initializer is dropped."""
    codes = in_layout(codes, site)
    scale, zero, attributes = codes.onnx_params()
    prefix = layer if layer.endswith("weight") else f"{layer}.weight"
    graph = model.graph
    graph.initializer.extend([
        numpy_helper.from_array(codes.codes, f"{prefix}_quantized"),
        numpy_helper.from_array(scale, f"{prefix}_scale"),
        # One zero-point initializer per layer: onnxruntime's x64quantprecision sessions fail
        # on zero points shared between DequantizeLinear nodes (DEPLOY_NOTES.md, B6).
        numpy_helper.from_array(zero, f"{prefix}_zero_point"),
    ])
    output = f"{prefix}_dequantized"
    node = helper.make_node("DequantizeLinear",
                            [f"{prefix}_quantized", f"{prefix}_scale", f"{prefix}_zero_point"],
                            [output], name=f"{prefix}_DequantizeLinear", **attributes)
    _rewire(graph, site.initializer, output)
    _insert_before(graph, site.nodes[0], node)
    drop_initializer(graph, site.initializer)


def replace_with_matmul_nbits(model: onnx.ModelProto, layer: str, site: LayerSite,
                              packed: tuple, accuracy_level: int) -> bool:
    """Turn the one ``Gemm``/``MatMul`` reading a Linear's weight into ``com.microsoft.MatMulNBits``
    (+ ``Add`` of the bias). False, changing nothing, when the node is not a plain ``x @ W.T``
    (``Gemm`` with ``transA``, ``alpha``/``beta`` != 1, or several readers)."""
    if len(site.nodes) != 1:
        return False
    node = site.nodes[0]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        if (attributes.get("transA", 0) or not attributes.get("transB", 0)
                or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0):
            return False
    elif node.op_type != "MatMul" or node.input[1] != site.initializer or not site.transposed:
        return False
    weight, scale, zero, block, bits = packed
    n = weight.shape[0]
    k = int(next(i for i in model.graph.initializer if i.name == site.initializer).dims[
        0 if site.transposed else 1])
    prefix = layer if layer.endswith("weight") else f"{layer}.weight"
    model.graph.initializer.extend([
        numpy_helper.from_array(weight, f"{prefix}_packed"),
        numpy_helper.from_array(scale, f"{prefix}_scale"),
        numpy_helper.from_array(zero, f"{prefix}_zero_point"),
    ])
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
    product = f"{prefix}_matmul" if bias else node.output[0]
    new_nodes = [helper.make_node(
        "MatMulNBits", [node.input[0], f"{prefix}_packed", f"{prefix}_scale",
                        f"{prefix}_zero_point"],
        [product], name=f"{prefix}_MatMulNBits", domain="com.microsoft",
        K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)]
    if bias:
        new_nodes.append(helper.make_node("Add", [product, bias], [node.output[0]],
                                          name=f"{prefix}_bias_Add"))
    graph = model.graph
    index = list(graph.node).index(node)
    del graph.node[index]
    for offset, new in enumerate(new_nodes):
        graph.node.insert(index + offset, new)
    drop_initializer(graph, site.initializer)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return True


def set_weight(model: onnx.ModelProto, site: LayerSite, codes: WeightCodes) -> None:
    """Make the float initializer at ``site`` hold the weight ``codes`` dequantize to (for
    channels re-quantized on export)."""
    weight = codes.dequantize()
    array = weight.T.copy() if site.transposed else weight
    for index, init in enumerate(model.graph.initializer):
        if init.name == site.initializer:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, init.name))
            return


def drop_initializer(graph: onnx.GraphProto, name: str) -> None:
    """Remove the initializer ``name`` once no node reads it."""
    if any(name in node.input for node in graph.node):
        return
    for index, init in enumerate(graph.initializer):
        if init.name == name:
            del graph.initializer[index]
            return


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def _insert_before(graph: onnx.GraphProto, anchor: onnx.NodeProto,
                   node: onnx.NodeProto) -> None:
    graph.node.insert(list(graph.node).index(anchor), node)


def activation_bounds(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """``{tensor: (low, high)}`` for the output of every ``Relu`` (``(0, inf)``) and every
    ``Clip`` with constant bounds (``ReLU6``: ``(0, 6)``) of ``model``."""
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            value = helper.get_attribute_value(node.attribute[0])
            if isinstance(value, onnx.TensorProto):
                constants[node.output[0]] = numpy_helper.to_array(value)
    bounds = {}
    for node in model.graph.node:
        if node.op_type == "Relu":
            bounds[node.output[0]] = (0.0, np.inf)
        elif node.op_type == "Clip":
            ends = [constants.get(name) if name else None for name in list(node.input[1:3])]
            ends += [None] * (2 - len(ends))
            if all(end is None or end.size == 1 for end in ends):
                bounds[node.output[0]] = (
                    -np.inf if ends[0] is None else float(ends[0]),
                    np.inf if ends[1] is None else float(ends[1]))
    return bounds


def bounded(tensor: str, lo: float, hi: float, bounds: dict[str, tuple[float, float]]
             ) -> tuple[float, float]:
    """``[lo, hi]`` cut to the bounds of the activation that computes ``tensor`` (0 kept)."""
    low, high = bounds.get(tensor, (-np.inf, np.inf))
    return max(lo, min(low, 0.0)), min(hi, max(high, 0.0))
