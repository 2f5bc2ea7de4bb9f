"""``squant.export_onnx``: a quantized model as an ONNX file that onnxruntime runs with integer
kernels, holding squant's codes, scales and zero points exactly.

The float model (``squant.dequantize``) is exported by torch's dynamo exporter, then each
quantized layer's float weight is swapped for its codes (:mod:`.graph`):

* models quantized with ``act_bits``: QDQ (:mod:`.qdq`), fused by onnxruntime into
  ``QLinearConv``, ``QGemm``, ``QLinearAdd``...; the first layer's input, which squant keeps
  float, gets an 8-bit grid on ``input_range`` (else that layer runs float);
* weight-only models: a Linear becomes ``com.microsoft.MatMulNBits`` (2-4 bits; 5-8 bits at
  ``accuracy_level`` 4); other layers store their codes behind a ``DequantizeLinear`` that the
  session options fold into a float weight at load (small file, float compute).

Runtime conventions and measured speeds: DEPLOY_NOTES.md (onnxruntime 1.32 on x86 AVX2).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import QuantizationError, first_line
from ..core.options import DATA_RANGES
from ..io.file_io import atomic_path
from ..nn import QuantizedModule
from ..nn.multi_weight import QuantizedWeight
from .report import ExportReport, LayerExport
from .torch_export import as_inputs, export_float, quiet

EXTRA_HINT = 'pip install "squant[onnx]"'
CONFIG_KEY = "squant.session_config"
_MATMUL_NBITS_MAX_BITS = 4


def require_onnx() -> None:
    """Raise ImportError naming the extra when onnx, onnxscript or onnxruntime is missing."""
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            raise ImportError(f"ONNX export needs {package}: {EXTRA_HINT}") from None


def export_onnx(qmodel: nn.Module, path: str | os.PathLike,
                example_inputs: torch.Tensor | Sequence[torch.Tensor], *, opset: int = 21,
                dynamic_batch: bool = True, accuracy_level: int = 4,
                calibration_data: Iterable | None = None, calibration_batch: int = 32,
                seed: int = 0, input_range: tuple[float, float] | str | None = "auto",
                faithful: bool = False) -> ExportReport:
    """Write ``qmodel`` (from :func:`squant.quantize`) to ``path`` as ONNX with squant's codes.

    Args:
        qmodel: a model holding squant's quantized layers (on any device; exported from CPU).
        path: the ``.onnx`` file to write (replaced atomically: a failed export leaves none).
        example_inputs: one input tensor or a tuple of them, as ``qmodel(*example_inputs)``
            takes them; their shapes (dim 0 = batch) define the graph's inputs (floating ones
            float32: the file computes in float32).
        opset: the ONNX opset (>= 21: int4 types and blocked quantization).
        dynamic_batch: make dim 0 of every input dynamic.
        accuracy_level: ``MatMulNBits``' ``accuracy_level`` for weight-only Linears: 4 (default)
            quantizes their activations to int8 on the fly (fastest, measured 0.21x float
            latency at batch 1 in DEPLOY_NOTES.md; Linears of 5-8 bits too), 0 computes in
            float32 (exact; Linears of more than 4 bits then stay behind DequantizeLinear).
        calibration_data: real input batches (each a tensor or a tuple of tensors, as
            ``example_inputs``), e.g. those ``squant.quantize`` calibrated on: the tensors
            squant does not range itself (layer outputs, residual adds) then get the 0.01% ..
            99.99% percentiles of their values (widest over the batches). Without it, data-free:
        calibration_batch, seed: a batch of uniform [0, 1) float inputs of the example inputs'
            shapes whose activations give those tensors the SQuant paper's 8-bit range.
        input_range: with activation quantization, the 8-bit grid of the first layer's input,
            which squant keeps float (quantized, onnxruntime fuses that layer too): ``(lo, hi)``
            (e.g. from the preprocessing: ImageNet-normalized images span [-2.118, 2.640]),
            ``"auto"`` (default) the min and max of that input over ``calibration_data``, else
            over ``example_inputs`` (give samples that span the inputs), both widened to
            include 0; None keeps it float.
        faithful: also build ``report.faithful_model``, the PyTorch model computing what the
            file computes (:func:`squant.export_faithful`, without exporting again).

    Returns:
        An :class:`ExportReport`: per layer the ONNX ops it became, integer or float, and why;
        the op histogram of onnxruntime's optimized graph; the session config the file needs.

    Raises:
        ImportError: onnx, onnxscript or onnxruntime missing (``pip install "squant[onnx]"``).
        TypeError: ``qmodel`` not a module, or ``example_inputs`` not tensors.
        QuantizationError: no quantized layer, a layer the runtimes cannot hold exactly (named:
            e.g. a > 6-bit channel whose range excludes 0), an export torch refuses (with the
            model's own error), calibration batches unlike ``example_inputs``, non-finite
            inputs where ranges are taken, or a model onnxruntime cannot load (nothing is
            written then).
    """
    require_onnx()
    import onnx

    from . import fold, graph, qdq, weights
    from .faithful import simulate

    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"export_onnx expects a torch.nn.Module, got {type(qmodel).__name__}")
    inputs = as_inputs(example_inputs)
    if opset < 21:
        raise QuantizationError(f"opset must be >= 21 (int4 types, blocked quantization), "
                                f"got {opset}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantizationError(f"accuracy_level must be 0..4, got {accuracy_level}")
    layers = {name: module for name, module in qmodel.named_modules()
              if isinstance(module, QuantizedModule | QuantizedWeight)}
    if not layers:
        raise QuantizationError("the model holds no squant quantized layer: quantize it with "
                                "squant.quantize first")
    codes = {name: weights.weight_codes(name, module) for name, module in layers.items()}
    model, program = export_float(qmodel, inputs, opset, dynamic_batch)
    float_weights = {name: module.dequantize_weight().detach().cpu().to(
        module.weight_dtype).float().numpy() for name, module in layers.items()}
    # A BatchNorm after a conv is folded into its weight by the exporter: same codes, new scales.
    folded = fold.find_folded(model, graph.missing_weights(model, float_weights), codes)
    sites = graph.find_sites(model, float_weights, folded)
    results = _unstored(layers, sites)
    owners = _owners(sites)  # one layer per initializer: tied layers share its codes
    ties = {name: owners[site.initializer] for name, site in sites.items()
            if owners[site.initializer] != name}
    for name in owners.values():
        if codes[name].widened and name not in folded:
            graph.set_weight(model, sites[name], codes[name])
        if name in folded or codes[name].widened:  # what the graph now holds, to find it again
            float_weights[name] = codes[name].dequantize()
    # Layers onnxruntime can fuse: input quantized, one node, per-channel weights (its integer
    # kernels take no blocked scales).
    active = [name for name in owners.values() if getattr(layers[name], "act_enabled", False)
              and len(sites[name].nodes) == 1 and codes[name].block_size is None]
    act_model = any(getattr(m, "act_enabled", False) for m in layers.values())
    grids = {name: (float(layers[name].act_lo), float(layers[name].act_hi),
                    int(layers[name].act_bits)) for name in active}
    if not active and (calibration_data is not None or not isinstance(input_range, str | None)):
        warnings.warn("calibration_data and input_range grid activations, and no layer of this "
                      "model quantizes its input (weight-only, or act_bits on group-wise layers "
                      "only): they are ignored", stacklevel=2)
    if active:
        _warn_if_data_free_after_calibration(layers, active, calibration_data)
        batches, rule = qdq.calibration_batches(model, inputs, calibration_data,
                                                calibration_batch, seed)
        first = qdq.first_layer(layers, sites, codes) if input_range is not None else None
        if first is not None:
            seen = batches if calibration_data is not None else None
            grids[first] = (*qdq.first_input_range(model, first, sites[first], input_range,
                                                   inputs, seen), qdq.FIRST_INPUT_BITS)
        float_model = model
        with quiet():
            model = qdq.quantize_qdq(model, codes, sites, grids, batches, rule)
        for name in grids:
            results[name] = _fused_layer(model, name, layers[name], codes[name], sites[name])
        sites = graph.find_sites(model, {name: float_weights[name] for name in owners.values()
                                         if name not in results})  # a new graph
    for name in owners.values():
        if name not in results:
            results[name] = _weight_only_layer(model, name, layers[name], codes[name],
                                               sites[name], accuracy_level, act_model)
    results = _annotated(results, layers, ties, folded, codes)
    session_config = _session_config(layers, list(grids), codes, accuracy_level)
    onnx.helper.set_model_props(model, {CONFIG_KEY: json.dumps(session_config),
                                        "squant.producer": "squant.export_onnx"})
    report = ExportReport(str(path), [results[name] for name in layers],
                          session_config=session_config)
    if faithful:
        report.faithful_model = simulate(program, float_model if grids else model, model)
    graph.drop_exporter_debug_info(model)
    report.optimized_ops = _save_loadable(model, Path(path), session_config)
    report.file_bytes = Path(path).stat().st_size
    return report


def _warn_if_data_free_after_calibration(layers: dict, active: list[str],
                                         calibration_data: Iterable | None) -> None:
    """Warn when ``qmodel``'s activation ranges came from data but the export gets none: the
    tensors squant does not range itself would get data-free ranges that may not fit them."""
    methods = sorted({getattr(layers[name], "act_range_method", None) for name in active}
                     & set(DATA_RANGES))
    if methods and calibration_data is None:
        warnings.warn(f"the model's activation ranges were calibrated on data ({', '.join(methods)}"
                      "), but without calibration_data the tensors squant does not range "
                      "itself (layer outputs, residual adds) get data-free ranges from uniform "
                      "[0, 1) inputs, which may not fit your inputs: pass export_onnx the same "
                      "calibration_data", stacklevel=3)


def _unstored(layers: dict, sites: dict) -> dict[str, LayerExport]:
    """Report (and warn about) the quantized weights not found as such in the exported graph:
    torch's exporter transformed them (split, gates reordered, computed), so the file holds
    their dequantized values as float, or the forward pass does not use them."""
    lost = [name for name in layers if name not in sites]
    if lost:
        warnings.warn(f"{len(lost)} quantized weight(s) ({', '.join(lost[:5])}"
                      f"{', ...' if len(lost) > 5 else ''}) are not in the exported graph as "
                      "such: torch's ONNX exporter transformed them (the file then holds their "
                      "dequantized values as float), or the forward pass does not use them",
                      stacklevel=3)
    return {name: LayerExport(name, layers[name].bits, "float initializer or unused", False,
                              "not in the exported graph as such: the exporter transformed "
                              "this weight (split, reordered or computed; the file holds its "
                              "dequantized values as float), or the forward pass does not use "
                              "it") for name in lost}


def _owners(sites: dict) -> dict[str, str]:
    """``{initializer: the first layer stored there}``."""
    owners: dict[str, str] = {}
    for name, site in sites.items():
        owners.setdefault(site.initializer, name)
    return owners


def _annotated(results: dict[str, LayerExport], layers: dict, ties: dict[str, str],
               folded: dict[str, str], codes: dict) -> dict[str, LayerExport]:
    """The reports of tied layers (``ties``: ``{layer: the layer whose initializer it shares}``)
    and the notes on folding and widening, in ``layers``' order."""
    done = {}
    for name in layers:
        if name in ties:
            done[name] = replace(results[ties[name]], name=name, bits=layers[name].bits,
                                 reason=f"shares the codes of '{ties[name]}'")
        else:
            done[name] = results[name]
        notes = []
        if name in folded:
            notes.append("its BatchNorm folded into the scales")
        if codes[name].widened:
            notes.append(f"{codes[name].widened} channel(s) re-quantized on ranges widened to "
                         "include 0")
        if notes:
            done[name] = replace(done[name], reason="; ".join([done[name].reason, *notes]))
    return done


def _fused_layer(model, name: str, module, codes, site) -> LayerExport:
    """Check the codes onnxruntime's quantizer wrote are squant's; say what the layer became."""
    from onnx import numpy_helper

    from . import graph

    nodes = {node.name: node for node in model.graph.node}
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {init.name: init for init in model.graph.initializer}
    node = nodes[site.nodes[0].name]
    weight_dq = producers.get(node.input[1])
    stored = None
    if weight_dq is not None and weight_dq.input[0] in initializers:
        stored = numpy_helper.to_array(initializers[weight_dq.input[0]])
    if stored is None or not np.array_equal(stored, graph.in_layout(codes, site).codes):
        raise QuantizationError(f"layer '{name}': onnxruntime's quantizer did not store "
                                "squant's codes (please report this)")
    input_dq = producers.get(node.input[0])
    consumers = [n for n in model.graph.node if node.output[0] in n.input]
    input_quantized = input_dq is not None and input_dq.op_type == "DequantizeLinear"
    output_quantized = bool(consumers) and all(n.op_type == "QuantizeLinear" for n in consumers)
    fused = {"Conv": "QLinearConv", "Gemm": "QGemm",
             "MatMul": "QLinearMatMul" if output_quantized else "MatMulIntegerToFloat"
             }.get(node.op_type)
    # onnxruntime's CPU provider has no integer ConvTranspose: it stays float between Q/DQ.
    integer = fused is not None and input_quantized and (
        output_quantized or node.op_type in ("Gemm", "MatMul"))
    ops = f"Q/DQ → {node.op_type}" + (" → Q/DQ" if output_quantized else "")
    reason = (f"fused by onnxruntime into {fused}" if integer else
              f"onnxruntime has no integer {node.op_type} on CPU" if fused is None else
              "its output is not quantized, so onnxruntime runs it in float")
    if integer and np.any(codes.zero_point != 0):
        reason += ("; non-zero weight zero points take onnxruntime's slow path (5-10x float "
                   "latency measured on x86 AVX2): scheme='symmetric' runs at int8 speed")
    return LayerExport(name, module.bits, ops, integer, reason)


def _session_config(layers: dict, active: list[str], codes: dict,
                    accuracy_level: int) -> dict[str, str]:
    """The onnxruntime session config entries the file needs (see onnx_session_options)."""
    if not active:
        # No activation Q/DQ: let onnxruntime fold each DequantizeLinear into a float weight at
        # load (it keeps them, and dequantizes at every run, otherwise); MatMulNBits stays.
        return {"session.disable_quant_qdq": "1"}
    config = {}
    if any(layers[name].bits > 7 for name in active):  # U8S8 saturation on x86 without VNNI
        config["session.x64quantprecision"] = "1"
    if accuracy_level != 4:  # onnxruntime's own DequantizeLinear -> MatMul rewrite: the same
        config["session.qdq_matmulnbits_accuracy_level"] = str(accuracy_level)
    slow = [name for name in active if np.any(codes[name].zero_point != 0)]
    if slow:
        shown = ", ".join(slow[:3]) + (", ..." if len(slow) > 3 else "")
        warnings.warn(f"{len(slow)} layer(s) ({shown}) hold codes with non-zero zero points "
                      "(asymmetric, more than 6 bits), "
                      "which onnxruntime's integer kernels run on a slow path (5-10x float "
                      "latency measured on x86 AVX2): quantize with scheme='symmetric' for "
                      "int8 speed", stacklevel=3)
    return config


def _weight_only_layer(model, name: str, module, codes, site, accuracy_level: int,
                       act_model: bool) -> LayerExport:
    """Store a layer's codes for a float op (``DequantizeLinear``) or ``MatMulNBits``."""
    from . import graph, nbits

    is_linear = isinstance(module, nn.Linear)
    # 8-bit MatMulNBits is fast only with int8 activations (accuracy_level 4: 0.34x float at
    # batch 1; at level 0, 17-34x slower than float: DEPLOY_NOTES.md B4).
    if is_linear and (module.bits <= _MATMUL_NBITS_MAX_BITS or accuracy_level == 4):
        packed = nbits.matmul_nbits_weight(module)
        if packed is not None and graph.replace_with_matmul_nbits(model, name, site, packed,
                                                                  accuracy_level):
            how = ("int8 activations on the fly (accuracy_level 4)" if accuracy_level == 4
                   else f"accuracy_level {accuracy_level}")
            return LayerExport(name, module.bits, "MatMulNBits", accuracy_level > 0,
                               f"{packed[4]}-bit weights, {how}")
    graph.replace_with_dequantize(model, name, site, codes)
    op = site.nodes[0].op_type
    if codes.block_size is not None:
        reason = ("group-wise grids: blocked DequantizeLinear (onnxruntime's QLinearConv/QGemm "
                  "take per-channel scales only)")
    elif act_model:
        reason = "its input stays float (squant keeps it float; export_onnx's input_range=None)"
    elif is_linear and module.bits <= _MATMUL_NBITS_MAX_BITS:
        reason = "a zero point outside the 4-bit range, or not a plain x @ W.T"
    else:
        reason = ("weight-only: the session folds the DequantizeLinear into a float weight at "
                  "load (float compute; the file keeps the codes)")
    return LayerExport(name, module.bits, f"DequantizeLinear → {op}", False, reason)


def optimized_ops(path: str | os.PathLike, config: dict[str, str] | None = None) -> Counter:
    """How many nodes of each op type onnxruntime's CPU provider runs for the file at
    ``path`` (extended optimizations, which hold the QDQ fusions)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder, "optimized.onnx"))
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return Counter(node.op_type for node in optimized.graph.node)


def _save_loadable(model, path: Path, config: dict[str, str]) -> Counter:
    """Write ``model`` to ``path`` once onnxruntime loads it (a file it cannot load is never left
    there, nor a partial one); returns the op counts of its optimized graph (:func:`optimized_ops`).
    """
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        onnx.save(model, str(temporary))
        try:
            return optimized_ops(temporary, config)
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise QuantizationError(f"onnxruntime cannot load the exported model, so {path} was "
                                    f"not written: {first_line(error)}") from error
