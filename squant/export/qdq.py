"""Activation Q/DQ for models quantized with ``act_bits``: onnxruntime's QDQ quantizer, told
squant's codes and ranges.

onnxruntime's own quantizer (``quantize_static``) places the ``QuantizeLinear`` /
``DequantizeLinear`` pairs its CPU kernels fuse (``QLinearConv``, ``QGemm``, ``QLinearAdd``,
pools...). squant does not let it choose any number that squant already chose:

* every quantized layer's weight gets squant's per-channel scale and zero point as an override,
  so the codes it writes are squant's codes (checked after the fact);
* the input of every layer that fake-quantizes its input gets that layer's exact grid
  (``act_lo``, ``act_hi``, ``act_bits``: ``scale = fl32((hi - lo) / (2**b - 1))``,
  uint8 ``zero_point = -round(S * lo)``); the first layer's input, which squant keeps float,
  gets an 8-bit grid on ``export_onnx``'s ``input_range`` (:func:`first_input_range`);
* every other activation it quantizes (layer outputs, residual adds, pools) gets the SQuant
  paper's data-free 8-bit range (:func:`squant.ranges.activations.paper_range`) of that tensor
  when squant's calibration batch (uniform [0, 1) inputs, as for the layers' own ranges) runs
  through the float graph.

A grid on the output of a ``Relu`` or ``Clip`` (``ReLU6``) is cut to its bounds: the quantizer
removes those nodes and the grid's ends do their clipping (squant's ``act_hi`` of a ``ReLU6``
output can exceed 6). The Q/DQ pairs the file holds are what :func:`squant.export.session.
export_faithful`'s PyTorch model computes (:mod:`.faithful`).

Activations below 8 bits run on an 8-bit container with their own step: values beyond the
layer's range saturate at uint8's ends rather than at ``2**b - 1`` levels.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..core.errors import QuantizationError
from ..core.fake_quant import grid
from ..nn import QuantizedModule
from ..ranges.activations import paper_range
from .graph import WEIGHT_OPS, LayerSite, activation_bounds, bounded, drop_initializer, in_layout
from .weights import WeightCodes

OUTPUT_BITS = 8
FIRST_INPUT_BITS = 8  # the first layer's input grid (squant's last layer uses 8 bits too)
PERCENTILE = 99.99  # the ranges from real inputs: as squant.quantize's act_range="percentile"
# What onnxruntime's quantizer may put Q/DQ around (its CPU kernels fuse these); never ops with
# weights of their own that are not squant's (Gather, LSTM, ...).
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "MaxPool",
                 "AveragePool", "GlobalAveragePool", "Relu", "Clip", "Reshape", "Flatten",
                 "Transpose", "Squeeze", "Unsqueeze", "Concat", "Resize")


def activation_grid(lo: float, hi: float, bits: int) -> tuple[np.float32, np.uint8]:
    """``(scale, zero_point)`` of the uint8 ``QuantizeLinear`` equal to squant's fake-quantizer
    on ``[lo, hi]`` at ``bits`` (:func:`squant.core.fake_quant.fake_quantize`)."""
    inverse, zero_point, low, _ = grid(lo, hi, bits)
    # uint8 codes u = q - low dequantize as (u - zero) / S = (q + zero_point) / S
    zero = -int(zero_point) - low
    if not 0 <= zero <= 255:
        raise QuantizationError(f"an activation range [{lo}, {hi}] whose zero point {zero} "
                                "fits no uint8")
    return np.float32(1.0 / float(inverse)), np.uint8(zero)


def calibration_batches(model, inputs: tuple[torch.Tensor, ...], data: Iterable | None,
                         batch: int, seed: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """The graph inputs' feeds for ranging activations, and the rule: ``data``'s batches by
    percentiles, else squant's data-free batch by the paper's rule."""
    if data is None:
        return [calibration_feeds(model, inputs, batch, seed)], "paper"
    names = [info.name for info in model.graph.input]
    batches = []
    for index, item in enumerate([data] if isinstance(data, torch.Tensor) else data):
        tensors = (item,) if isinstance(item, torch.Tensor) else tuple(item)
        if len(tensors) != len(names) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError(f"calibration_data batch {index}: expected {len(names)} tensor(s), "
                            "as example_inputs")
        for position, (t, x) in enumerate(zip(tensors, inputs)):
            if t.shape[1:] != x.shape[1:]:
                raise QuantizationError(
                    f"calibration_data batch {index}, input {position}: shape "
                    f"{tuple(t.shape)}, but the model was exported for (batch, "
                    f"{', '.join(map(str, x.shape[1:]))}) as example_inputs")
        batches.append({n: (t.float() if t.is_floating_point() else t).detach().cpu().numpy()
                        for n, t in zip(names, tensors)})
    if not batches:
        raise QuantizationError("calibration_data holds no batch")
    return batches, "percentile"


def calibration_feeds(model, inputs: tuple[torch.Tensor, ...], batch: int,
                       seed: int) -> dict[str, np.ndarray]:
    """The graph inputs' calibration batch: uniform [0, 1) floats (squant's data-free
    convention) of each float input's shape with ``batch`` samples; other inputs as given."""
    generator = torch.Generator().manual_seed(seed)
    feeds = {}
    for info, x in zip(model.graph.input, inputs):
        if x.is_floating_point():
            feeds[info.name] = torch.rand((batch, *x.shape[1:]), generator=generator).numpy()
        else:
            feeds[info.name] = x.numpy()
    return feeds


