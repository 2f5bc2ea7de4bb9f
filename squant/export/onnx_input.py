"""``squant quantize IN.onnx OUT.onnx``: SQuant on the weights of an ONNX model, no PyTorch model.

Every ``Conv``, ``ConvTranspose``, ``Gemm`` and ``MatMul`` whose weight is a float initializer
(or a ``Transpose`` of one, folded into a new initializer) is quantized in one batched
:func:`squant.quantize_weights` call, on its output-channel axis: ``Conv`` 0; ``ConvTranspose``
1, group by group; ``Gemm`` 0 with ``transB`` else 1; ``MatMul`` ``[K, N]`` 1 (quantized as its
``[N, K]`` transpose on axis 0: the same codes, in the layout ``MatMulNBits`` reads). The codes
are then stored by the export writer (:mod:`.graph`, :mod:`.nbits`, :mod:`.qdq`) exactly as
``squant.export_onnx`` stores a PyTorch model's: Linear-like nodes of <= 4 bits as
``MatMulNBits``, others as int8 codes behind ``DequantizeLinear``; with ``act_bits`` the
activations get Q/DQ so that onnxruntime fuses the convs into ``QLinearConv``.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import QuantizationError, first_line
from ..core.options import ActivationOptions, QuantOptions, check_bits
from ..core.tensor import dequantize_codes, quantize_weights
from ..ranges.activations import LAST_LAYER_BITS, paper_range
from .report import ExportReport, LayerExport

LINEAR_OPS = ("Gemm", "MatMul")
LAYERS_KEY = "squant.layers"
MIN_OPSET = 13


@dataclass
class OnnxLayer:
    """One quantized initializer, shaped like squant's quantized modules for the export writer.

    ``name``: the initializer; ``nodes``: the names of the nodes reading it; ``transposed``: the
    initializer holds ``[K, N]`` and ``codes`` its ``[N, K]`` transpose; ``act_*``: the input
    grid when its node's input is quantized.
    """

    name: str
    op: str
    nodes: list[str]
    transposed: bool
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    mode: str
    axis: int
    scheme: str
    granularity: str
    range: str
    group_size: int | None
    groups_of_codes: int = 1
    weight_dtype: torch.dtype = torch.float32
    act_bits: int | None = None
    act_lo: float = 0.0
    act_hi: float = 0.0

    @property
    def act_enabled(self) -> bool:
        return self.act_bits is not None

    def dequantize_weight(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero_point, self.axis,
                                self.groups_of_codes, self.group_size)


@dataclass
class OnnxJob:
    """What :func:`quantize_onnx` did: the report (per layer: ops, integer or float), the
    float-left weight nodes with why, sizes and time."""

    report: ExportReport
    left_float: dict[str, str] = field(default_factory=dict)
    input_bytes: int = 0
    seconds: float = 0.0
    folded_batchnorms: int = 0

    def summary(self, out: object) -> str:
        """What the CLI prints: counts, sizes, the note on float convs, the report table."""
        report = self.report
        dq_float = sum(not r.integer and r.ops.startswith("DequantizeLinear")
                       for r in report.layers)
        lines = [f"{out}: {len(report.layers)} weight initializers quantized "
                 f"({report.integer_layers} run as integer kernels), {len(self.left_float)} "
                 f"weight node(s) left float, {self.folded_batchnorms} BatchNorm(s) folded, "
                 f"{self.input_bytes / 1e6:.2f} MB -> "
                 f"{report.file_bytes / 1e6:.2f} MB in {self.seconds:.1f} s"]
        if dq_float and not any(r.ops.startswith("Q/DQ") for r in report.layers):
            lines.append(f"note: {dq_float} layer(s) store int codes behind DequantizeLinear: "
                         "onnxruntime runs such convs in float unless activations are "
                         "quantized (--act-bits A --input-shape C,H,W)")
        return "\n".join([*lines, str(report)])

    def json(self, source: object, out: object) -> str:
        """The ``--report`` file: per layer bits, ops, integer, reason; nodes left float."""
        rows = {r.name: {"bits": r.bits, "ops": r.ops, "integer": r.integer, "reason": r.reason}
                for r in self.report.layers}
        return json.dumps({"input": str(source), "output": str(out), "seconds": self.seconds,
                           "layers": rows, "left_float": self.left_float}, indent=2) + "\n"


def load_onnx(path: Path):
    """The ONNX model at ``path`` (external data loaded), checked by onnx and onnxruntime.

    Raises:
        QuantizationError: not an ONNX file, truncated, invalid, or a model onnxruntime cannot
            load (an opset or a node kind it lacks), naming the file.
    """
    import onnx
    import onnxruntime as ort
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeWarning, ValueError, OSError) as error:
        raise QuantizationError(
            f"{path}: not a readable ONNX model ({first_line(error)})") from None
    if not model.graph.node:
        raise QuantizationError(f"{path}: not an ONNX model (no graph nodes: not an ONNX "
                                "file, or a truncated one)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:  # per-axis DequantizeLinear
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as error:  # the converter raises C++ errors of several kinds
            raise QuantizationError(f"{path}: opset {opset} could not be converted to "
                                    f"{MIN_OPSET} (per-axis DequantizeLinear): "
                                    f"{first_line(error)}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's Fail/InvalidGraph/NotImplemented
        raise QuantizationError(f"{path}: onnxruntime cannot run this model: "
                                f"{first_line(error)}") from None
    return model


def find_weights(model, path: Path) -> tuple[list[dict], dict[str, str]]:
    """The quantizable weights of ``model`` (Transposes of initializers folded in place) as
    ``[{"name", "op", "nodes", "transposed", "groups"}]`` in graph order, and the weight nodes
    left float with why.

    Raises:
        QuantizationError: a Conv/ConvTranspose/Gemm whose weight is a graph input (named).
    """
    from onnx import TensorProto, helper

    graph = model.graph
    _constants_to_initializers(graph)
    inits = {init.name: init for init in graph.initializer}
    inputs = {info.name for info in graph.input} - set(inits)
    producers = {out: node for node in graph.node for out in node.output}
    found: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        label = node.name or node.output[0]
        weight = node.input[1]
        source = producers.get(weight)
        if source is not None and source.op_type == "Transpose" and source.input[0] in inits:
            weight = _fold_transpose(graph, source, inits)
        if weight in inputs and node.op_type != "MatMul":
            raise QuantizationError(f"{path}: node '{label}' ({node.op_type}) reads its weight "
                                    f"'{weight}' from a graph input, not an initializer: "
                                    "export the model with its weights as initializers")
        if weight not in inits:
            continue  # an activation (attention's MatMul), or a computed weight
        init = inits[weight]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if init.data_type != TensorProto.FLOAT:
            skipped[label] = f"weight '{weight}' is {TensorProto.DataType.Name(init.data_type)}"
            continue
        rank = len(init.dims)
        if (node.op_type in ("Gemm", "MatMul") and rank != 2) or rank < 2:
            skipped[label] = f"weight '{weight}' has {rank} dims"
            continue
        if node.op_type == "Gemm" and attributes.get("transA", 0):
            skipped[label] = "Gemm with transA"
            continue
        if node.op_type == "Gemm" and not attributes.get("transB", 0) and weight not in found \
                and sum(weight in other.input for other in graph.node) == 1:
            _transpose_gemm_weight(node, init)  # B [K, N] -> B.T with transB: MatMulNBits' form
            attributes["transB"] = 1
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm"
                                                   and not attributes.get("transB", 0))
        groups = int(attributes.get("group", 1)) if node.op_type == "ConvTranspose" else 1
        entry = {"name": weight, "op": node.op_type, "nodes": [node.name],
                 "transposed": transposed, "groups": groups}
        if weight in found:
            kept = found[weight]
            if (kept["op"] in LINEAR_OPS) != (node.op_type in LINEAR_OPS) or \
                    kept["transposed"] != transposed or kept["groups"] != groups:
                skipped[label] = f"weight '{weight}' is read in two layouts"
                skipped.update({n: skipped[label] for n in kept["nodes"]})
                del found[weight]
                continue
            kept["nodes"].append(node.name)
        elif label not in skipped:
            found[weight] = entry
    return list(found.values()), skipped


def _transpose_gemm_weight(node, init) -> None:
    """Store a ``Gemm``'s ``B`` (``[K, N]``, ``transB = 0``) as ``B.T`` with ``transB = 1``:
    the same product, its channels on axis 0 as ``MatMulNBits`` reads them."""
    from onnx import helper, numpy_helper

    array = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array.T), init.name))
    kept = [a for a in node.attribute if a.name != "transB"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("transB", 1)])


def _constants_to_initializers(graph) -> None:
    """Turn the ``Constant`` nodes that give a weight op its weight (some exporters, e.g.
    paddle2onnx, store weights so) into initializers of the same name."""
    weight_inputs = {node.input[1] for node in graph.node
                     if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                     and len(node.input) > 1}
    for node in list(graph.node):
        if node.op_type == "Constant" and node.output[0] in weight_inputs \
                and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            graph.node.remove(node)


def _fold_transpose(graph, node, inits: dict) -> str:
    """Replace ``Transpose(initializer)`` by a new initializer holding the transposed array
    (named after the Transpose's output); the Transpose goes when nothing else reads it."""
    from onnx import numpy_helper

    from .graph import drop_initializer

    name = node.output[0]
    if name not in inits:
        array = numpy_helper.to_array(inits[node.input[0]])
        perm = [a.ints for a in node.attribute if a.name == "perm"]
        folded = np.ascontiguousarray(np.transpose(array, list(perm[0]) if perm else None))
        inits[name] = numpy_helper.from_array(folded, name)
        graph.initializer.append(inits[name])
        graph.node.remove(node)
        drop_initializer(graph, node.input[0])
    return name


def _matches(pattern: str, entry: dict) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in (entry["name"], *entry["nodes"]))


