"""Find quantized weights that torch's exporter folded a BatchNorm into, and keep their codes.

Eval-mode BatchNorm after a conv is ``(y - mean) * k + beta`` per output channel with
``k = gamma / sqrt(var + eps)``; torch's ONNX exporter folds it into the conv, whose weight
becomes ``w * k``. With squant's per-channel weight ``w = (q - zp) * s`` that is
``(sign(k) q - sign(k) zp) * (|k| s)``: the same integer codes (negated where ``k < 0``) with a
new per-channel scale. So folding loses nothing, and the conv's output can be quantized and
fused by onnxruntime (``QLinearConv``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .weights import WeightCodes

_TOLERANCE = 1e-5  # relative: the exporter multiplies in float32


def channel_factors(weight: np.ndarray, candidate: np.ndarray) -> np.ndarray | None:
    """``k`` with ``candidate[o] == k[o] * weight[o]`` for every channel ``o`` (axis 0) to float32
    rounding, or None. Channels of ``weight`` that are all zero get ``k = 1``."""
    if weight.shape != candidate.shape:
        return None
    w = weight.reshape(len(weight), -1).astype(np.float64)
    c = candidate.reshape(len(candidate), -1).astype(np.float64)
    norms = (w * w).sum(1)
    k = np.where(norms > 0, (w * c).sum(1) / np.where(norms > 0, norms, 1), 1.0)
    error = np.abs(c - k[:, None] * w).max(1)
    if np.all(error <= _TOLERANCE * np.abs(c).max(1) + 1e-30) and np.all(k != 0):
        return k
    return None


def folded_codes(codes: WeightCodes, k: np.ndarray) -> WeightCodes:
    """``codes`` times the per-channel factors ``k`` (channel axis ``codes.axis``): codes negated
    where ``k < 0``, scales times ``|k|`` (every group's, for group-wise grids). When an 8-bit
    code -128 would need negating (no int8 holds 128) the codes stay and the scales take the
    sign instead (onnxruntime accepts negative weight scales)."""
    sign = np.where(k < 0, -1, 1)
    shape = [1] * codes.codes.ndim
    shape[codes.axis] = -1
    negated = codes.codes.astype(np.int16) * sign.reshape(shape)
    # scale and zero_point: (channels,), or (channels, blocks) in axis order for group-wise grids
    grid = [-1] if codes.block_size is None else [1, 1]
    if codes.block_size is not None:
        grid[sorted((codes.axis, codes.block_axis)).index(codes.axis)] = -1
    if negated.max() > 127 or negated.min() < -128:
        scale = codes.scale.astype(np.float64) * k.reshape(grid)
        return replace(codes, scale=scale.astype(np.float32))
    zero = codes.zero_point.astype(np.int16) * sign.reshape(grid)
    scale = codes.scale.astype(np.float64) * np.abs(k).reshape(grid)
    return replace(codes, codes=negated.astype(np.int8), zero_point=zero.astype(np.int8),
                   scale=scale.astype(np.float32))


def find_folded(model: onnx.ModelProto, missing: dict[str, np.ndarray],
                codes: dict[str, WeightCodes]) -> dict[str, str]:
    """For each layer of ``missing`` (``{layer: float weight}`` not found as is), the ``Conv``
    weight initializer equal to it times per-channel factors (a BatchNorm folded in by the
    exporter): ``codes[layer]`` becomes the folded codes and the initializer holds exactly what
    they dequantize to. Returns ``{layer: initializer}`` for the layers found."""
    conv_weights = {node.input[1] for node in model.graph.node if node.op_type == "Conv"}
    found = {}
    for init in model.graph.initializer:
        if init.name not in conv_weights or init.data_type != TensorProto.FLOAT:
            continue
        candidate = numpy_helper.to_array(init)
        for layer, weight in missing.items():
            if layer in found or codes[layer].axis != 0:
                continue
            k = channel_factors(weight, candidate)
            if k is not None:
                folded = folded_codes(codes[layer], k)
                codes[layer] = folded
                init.CopyFrom(numpy_helper.from_array(folded.dequantize(), init.name))
                found[layer] = init.name
                break
    return found
