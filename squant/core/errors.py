"""The exception squant raises for bad input: a ``ValueError`` whose message names the tensor or
layer, the problem, and what to do."""


class QuantizationError(ValueError):
    """A weight, option or file that squant cannot quantize as asked."""
