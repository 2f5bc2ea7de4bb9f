"""Codes of <= 4 bits in 4-bit containers: ``DequantizeLinear`` of ``uint4`` (opset 21).

The export writer stores every ``DequantizeLinear`` weight as int8 codes ``c`` with an int8
zero point ``zp`` (``w = (c - zp) * s``). A channel whose codes span at most 16 levels (any
<= 4-bit grid) holds the same weight as ``uint4`` codes ``u = c - zp + o`` with zero point
``o``, for an offset ``o`` in ``[0, 15]`` that keeps ``u`` in ``[0, 15]``: one exists whenever
the channel's grid contains 0 (``min(c - zp) <= 0 <= max(c - zp)``). The file's weights then
take half the bytes; the values onnxruntime computes are unchanged.
"""

from __future__ import annotations

import numpy as np

OPSET = 21  # the first opset whose DequantizeLinear takes (u)int4


def with_int4_opset(model):
    """``model`` converted to opset 21 when it is older (by onnx's version converter), or
    unchanged when it is new enough or cannot be converted (its codes then stay int8)."""
    import onnx

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, OPSET)
    except Exception:  # the converter raises C++ errors of several kinds; keep int8 then
        return model


def to_uint4(model, codes_names: set[str]) -> list[str]:
    """Store the codes initializers named in ``codes_names`` (each read by one per-axis or
    per-tensor ``DequantizeLinear``) as ``uint4`` with ``uint4`` zero points, where every
    channel fits; returns the names converted. Needs opset >= 21 (else converts nothing)."""
    from onnx import TensorProto, helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < OPSET:
        return []
    inits = {init.name: init for init in model.graph.initializer}
    done = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in codes_names \
                or len(node.input) < 3 or node.input[2] not in inits \
                or any(a.name == "block_size" for a in node.attribute):
            continue
        codes = numpy_helper.to_array(inits[node.input[0]]).astype(np.int16)
        zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.int16)
        if codes.ndim == 0 or zero.ndim > 1:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % codes.ndim
        shape = [1] * codes.ndim
        shape[axis] = -1
        centred = codes - (zero.reshape(shape) if zero.ndim else zero)
        moved = np.moveaxis(centred, axis, 0).reshape(zero.size or 1, -1)
        offset = np.maximum(0, -moved.min(1))
        if np.any(offset + moved.max(1) > 15) or np.any(offset > 15):
            continue
        unsigned = (centred + (offset.reshape(shape) if zero.ndim else offset[0])).astype(
            np.uint8)
        new_zero = offset.astype(np.uint8).reshape(zero.shape)
        for name, values in ((node.input[0], unsigned), (node.input[2], new_zero)):
            inits[name].CopyFrom(helper.make_tensor(name, TensorProto.UINT4, values.shape,
                                                    _packed(values), raw=True))
        done.append(node.input[0])
    return done


def _packed(values: np.ndarray) -> bytes:
    """4-bit values packed two to a byte, the first in the low nibble (ONNX's layout)."""
    flat = values.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