def first_layer(layers: dict, sites: dict, codes: dict) -> str | None:
    """The layer whose input squant keeps float in a model quantizing activations (the first
    of :func:`squant.ranges.activations.enable_activations`), if onnxruntime can fuse it."""
    first = next((name for name, module in layers.items() if isinstance(module, QuantizedModule)
                  and module.float_input), None)
    if (first is None or first not in sites or getattr(layers[first], "act_enabled", False)
            or len(sites[first].nodes) != 1 or codes[first].block_size is not None):
        return None
    return first


def first_input_range(model, name: str, site, input_range, inputs: tuple[torch.Tensor, ...],
                 batches: list | None) -> tuple[float, float]:
    """The first layer's input range (see :func:`squant.export_onnx`'s ``input_range``)."""
    if isinstance(input_range, str):
        if input_range != "auto":
            raise QuantizationError(f"input_range must be (lo, hi), 'auto' or None, got "
                                    f"{input_range!r}")
        feeds = batches or [{info.name: x.float().numpy() for info, x
                             in zip(model.graph.input, inputs) if x.is_floating_point()}]
        lo, hi = observed_range(model, site.nodes[0].input[0], feeds)
    else:
        try:
            lo, hi = (float(v) for v in input_range)
        except (TypeError, ValueError):
            raise QuantizationError(f"input_range must be (lo, hi), 'auto' or None, got "
                                    f"{input_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= 0 <= hi and hi > lo):
        raise QuantizationError(f"layer '{name}': its input range [{lo}, {hi}] must be finite "
                                "and hold 0 with hi > lo: give input_range=(lo, hi), or None to "
                                "keep the layer float")
    return lo, hi


def observed_range(model: onnx.ModelProto, tensor: str,
                   batches: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """The min and max of ``tensor`` over ``batches`` run through the float ``model``, widened
    to include 0 (a uint8 grid holds 0)."""
    lo = hi = 0.0
    for feeds in batches:
        value = feeds[tensor] if tensor in feeds else float_tensors(model, feeds, {tensor})[tensor]
        if not np.all(np.isfinite(value)):
            raise QuantizationError(f"tensor '{tensor}' holds NaN or infinite values on the "
                                    "example inputs or calibration_data: give finite inputs")
        lo, hi = min(lo, float(value.min())), max(hi, float(value.max()))
    return lo, hi


def float_tensor_ranges(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]],
                        rule: str = "paper") -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}`` for every float tensor the graph computes when ``batches`` run
    through it (:func:`float_tensors`): by ``rule`` ``"paper"``, the SQuant paper's 8-bit range
    (:func:`squant.ranges.activations.paper_range`), or ``"percentile"``, the 0.01% and 99.99%
    percentiles (``PERCENTILE``); the widest over the batches."""
    ranges: dict[str, tuple[float, float]] = {}
    for feeds in batches:
        for name, value in float_tensors(model, feeds).items():
            if rule == "paper":
                lo, hi = (float(v) for v in paper_range(torch.from_numpy(value), OUTPUT_BITS))
            else:
                lo, hi = (float(v) for v in np.percentile(value, (100 - PERCENTILE, PERCENTILE)))
            seen = ranges.get(name, (lo, hi))
            ranges[name] = (min(seen[0], lo), max(seen[1], hi))
    return ranges


def float_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                  wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    """``{tensor: value}`` of every non-empty float tensor the graph computes (or of those in
    ``wanted``) when ``feeds`` run through it (onnxruntime, intermediate tensors made outputs)."""
    import onnxruntime as ort

    inferred = onnx.shape_inference.infer_shapes(model)
    constants = {init.name for init in model.graph.initializer}
    floats = [info.name for info in inferred.graph.value_info
              if info.type.tensor_type.elem_type == TensorProto.FLOAT
              and info.name not in constants]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {out.name for out in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in floats if name not in known)
    names = [out.name for out in probe.graph.output]
    if wanted is not None:
        names = [name for name in names if name in wanted] + sorted(
            wanted & set(feeds) - set(names))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    values = session.run([n for n in names if n not in feeds], feeds)
    values = dict(zip([n for n in names if n not in feeds], values))
    values.update({n: feeds[n] for n in names if n in feeds})
    return {name: value for name, value in values.items()
            if value.dtype == np.float32 and value.size}


def quantize_qdq(model: onnx.ModelProto, codes: dict[str, WeightCodes],
                 sites: dict[str, LayerSite], grids: dict[str, tuple[float, float, int]],
                 batches: list[dict[str, np.ndarray]], rule: str) -> onnx.ModelProto:
    """``model`` with Q/DQ pairs by onnxruntime's quantizer around the layers of ``grids``
    (``{layer: (lo, hi, bits)}``, its input's grid: squant's ``act_lo/act_hi/act_bits``, or the
    first layer's input range; one node each), told squant's codes and those grids; other
    weight ops stay float, other activations get the 8-bit ranges of ``rule`` on ``batches``
    (:func:`float_tensor_ranges`). Every grid on the output of a ``Relu`` or ``Clip`` is cut to
    its bounds (:func:`activation_bounds`): onnxruntime's quantizer removes those nodes and lets
    the grid clip instead."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fused = {sites[name].nodes[0].name for name in grids}
    weight_nodes = {node.name for site in sites.values() for node in site.nodes}
    exclude = [node.name for node in model.graph.node if node.name not in fused
               and (node.name in weight_nodes or node.op_type in WEIGHT_OPS)]
    bounds = activation_bounds(model)
    overrides: dict[str, list[dict]] = {}
    for name, (lo, hi) in float_tensor_ranges(model, batches, rule).items():
        lo, hi = bounded(name, min(lo, 0.0), max(hi, 0.0), bounds)
        overrides[name] = [{"rmin": np.array(lo, np.float32),
                            "rmax": np.array(hi, np.float32)}]
    for name, (lo, hi, bits) in grids.items():
        site = sites[name]
        tensor = site.nodes[0].input[0]
        scale, zero = activation_grid(*bounded(tensor, lo, hi, bounds), bits)
        overrides[tensor] = [{"scale": np.array(scale, np.float32),
                              "zero_point": np.array(zero, np.uint8)}]
        stored = in_layout(codes[name], site)
        overrides[site.initializer] = [
            {"scale": np.array(s, np.float32), "zero_point": np.array(z, np.int8),
             "axis": stored.axis} for s, z in zip(stored.scale, stored.zero_point)]

    class OneBatch(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches[:1])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "float.onnx"), Path(folder, "qdq.onnx")
        onnx.save(model, source)
        quantize_static(str(source), str(target), OneBatch(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude,
                        extra_options={"TensorQuantOverrides": overrides,
                                       "QDQDisableWeightAdjustForInt32Bias": True,
                                       "ActivationSymmetric": False})
        quantized = onnx.load(target)
    _float_outputs(quantized)
    _default_bias_zero_points(quantized)
    return quantized


def _default_bias_zero_points(model: onnx.ModelProto) -> None:
    """Drop the all-zero int32 zero points onnxruntime's quantizer writes for each quantized
    bias (4 bytes per output channel: 72 KB, 2% of MobileNetV2's 8-bit file): 0 is
    ``DequantizeLinear``'s default, and onnxruntime fuses the same kernels and computes the same
    bits without them (checked on MobileNetV2, with and without ``x64quantprecision``). The
    int8 weight zero points stay: without them onnxruntime leaves a ``Gemm`` float."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        zero = constants.get(node.input[2]) if (
            node.op_type == "DequantizeLinear" and len(node.input) == 3) else None
        if zero is None or zero.data_type != TensorProto.INT32 or \
                numpy_helper.to_array(zero).any():
            continue
        del node.input[2]
        drop_initializer(graph, zero.name)


def _float_outputs(model: onnx.ModelProto) -> None:
    """Drop the Q/DQ pair the quantizer puts on each graph output: the model's outputs stay
    float as squant's are (``QGemm`` fuses with a float output too)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    for output in graph.output:
        dequantize = producers.get(output.name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = producers.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        source = producers.get(quantize.input[0])
        readers = [n for n in graph.node if quantize.input[0] in n.input]
        if source is None or len(readers) != 1:
            continue
        source.output[list(source.output).index(quantize.input[0])] = output.name
        graph.node.remove(quantize)
        graph.node.remove(dequantize)
        for name in quantize.input[1:]:
            drop_initializer(graph, name)
