"""What ``squant.export_onnx`` wrote: per layer, the ONNX ops it became, integer or float, why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerExport:
    """One quantized layer in the exported file.

    ``ops``: the ONNX ops holding it in the file (e.g. ``DequantizeLinear → Conv``,
    ``MatMulNBits``); ``integer``: whether onnxruntime's CPU provider runs it with integer
    kernels; ``reason``: why (the fused kernel, or why it stays float).
    """

    name: str
    bits: int
    ops: str
    integer: bool
    reason: str


@dataclass
class ExportReport:
    """Returned by :func:`squant.export_onnx`; ``print(report)`` shows a table.

    ``layers``: one :class:`LayerExport` per quantized layer; ``optimized_ops``: how many nodes
    of each op type onnxruntime's optimized graph holds (e.g. ``QLinearConv``);
    ``file_bytes``: the file's size; ``session_config``: the onnxruntime session config
    entries the file needs (see :func:`squant.onnx_session_options`); ``faithful_model``:
    with ``export_onnx(faithful=True)``, the PyTorch model computing what the file computes
    (:func:`squant.export_faithful`), else None.
    """

    path: str
    layers: list[LayerExport] = field(default_factory=list)
    optimized_ops: Counter = field(default_factory=Counter)
    file_bytes: int = 0
    session_config: dict[str, str] = field(default_factory=dict)
    faithful_model: object = field(default=None, repr=False)  # export_onnx(faithful=True)

    @property
    def integer_layers(self) -> int:
        return sum(layer.integer for layer in self.layers)

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.file_bytes / 2**20:.2f} MiB, {self.integer_layers} of "
                 f"{len(self.layers)} quantized layers run as integer kernels"]
        width = max((len(layer.name) for layer in self.layers), default=5)
        for layer in self.layers:
            kind = "integer" if layer.integer else "float"
            lines.append(f"  {layer.name:<{width}}  {layer.bits}b  {kind:<7}  {layer.ops}: "
                         f"{layer.reason}")
        ops = ", ".join(f"{op} x{count}" for op, count in sorted(self.optimized_ops.items()))
        lines.append(f"  onnxruntime's optimized graph: {ops}")
        if self.session_config:
            lines.append(f"  session config: {self.session_config}")
        return "\n".join(lines)
