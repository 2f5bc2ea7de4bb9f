"""torch's side of the export: the float model of a quantized one (dequantized weights) as
ONNX by torch's dynamo exporter, its example inputs checked, its own errors surfaced, and the
exporter's and quantizer's chatter silenced."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.errors import QuantizationError, first_line
from ..model import dequantize


def as_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    """The example inputs as a tuple of CPU tensors, floating ones in float32 (the exported
    model computes in float32, whatever the dtype of ``qmodel``)."""
    if isinstance(example_inputs, torch.Tensor):
        inputs = (example_inputs,)
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        inputs = tuple(example_inputs)
    else:
        inputs = ()
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("example_inputs must be a tensor or a non-empty sequence of tensors, "
                        f"got {type(example_inputs).__name__}")
    return tuple((x.float() if x.is_floating_point() else x).detach().cpu() for x in inputs)


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception ``error`` was raised from (torch's exporter
    wraps the model's own error, e.g. a shape mismatch, in several layers of advice)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return first_line(error)


def export_float(qmodel: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int,
                 dynamic_batch: bool):
    """The float model (dequantized weights) exported by torch's dynamo exporter: the ONNX
    model and the ``torch.export`` program it was translated from (whose node names are the
    ONNX tensors' names)."""
    import onnx

    float_model = dequantize(qmodel).cpu().float().eval()
    # torch.export specializes a dim of size 1: export with two samples when given one.
    sample = tuple(x.expand(2, *x.shape[1:]).contiguous() if dynamic_batch and x.dim()
                   and x.shape[0] == 1 else x for x in inputs)
    shapes = tuple({0: torch.export.Dim("batch")} if x.dim() else None for x in sample) \
        if dynamic_batch else None
    with tempfile.TemporaryDirectory() as folder, quiet():
        target = Path(folder, "float.onnx")
        try:
            program = torch.onnx.export(float_model, sample, str(target), dynamo=True,
                                        opset_version=opset, dynamic_shapes=shapes,
                                        external_data=False, verbose=False)
        except Exception as error:  # torch raises many kinds; say which step failed
            raise QuantizationError(f"torch.onnx.export could not export "
                                    f"{type(qmodel).__name__}: {_root_cause(error)}") from error
        return onnx.load(str(target)), program.exported_program


@contextlib.contextmanager
def quiet():
    """Silence the exporter's and quantizer's progress lines and advice (stdout, warnings,
    the root logger), which say nothing about the user's model."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
