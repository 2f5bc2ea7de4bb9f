"""``squant quantize IN.onnx OUT.onnx`` and ``squant inspect OUT.onnx``: the steps of
:mod:`.onnx_input` put together, and the export writer's storage of the codes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..core.errors import QuantizationError, first_line
from ..core.options import ActivationOptions, QuantOptions
from ..io.file_io import atomic_path
from .onnx_input import (
    LAYERS_KEY,
    LINEAR_OPS,
    OnnxJob,
    OnnxLayer,
    activation_feeds,
    find_weights,
    free_batch,
    layers_metadata,
    load_onnx,
    quantize_layers,
    restore_batch,
    set_activation_grids,
    stopwatch,
)
from .onnx_int4 import to_uint4, with_int4_opset
from .report import ExportReport, LayerExport

EXTERNAL_DATA_BYTES = 1 << 30  # models above this (or read with external data) write it too
NBITS_MAX_BITS = 4
UINT4_MAX_BITS = 4


def quantize_onnx(source: str | os.PathLike, output: str | os.PathLike,
                  options: QuantOptions, *, skip: Sequence[str] = (),
                  layer_bits: Mapping[str, int] | None = None, act_bits: int | None = None,
                  input_shape: Sequence[int] | None = None, accuracy_level: int = 4,
                  activation: ActivationOptions | None = None,
                  report_path: str | os.PathLike | None = None) -> OnnxJob:
    """Quantize the weights of the ONNX model ``source`` with SQuant and write ``output``.

    Args:
        source, output: ``.onnx`` paths (``output`` replaced atomically; with external data its
            ``OUT.onnx.data`` beside it).
        options: bits, mode, scheme, granularity, range, group_size for every weight.
        skip, layer_bits: fnmatch patterns of node or initializer names left float, or given
            other bits (first match wins).
        act_bits: also quantize activations (data-free, the paper's ranges on squant's
            calibration batch through the float model) so onnxruntime runs convs as
            ``QLinearConv``; ``input_shape`` (no batch dim) for models with dynamic dims.
        accuracy_level: ``MatMulNBits``' (4: int8 activations on the fly; 0: float).
        activation: calibration batch, seed and sigma (default :class:`ActivationOptions`'s).
        report_path: also write :meth:`OnnxJob.json` there (its temporary written before
            ``output`` is renamed into place: a report that cannot be written leaves neither).

    Returns:
        An :class:`OnnxJob` with the :class:`ExportReport` (per layer: ops, integer or float).

    Raises:
        QuantizationError: an unreadable, invalid or unsupported model, a weight that is a graph
            input, no quantizable weight, a bad pattern or option (named).
    """
    from .onnx_export import CONFIG_KEY, optimized_ops, require_onnx

    require_onnx()
    import onnx

    start = stopwatch()
    source, output = Path(source), Path(output)
    model = load_onnx(source)
    external = any(init.data_location == onnx.TensorProto.EXTERNAL
                   for init in onnx.load(str(source), load_external_data=False).graph.initializer)
    if min([options.bits, *(layer_bits or {}).values()]) <= UINT4_MAX_BITS:
        model = with_int4_opset(model)
    listed = {info.name for info in model.graph.input} & {  # IR < 4: initializers as inputs
        init.name for init in model.graph.initializer}
    folded_bn = fold_batchnorms(model)
    entries, left = find_weights(model, source)
    if not entries:
        raise QuantizationError(f"{source}: no Conv, ConvTranspose, Gemm or MatMul reads a "
                                "float initializer weight: nothing to quantize")
    if options.group_size is not None:  # output channels on axis 1: no blocked DQ form
        for entry in [e for e in entries if e["op"] == "ConvTranspose"]:
            entries.remove(entry)
            left.update({node: "group-wise grids of a ConvTranspose have no DequantizeLinear "
                         "form" for node in entry["nodes"]})
    layers = quantize_layers(model, entries, options, skip, dict(layer_bits or {}))
    left.update({node: "skipped (--skip)" for e in entries if e["name"] not in layers
                 for node in e["nodes"]})
    active: list[str] = []
    if act_bits is not None:
        activation = activation or ActivationOptions(act_bits, tuple(input_shape or (1,)))
        feeds = activation_feeds(model, source, input_shape, activation)
        fixed = free_batch(model)
        try:
            active = set_activation_grids(model, layers, feeds, act_bits, activation.sigma)
        except Exception as error:  # onnxruntime's errors: a batch the graph cannot take
            raise QuantizationError(
                f"{source}: the calibration batch of shape {next(iter(feeds.values())).shape} "
                f"does not run through the model: {first_line(error)}") from None
    model, results = _store(model, layers, active, accuracy_level,
                            feeds if active else None)
    if act_bits is not None:
        restore_batch(model, fixed)
    packed = set(to_uint4(model, {_prefix(name) + "_quantized" for name, layer in layers.items()
                                  if layer.bits <= UINT4_MAX_BITS}))
    results = [replace(r, ops=r.ops.replace("DequantizeLinear", "DequantizeLinear (uint4)"))
               if _prefix(r.name) + "_quantized" in packed else r for r in results]
    kept = {init.name for init in model.graph.initializer}
    for info in [info for info in model.graph.input if info.name in listed - kept]:
        model.graph.input.remove(info)
    config = {"session.x64quantprecision": "1"} if any(layers[n].bits > 7 for n in active) \
        else {} if active else {"session.disable_quant_qdq": "1"}
    if accuracy_level != 4:  # onnxruntime's own DequantizeLinear -> MatMul rewrite: the same
        config["session.qdq_matmulnbits_accuracy_level"] = str(accuracy_level)
    onnx.helper.set_model_props(model, {CONFIG_KEY: json.dumps(config),
                                        "squant.producer": "squant quantize (ONNX input)",
                                        LAYERS_KEY: layers_metadata(results)})
    report = ExportReport(str(output), results, session_config=config)
    big = external or model.ByteSize() > EXTERNAL_DATA_BYTES
    job = OnnxJob(report, left, _bytes(source), 0.0, folded_bn)
    with contextlib.ExitStack() as stack:
        report_file = stack.enter_context(atomic_path(Path(report_path))) if report_path \
            else None
        with _atomic_onnx(output, big) as temporary:
            _save(model, temporary, big)
            report.optimized_ops = optimized_ops(temporary, config)
            job.seconds = stopwatch() - start
            if report_file:
                report_file.write_text(job.json(source, output))
    report.file_bytes = _bytes(output)
    return job


def _store(model, layers: dict[str, OnnxLayer], active: list[str], accuracy_level: int,
           feeds) -> tuple[object, list[LayerExport]]:
    """Put each layer's codes in ``model``: Q/DQ for ``active`` (onnxruntime's quantizer told
    squant's codes and grids), ``MatMulNBits`` or ``DequantizeLinear`` for the others."""
    from . import graph, nbits, qdq, weights
    from .onnx_export import _fused_layer
    from .torch_export import quiet

    codes = {name: weights.weight_codes(name, layer) for name, layer in layers.items()
             if layer.groups_of_codes == 1}
    sites = _sites(model, layers)
    for name in codes:  # onnxruntime's quantizer rounds the weight it finds: give it squant's
        if codes[name].widened or name in active:
            graph.set_weight(model, sites[name], codes[name])
    results: dict[str, LayerExport] = {}
    if active:
        with quiet():
            grids = {name: (float(layers[name].act_lo), float(layers[name].act_hi),
                            int(layers[name].act_bits)) for name in active}
            model = qdq.quantize_qdq(model, codes, sites, grids, [feeds], "paper")
        for name in active:
            results[name] = _fused_layer(model, name, layers[name], codes[name], sites[name])
        sites = _sites(model, {n: layer for n, layer in layers.items() if n not in results})
    for name, layer in layers.items():
        if name in results:
            continue
        if name not in codes:  # a grouped ConvTranspose: channels on two axes
            results[name] = _grouped_conv_transpose(model, name, layer, sites[name])
            continue
        site = sites[name]
        if layer.op in LINEAR_OPS and layer.bits <= NBITS_MAX_BITS:
            packed = nbits.matmul_nbits_weight(layer)
            if packed is not None and graph.replace_with_matmul_nbits(model, name, site, packed,
                                                                      accuracy_level):
                results[name] = LayerExport(name, layer.bits, "MatMulNBits", accuracy_level > 0,
                                            f"{packed[4]}-bit weights, accuracy_level "
                                            f"{accuracy_level}")
                continue
        graph.replace_with_dequantize(model, name, site, codes[name])
        op = layer.op
        if active:
            reason = ("squant keeps the first layer's input float" if layer.act_bits is None
                      and name == next(iter(layers)) else "onnxruntime cannot fuse it (several "
                      "readers or group-wise grids): its input stays float")
        else:
            reason = ("weight-only: onnxruntime folds the DequantizeLinear into a float weight "
                      "(session.disable_quant_qdq) and runs it in float unless activations "
                      "are quantized (--act-bits)")
        integer = False
        results[name] = LayerExport(name, layer.bits, f"DequantizeLinear → {op}", integer,
                                    reason)
    return model, [results[name] for name in layers]


def fold_batchnorms(model) -> int:
    """Fold each inference ``BatchNormalization`` that alone reads a ``Conv``'s output into that
    conv's weight and bias (``W k``, ``(b - mean) k + beta``, ``k = gamma / sqrt(var + eps)``
    per channel), as deployed models and ``squant.export_onnx``'s exporter have them: the
    weights quantized are the deployed ones, and with ``--act-bits`` no float BatchNorm sits
    between Q/DQ pairs. Returns how many were folded.
    """
    from onnx import numpy_helper

    graph = model.graph
    values = {init.name: init for init in graph.initializer}
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"
                 and len(node.attribute) == 1 and node.attribute[0].name == "value"}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}

    def array(name: str):
        if name in values:
            return numpy_helper.to_array(values[name])
        if name in constants:
            return numpy_helper.to_array(constants[name].attribute[0].t)
        return None

    count, unread = 0, set()
    for bn in [node for node in graph.node if node.op_type == "BatchNormalization"]:
        conv = producers.get(bn.input[0])
        attributes = {a.name: a for a in bn.attribute}
        if conv is None or conv.op_type != "Conv" or len(bn.output) != 1 or (
                "training_mode" in attributes and attributes["training_mode"].i):
            continue
        weight = array(conv.input[1])
        params = [array(name) for name in bn.input[1:5]]
        bias = array(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if (weight is None or weight.dtype != np.float32 or any(p is None for p in params)
                or len(readers[conv.output[0]]) != 1 or len(readers[conv.input[1]]) != 1
                or (len(conv.input) > 2 and conv.input[2] and bias is None)):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        epsilon = attributes["epsilon"].f if "epsilon" in attributes else 1e-5
        k = gamma / np.sqrt(var + epsilon)
        shape = (-1,) + (1,) * (weight.ndim - 1)
        new_weight = (weight.astype(np.float64) * k.reshape(shape)).astype(np.float32)
        new_bias = (((bias if bias is not None else 0.0) - mean) * k + beta).astype(np.float32)
        weight_name, bias_name = conv.input[1], f"{bn.output[0]}_folded_bias"
        if weight_name in constants:
            graph.node.remove(constants.pop(weight_name))
        elif weight_name in values:
            graph.initializer.remove(values.pop(weight_name))
        values[weight_name] = numpy_helper.from_array(new_weight, weight_name)
        values[bias_name] = numpy_helper.from_array(new_bias, bias_name)
        graph.initializer.extend([values[weight_name], values[bias_name]])
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)
        unread.update(bn.input[1:5])
        count += 1
    still_read = {name for node in graph.node for name in node.input}
    for name in unread - still_read:
        if name in values:
            graph.initializer.remove(values.pop(name))
        elif name in constants:
            graph.node.remove(constants.pop(name))
    return count


