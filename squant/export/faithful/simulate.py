"""The faithful model: torch's graph of the float model, computing what a QDQ file computes.

:func:`simulate` takes the graph torch's exporter translated into the file and makes it
compute what onnxruntime computes for the file: every activation the file quantizes is
fake-quantized on the file's own grid (:func:`squant.core.fake_quant.fake_quantize_linear`),
and every group onnxruntime fuses into an integer kernel (:mod:`.fused`) is replaced by a
bit-exact model of that kernel (:mod:`.integer_ops`).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn

from ...core.errors import QuantizationError
from ...core.fake_quant import fake_quantize_linear
from .fused import fused_groups

_CODE_RANGES = {2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767)}  # by ONNX type


def simulate(program: torch.export.ExportedProgram, float_model, model, *,
             integer_kernels: bool = True) -> nn.Module:
    """``program`` (the float model torch's exporter translated to ``float_model``) as a
    module, with each activation ``model`` (the QDQ ONNX graph) quantizes fake-quantized on
    the file's grid, each fused layer's bias moved by its int32 rounding in the file
    (:func:`bias_offsets`), and, with ``integer_kernels``, each group onnxruntime fuses into
    an integer kernel computed as that kernel computes it (:func:`_fuse`)."""
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    grids = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            zero = constants[node.input[2]]
            scale = constants[node.input[1]]
            if scale.size != 1:  # per-channel activations: squant's exporter writes none
                raise QuantizationError(f"tensor '{node.input[0]}': a per-channel activation "
                                        "grid, which export_faithful does not simulate")
            low, high = _CODE_RANGES[numpy_helper.from_array(zero).data_type]
            grids[node.input[0]] = (float(scale), int(zero), low, high)
    module = program.module()
    graph = module.graph
    nodes = {node.name: node for node in graph.nodes}
    # The file names its inputs as the program does; the module may rename their placeholders
    # (a forward argument called ``input`` becomes ``input_1``): match them by position.
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    nodes.update(zip(program.graph_signature.user_inputs, placeholders))
    # The exporter's own intermediate values (``val_N``: e.g. a 3-D Linear's MatMul before its
    # bias Add) have no node in torch's graph: those grids are left out, with a warning.
    inner = sorted(name for name in set(grids) - set(nodes) if re.fullmatch(r"val_\d+", name))
    if inner:
        warnings.warn(f"the faithful model leaves {len(inner)} tensor(s) the file quantizes "
                      f"float ({', '.join(inner[:3])}): intermediate values of torch's exporter "
                      "with no PyTorch counterpart", stacklevel=3)
        grids = {name: value for name, value in grids.items() if name not in inner}
    missing = sorted(set(grids) - set(nodes))
    if missing:
        raise QuantizationError(f"the file quantizes {len(missing)} tensor(s) the model does "
                                f"not compute ({', '.join(missing[:3])}): was it written for "
                                "this model and these example inputs?")
    offsets = {name: value for name, value in bias_offsets(float_model, model).items()
               if name in nodes}
    originals = dict(nodes)  # before the quantizers and offsets follow them
    last_input = [node for node in graph.nodes if node.op == "placeholder"][-1]

    def follow(name: str, function, *args) -> None:  # tensor ``name`` := function(it, *args)
        node = nodes[name]
        with graph.inserting_after(last_input if node.op == "placeholder" else node):
            new = graph.call_function(function, (node, *args))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        nodes[name] = new

    for index, (name, (offset, axis)) in enumerate(offsets.items()):
        module.register_buffer(f"squant_bias_offset_{index}", torch.from_numpy(offset))
        with graph.inserting_after(last_input):
            buffer = graph.get_attr(f"squant_bias_offset_{index}")
        follow(name, _add_on_axis, buffer, axis)
    for name, parameters in grids.items():
        follow(name, fake_quantize_linear, *parameters)
    if integer_kernels:
        fused = _fuse(module, model, nodes, originals)
        inexact = _float_computed(model, grids, fused)
        if inexact:
            warnings.warn(
                f"the faithful model computes {len(inexact)} tensor(s) the file quantizes with "
                f"float ops, not as a model of onnxruntime's kernel ({', '.join(inexact[:3])}"
                f"{', ...' if len(inexact) > 3 else ''}): where the two round differently, "
                "quantized values one step apart occur there and after", stacklevel=3)
    graph.lint()
    module.recompile()
    return module


# Ops whose output is exactly their input's values (moved, selected, clipped, or the max of
# them): on a quantized input, onnxruntime and the faithful model give the same codes.
_EXACT_OPS = {"Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Transpose", "Identity", "Squeeze",
              "Unsqueeze", "Concat", "Split", "Slice", "Gather", "DequantizeLinear"}


def _float_computed(model, grids: dict, fused: set[str]) -> list[str]:
    """``tensor (op)`` for each tensor of ``grids`` that ``model`` computes by float arithmetic
    outside the groups onnxruntime fuses (``fused``: their outputs), e.g. a ConvTranspose
    between Q/DQ pairs: there the faithful model is not bit for bit."""
    producers = {out: node for node in model.graph.node for out in node.output}
    return [f"{name} ({producers[name].op_type})" for name in grids
            if name in producers and name not in fused
            and producers[name].op_type not in _EXACT_OPS]


def _fuse(module: torch.fx.GraphModule, model, nodes: dict, originals: dict) -> set[str]:
    """Replace, in ``module``'s graph, each group of ``model`` that onnxruntime fuses
    (:func:`.fused.fused_groups`) by its integer kernel's module, reading the dequantized
    tensors the group reads (``nodes``: tensor name -> the node computing it, quantized as the
    file does; ``originals``: before that); the float ops it replaces are dropped. Returns the
    outputs of the groups replaced."""
    graph = module.graph
    replaced = set()
    for index, group in enumerate(fused_groups(model)):
        if group.output not in nodes or not all(name in nodes for name in group.inputs):
            continue  # values of torch's exporter with no node here: left as they are
        name = f"squant_{group.kind}_{index}"
        module.add_submodule(name, group.module)
        # a float result keeps the file's quantizer after it; codes replace the quantizer
        old = originals[group.output] if group.before_quantize else nodes[group.output]
        with graph.inserting_after(old):
            new = graph.call_module(name, tuple(nodes[n] for n in group.inputs))
        old.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        if nodes[group.output] is old:
            nodes[group.output] = new
        replaced.add(group.output)
    graph.eliminate_dead_code()
    return replaced


def bias_offsets(float_model, model) -> dict[str, tuple[np.ndarray, int]]:
    """``{tensor of float_model: (offset, channel axis)}``: for each ``Conv``/``Gemm`` whose
    float bias the file ``model`` stores as int32 codes (``QLinearConv``/``QGemm`` add it to
    their integer sums, on the grid ``input scale * weight scale``), what that rounding adds to
    its output channels. Nodes are matched by name (onnxruntime's quantizer keeps them)."""
    from onnx import numpy_helper

    floats = {init.name: numpy_helper.to_array(init) for init in float_model.graph.initializer}
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    twins = {node.name: node for node in model.graph.node}
    offsets = {}
    for node in float_model.graph.node:
        twin = twins.get(node.name)
        if (node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or twin is None
                or node.input[2] not in floats or len(twin.input) < 3):
            continue
        dequantize = producers.get(twin.input[2])
        if (dequantize is None or dequantize.op_type != "DequantizeLinear"
                or dequantize.input[0] not in constants):
            continue
        codes, scale = constants[dequantize.input[0]], constants[dequantize.input[1]]
        zero = constants[dequantize.input[2]] if len(dequantize.input) > 2 else 0
        stored = ((codes.astype(np.float64) - zero) * scale).astype(np.float32)
        if stored.shape != floats[node.input[2]].shape:
            continue
        offset = stored - floats[node.input[2]]
        if np.any(offset):
            offsets[node.output[0]] = (offset, 1 if node.op_type == "Conv" else -1)
    return offsets


def _add_on_axis(x: torch.Tensor, offset: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` plus ``offset`` along ``axis`` (one value per channel)."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return x + offset.reshape(shape).to(x.dtype)
