"""Activation Q/DQ for models quantized with ``act_bits``: onnxruntime's QDQ quantizer, told
squant's codes and ranges.

onnxruntime's own quantizer (``quantize_static``) places the ``QuantizeLinear`` /
``DequantizeLinear`` pairs its CPU kernels fuse (``QLinearConv``, ``QGemm``, ``QLinearAdd``,
pools...). squant does not let it choose any number that squant already chose:

* every quantized layer's weight gets squant's per-channel scale and zero point as an override,
  so the codes it writes are squant's codes (checked after the fact);
* the input of every layer that fake-quantizes its input gets that layer's exact grid
  (``act_lo``, ``act_hi``, ``act_bits``: ``scale = fl32((hi - lo) / (2**b - 1))``,
  uint8 ``zero_point = -round(S * lo)``);
* every other activation it quantizes (layer outputs, residual adds, pools) gets the SQuant
  paper's data-free 8-bit range (:func:`squant.ranges.activations.paper_range`) of that tensor
  when squant's calibration batch (uniform [0, 1) inputs, as for the layers' own ranges) runs
  through the float graph.

Activations below 8 bits run on an 8-bit container with their own step: values beyond the
layer's range saturate at uint8's ends rather than at ``2**b - 1`` levels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..core.errors import QuantizationError
from ..ranges.activations import paper_range
from .graph import drop_initializer
from .weights import WeightCodes

OUTPUT_BITS = 8


def activation_grid(lo: float, hi: float, bits: int) -> tuple[np.float32, np.uint8]:
    """``(scale, zero_point)`` of the uint8 ``QuantizeLinear`` equal to squant's fake-quantizer
    on ``[lo, hi]`` at ``bits`` (:func:`squant.core.fake_quant.fake_quantize`)."""
    inverse = torch.tensor(2**bits - 1, dtype=torch.float32) / torch.clamp(
        torch.tensor(hi - lo, dtype=torch.float32), min=1e-8)
    zero = -int(torch.round(inverse * torch.tensor(lo, dtype=torch.float32)))
    if not 0 <= zero <= 255:
        raise QuantizationError(f"an activation range [{lo}, {hi}] whose zero point {zero} "
                                "fits no uint8")
    return np.float32(1.0 / float(inverse)), np.uint8(zero)


def float_tensor_ranges(model: onnx.ModelProto, feeds: dict[str, np.ndarray]
                        ) -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}``: the paper's 8-bit range of every float tensor the graph computes
    when ``feeds`` run through it (onnxruntime, all intermediate tensors made outputs)."""
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
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    values = session.run(names, feeds)
    ranges = {}
    for name, value in zip(names, values):
        if value.dtype == np.float32 and value.size:
            lo, hi = paper_range(torch.from_numpy(value), OUTPUT_BITS)
            ranges[name] = (float(lo), float(hi))
    return ranges


def quantize_qdq(model: onnx.ModelProto, weights: dict[str, WeightCodes],
                 inputs: dict[str, tuple[float, float, int]],
                 ranges: dict[str, tuple[float, float]], exclude: list[str],
                 feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with Q/DQ pairs by onnxruntime's quantizer.

    ``weights``: ``{initializer: codes}`` of the weights to store as squant's codes (their
    layout: channel axis ``codes.axis``); ``inputs``: ``{tensor: (lo, hi, bits)}`` squant's
    grids of layer inputs; ``ranges``: ``{tensor: (lo, hi)}`` for the other activations;
    ``exclude``: node names left float; ``feeds``: the calibration batch.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    overrides: dict[str, list[dict]] = {}
    for name, (lo, hi) in ranges.items():
        overrides[name] = [{"rmin": np.array(min(lo, 0.0), np.float32),
                           "rmax": np.array(max(hi, 0.0), np.float32)}]
    for name, (lo, hi, bits) in inputs.items():
        scale, zero = activation_grid(lo, hi, bits)
        overrides[name] = [{"scale": np.array(scale, np.float32),
                            "zero_point": np.array(zero, np.uint8)}]
    for name, codes in weights.items():
        overrides[name] = [{"scale": np.array(s, np.float32), "zero_point": np.array(z, np.int8),
                            "axis": codes.axis}
                           for s, z in zip(codes.scale, codes.zero_point)]

    class OneBatch(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([feeds])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "float.onnx"), Path(folder, "qdq.onnx")
        onnx.save(model, source)
        quantize_static(str(source), str(target), OneBatch(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        extra_options={"TensorQuantOverrides": overrides,
                                       "QDQDisableWeightAdjustForInt32Bias": True,
                                       "ActivationSymmetric": False})
        quantized = onnx.load(target)
    _float_outputs(quantized)
    return quantized


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