def _grouped_conv_transpose(model, name: str, layer: OnnxLayer, site) -> LayerExport:
    """A grouped ConvTranspose weight ``(C, M/g, *k)`` whose channels are (group, j): its codes
    regrouped to ``(C/g, g * M/g, *k)`` (one channel axis, 1) behind a ``DequantizeLinear``,
    then ``Reshape -> Transpose -> Reshape`` back to the weight's layout (onnxruntime folds
    them into a float weight)."""
    from onnx import helper, numpy_helper

    from . import graph, weights

    if layer.group_size is not None:
        return LayerExport(name, layer.bits, "float initializer", False, "group-wise grids "
                           "of a grouped ConvTranspose have no DequantizeLinear form: left float")
    groups, shape = layer.groups_of_codes, list(layer.codes.shape)
    per_group, kernel = shape[0] // groups, shape[2:]
    regrouped = layer.codes.reshape(groups, per_group, *shape[1:]).transpose(0, 1).reshape(
        per_group, groups * shape[1], *kernel)
    codes = weights.weight_codes(name, replace(layer, codes=regrouped, groups_of_codes=1))
    graph.replace_with_dequantize(model, name, site, codes)
    prefix = _prefix(name)
    dequantized = f"{prefix}_dequantized"
    steps = [("Reshape", [per_group, groups, shape[1], *kernel]),
             ("Transpose", [1, 0, *range(2, 1 + len(shape))]), ("Reshape", shape)]
    nodes, current = [], dequantized
    for index, (op, values) in enumerate(steps):
        out = f"{prefix}_regrouped_{index}"
        if op == "Reshape":
            model.graph.initializer.append(numpy_helper.from_array(
                np.array(values, dtype=np.int64), f"{out}_shape"))
            nodes.append(helper.make_node(op, [current, f"{out}_shape"], [out], name=out))
        else:
            nodes.append(helper.make_node(op, [current], [out], name=out, perm=values))
        current = out
    for node in model.graph.node:
        for position, value in enumerate(node.input):
            if value == dequantized:
                node.input[position] = current
    anchor = next(i for i, node in enumerate(model.graph.node) if dequantized in node.output)
    for offset, node in enumerate(nodes, start=1):
        model.graph.node.insert(anchor + offset, node)
    return LayerExport(name, layer.bits, "DequantizeLinear → Reshape/Transpose → "
                       "ConvTranspose", False, f"{groups} groups, each with its own channels: "
                       "codes regrouped on one channel axis; runs in float")


