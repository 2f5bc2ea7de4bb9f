"""Running a file written by ``squant.export_onnx``: the onnxruntime session options it needs,
and the PyTorch model that computes what it computes (``export_faithful``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..core.errors import QuantizationError


def onnx_session_options(path: str | os.PathLike, *, threads: int | None = None):
    """An ``onnxruntime.SessionOptions`` for the squant ONNX file at ``path``.

    It applies the session config entries the export recorded in the file's metadata
    (``squant.session_config``): for a weight-only file ``session.disable_quant_qdq = 1``, so
    that onnxruntime folds each ``DequantizeLinear`` into a float weight once at load (without
    it, it dequantizes at every run: 3x the float latency measured on the demo CNN);
    ``session.x64quantprecision = 1`` when a layer with
    activation Q/DQ holds 8-bit weight codes, because x86 CPUs with AVX2 but no VNNI saturate
    int16 sums in their U8S8 kernels (1-180% error measured; exact with this option at ~0.7x
    float latency instead of ~0.55x; DEPLOY_NOTES.md B3). Codes of <= 7 bits (W4A8, W6A8) need
    nothing. ``threads``: intra-op threads (default: onnxruntime's).

    Raises:
        ImportError: onnx or onnxruntime missing (``pip install "squant[onnx]"``).
        FileNotFoundError: no file at ``path``.
        QuantizationError: the file is not an ONNX model.
    """
    from .onnx_export import CONFIG_KEY, require_onnx

    require_onnx()
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except FileNotFoundError:
        raise
    except Exception as error:  # protobuf's DecodeError and kin: not an ONNX model
        raise QuantizationError(f"{os.fspath(path)} is not an ONNX model ({error})") from error
    props = {prop.key: prop.value for prop in model.metadata_props}
    options = ort.SessionOptions()
    for key, value in json.loads(props.get(CONFIG_KEY, "{}")).items():
        options.add_session_config_entry(key, value)
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def export_faithful(qmodel: nn.Module, path: str | os.PathLike,
                    example_inputs: torch.Tensor | Sequence[torch.Tensor], *,
                    opset: int = 21, dynamic_batch: bool = True,
                    integer_kernels: bool = True) -> nn.Module:
    """The PyTorch model that computes what the ONNX file at ``path``, written by
    :func:`squant.export_onnx` for ``qmodel``, computes, value for value as onnxruntime's CPU
    provider does (:mod:`squant.export.faithful`): ``qmodel``'s dequantized weights in float,
    every activation the file quantizes (layer inputs as squant does, but also the first
    layer's input, layer outputs, residual adds, pools: each ``QuantizeLinear`` →
    ``DequantizeLinear`` pair) fake-quantized with the file's own scale and zero point
    (:func:`squant.core.fake_quant.fake_quantize_linear`), and, with ``integer_kernels``
    (default), every group onnxruntime fuses into an integer kernel (``QLinearConv``,
    ``QGemm``, ``QLinearMatMul``, ``QLinearAdd``) computed as that kernel computes it: integer
    sums, its float32 requantization multiplier, round half to even. Its accuracy is then the
    file's, in PyTorch. ``integer_kernels=False`` computes those groups in float between the
    fake-quantizers instead (what the file means, not what onnxruntime rounds).

    Bit-exact (checked against onnxruntime 1.32's x86 AVX2 kernels) for files whose weight
    codes have at most 7 bits, or run with :func:`onnx_session_options` (8-bit codes:
    ``x64quantprecision``; without it onnxruntime's U8S8 kernels saturate); a ``ReduceMean``
    between Q/DQ pairs sums in onnxruntime's order. Float ops onnxruntime runs outside such
    groups (``LayerNormalization``, ``Gelu``...) may differ in the last bit.

    ``example_inputs``, ``opset``, ``dynamic_batch``: as given to ``export_onnx`` (torch's
    exporter runs again: its graph names the tensors the file quantizes). Returns a
    ``torch.fx.GraphModule`` (CPU, float32, eval mode) taking the model's inputs.

    Raises:
        ImportError: onnx, onnxscript or onnxruntime missing (``pip install "squant[onnx]"``).
        QuantizationError: the file quantizes a tensor the model's graph does not compute (the
            file was not written for this model).
    """
    from .faithful import simulate
    from .onnx_export import require_onnx
    from .torch_export import as_inputs, export_float

    require_onnx()
    import onnx

    float_model, program = export_float(qmodel, as_inputs(example_inputs), opset,
                                        dynamic_batch)
    return simulate(program, float_model, onnx.load(os.fspath(path)),
                    integer_kernels=integer_kernels)