def quantize_layers(model, entries: list[dict], options: QuantOptions, skip: Sequence[str],
                    layer_bits: Mapping[str, int]) -> dict[str, OnnxLayer]:
    """Quantize the weights of ``entries`` (not matched by ``skip``) in one batched call:
    bits from the first ``layer_bits`` pattern matching a node or initializer name, else
    ``options.bits``. Every pattern must match some weight (typos must not pass)."""
    from onnx import numpy_helper

    for pattern in [*skip, *layer_bits]:
        if not any(_matches(pattern, e) for e in entries):
            names = ", ".join(e["name"] for e in entries[:10])
            raise QuantizationError(f"pattern {pattern!r} matches no quantizable node or "
                                    f"initializer (they are: {names or 'none'})")
    for pattern, bits in layer_bits.items():
        check_bits(bits, f"--layer-bits {pattern!r}")
    inits = {init.name: init for init in model.graph.initializer}
    chosen = [e for e in entries if not any(_matches(p, e) for p in skip)]
    arrays, bits, axes, names, owner = [], [], [], [], []
    for index, entry in enumerate(chosen):
        array = numpy_helper.to_array(inits[entry["name"]])
        width = next((b for p, b in layer_bits.items() if _matches(p, entry)), options.bits)
        if entry["transposed"]:
            array = array.T
        blocks = np.split(array, entry["groups"]) if entry["groups"] > 1 else [array]
        for block in blocks:
            arrays.append(np.ascontiguousarray(block, dtype=np.float32))
            bits.append(width)
            axes.append(1 if entry["op"] == "ConvTranspose" else 0)
            names.append(entry["name"])
            owner.append(index)
    results = quantize_weights(arrays, bits, options.mode, axes, scheme=options.scheme,
                               granularity=options.granularity, range=options.range,
                               group_size=options.group_size, names=names)
    layers = {}
    for index, entry in enumerate(chosen):
        parts = [r for r, o in zip(results, owner) if o == index]
        first = parts[0]
        layers[entry["name"]] = OnnxLayer(
            entry["name"], entry["op"], entry["nodes"], entry["transposed"],
            torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
            torch.cat([p.zero_point for p in parts]), first.bits, first.mode, first.axis,
            first.scheme, first.granularity, first.range, first.group_size, len(parts))
    return layers