def _prefix(name: str) -> str:
    """The prefix of the initializers :func:`.graph.replace_with_dequantize` writes."""
    return name if name.endswith("weight") else f"{name}.weight"


def _sites(model, layers: dict[str, OnnxLayer]) -> dict:
    from .graph import LayerSite

    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input[1:2]:
            readers.setdefault(name, []).append(node)
    missing = [name for name in layers if name not in readers]
    if missing:
        raise QuantizationError(f"initializer '{missing[0]}' is no longer read after "
                                "onnxruntime's quantizer (please report this)")
    return {name: LayerSite(name, layer.transposed, readers[name])
            for name, layer in layers.items()}


def _bytes(path: Path) -> int:  # with its external data
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _save(model, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))


@contextlib.contextmanager
def _atomic_onnx(output: Path, external: bool):
    """A temporary path in a private folder beside ``output``; on success the file (and its
    ``.data``, renamed to ``OUT.onnx.data`` inside the proto) replace the outputs; on failure
    nothing is left."""
    folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        temporary = folder / output.name
        yield temporary
        data = folder / (output.name + ".data")
        if external and data.exists():
            os.replace(data, output.with_name(output.name + ".data"))
        os.replace(temporary, output)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def inspect_onnx(path: str | os.PathLike) -> str:
    """A table of the quantized ONNX file at ``path``: per layer its bits, ops and whether
    onnxruntime runs it with integer kernels (from the file's squant metadata), then the op
    histogram of onnxruntime's optimized graph.

    Raises:
        QuantizationError: not a readable ONNX file, or one squant did not write.
    """
    from .onnx_export import CONFIG_KEY, optimized_ops, require_onnx

    require_onnx()
    import onnx

    path = Path(path)
    load_onnx(path)
    model = onnx.load(str(path), load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    if LAYERS_KEY not in props:
        raise QuantizationError(f"{path}: not written by squant quantize (no {LAYERS_KEY} "
                                "metadata)")
    rows = [LayerExport(*row) for row in json.loads(props[LAYERS_KEY])]
    config = json.loads(props.get(CONFIG_KEY, "{}"))
    report = ExportReport(str(path), rows, optimized_ops(path, config), _bytes(path), config)
    return str(report)
