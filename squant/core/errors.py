"""The exception squant raises for bad input: a ``ValueError`` whose message names the tensor or
layer, the problem, and what to do; and the line of another library's error it quotes."""

import re

_ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


class QuantizationError(ValueError):
    """A weight, option or file that squant cannot quantize as asked."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (torch's, onnxruntime's and
    safetensors' run over several; torch's exporter colours them), without terminal colour
    codes and with its runs of whitespace made single spaces; the error's type name if it has
    no message."""
    lines = [" ".join(line.split()) for line in _ANSI_CODES.sub("", str(error)).splitlines()]
    return next((line for line in lines if line), type(error).__name__)
