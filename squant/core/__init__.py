"""The core: one weight tensor in, its SQuant codes out.

Options and their checks (``options``), the error type (``errors``), the batched call into the
numba kernels (``batch``), :class:`QuantizedTensor` and ``quantize_weight(s)`` (``tensor``), the
activation fake-quantizer (``fake_quant``), the per-layer error statistics (``report``) and the
one-line notice while numba compiles the kernels (``compile_notice``).
Imports only :mod:`squant.kernels`, numpy and torch.
"""