def activation_feeds(model, path: Path, input_shape: Sequence[int] | None,
                     options: ActivationOptions) -> dict[str, np.ndarray]:
    """The data-free calibration batch: ``options.calibration_batch`` uniform [0, 1) samples
    seeded by ``options.seed`` (as :func:`squant.quantize`) of the one float graph input, of
    shape ``input_shape`` or the input's own static shape.

    Raises:
        QuantizationError: several or no float inputs, or dynamic dims without ``input_shape``.
    """
    from onnx import TensorProto

    inits = {init.name for init in model.graph.initializer}
    inputs = [info for info in model.graph.input if info.name not in inits]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise QuantizationError(f"{path}: --act-bits needs a model with one float input, got "
                                f"{', '.join(i.name for i in inputs) or 'none'}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(input_shape) if input_shape else tuple(d.dim_value for d in dims[1:])
    if not shape or not all(d > 0 for d in shape):
        raise QuantizationError(f"{path}: input '{inputs[0].name}' has dynamic dims: give "
                                "--input-shape (e.g. 3,224,224, without the batch dim)")
    if len(shape) != len(dims) - 1:
        raise QuantizationError(f"{path}: --input-shape {shape} has {len(shape)} dims, input "
                                f"'{inputs[0].name}' has {len(dims) - 1} besides the batch")
    generator = torch.Generator().manual_seed(options.seed)
    batch = torch.rand((options.calibration_batch, *shape), generator=generator)
    return {inputs[0].name: batch.numpy()}


def set_activation_grids(model, layers: dict[str, OnnxLayer], feeds: dict[str, np.ndarray],
                         act_bits: int, sigma: float | None) -> list[str]:
    """Give every quantized layer but the first (graph order) an input grid: ``act_bits``, the
    last 8 bits (as :func:`squant.quantize`), range by the paper's rule on the float model's
    activations for ``feeds``. Only one-node, per-channel layers can be fused by onnxruntime;
    returns their names."""
    from .qdq import float_tensors

    nodes = {node.name: (index, node) for index, node in enumerate(model.graph.node)}
    order = sorted(layers, key=lambda name: min(nodes[n][0] for n in layers[name].nodes))
    chosen = [name for name in order[1:] if len(layers[name].nodes) == 1
              and layers[name].group_size is None and layers[name].groups_of_codes == 1]
    inputs = {name: nodes[layers[name].nodes[0]][1].input[0] for name in chosen}
    values = float_tensors(model, feeds, set(inputs.values()))
    for name in chosen:
        bits = LAST_LAYER_BITS if name == order[-1] else act_bits
        lo, hi = paper_range(torch.from_numpy(values[inputs[name]]), bits, sigma)
        layer = layers[name]
        layer.act_bits, layer.act_lo, layer.act_hi = bits, float(lo), float(hi)
    return chosen


def free_batch(model) -> dict[str, int]:
    """Make dim 0 of the graph's inputs and outputs dynamic (the calibration batch has
    ``calibration_batch`` samples); returns the fixed sizes to restore afterwards."""
    fixed = {}
    for info in [*model.graph.input, *model.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            fixed[info.name] = dims[0].dim_value
            dims[0].dim_param = "squant_batch"
    del model.graph.value_info[:]
    return fixed


def restore_batch(model, fixed: dict[str, int]) -> None:  # undo free_batch
    for info in [*model.graph.input, *model.graph.output]:
        if info.name in fixed:
            info.type.tensor_type.shape.dim[0].dim_value = fixed[info.name]


def layers_metadata(results: Sequence[LayerExport]) -> str:
    """The per-layer report as JSON, stored in the file for ``squant inspect``."""
    return json.dumps([[r.name, r.bits, r.ops, r.integer, r.reason] for r in results])


def stopwatch() -> float:
    return time.perf_counter()
