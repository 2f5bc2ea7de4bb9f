"""The onnxruntime session options a file written by ``squant.export_onnx`` needs."""

from __future__ import annotations

import json
import os


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
    """
    from .onnx_export import CONFIG_KEY, require_onnx

    require_onnx()
    import onnx
    import onnxruntime as ort

    model = onnx.load(os.fspath(path), load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    options = ort.SessionOptions()
    for key, value in json.loads(props.get(CONFIG_KEY, "{}")).items():
        options.add_session_config_entry(key, value)
    if threads is not None:
        options.intra_op_num_threads = threads
    return options
