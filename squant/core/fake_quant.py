"""The activation fake-quantizer: quantize to an asymmetric per-tensor grid, dequantize in float.

The rule is the SQuant paper's (``ACTIVATIONS_SPEC.md``); quantized layers run it on their input,
the range finders of :mod:`squant.ranges` choose its ``[lo, hi]``.
"""

from __future__ import annotations

import torch


def grid(lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int
         ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(scale, zero_point, low, high)`` of the grid spanning ``[lo, hi]`` at ``bits``, as
    :func:`fake_quantize` uses it: float32 0-dim ``scale`` and ``zero_point``, code range
    ``[low, high]`` (see there)."""
    n = 2 ** (bits - 1)
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    signed = bool(lo < 0)
    scale = (2**bits - 1) / torch.clamp(hi - lo, min=1e-8)
    zero_point = torch.round(scale * lo) + (n if signed else 0)
    low, high = (-n, n - 1) if signed else (0, 2 * n - 1)
    return scale, zero_point, low, high


def fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int
                  ) -> torch.Tensor:
    """``x`` quantized to ``bits`` on the grid spanning ``[lo, hi]``, then dequantized.

    ``scale = (2**b - 1) / max(hi - lo, 1e-8)``, ``zp = round(scale * lo) + (n if lo < 0)``,
    ``q = round(scale * x - zp)`` clamped to ``[-n, n-1]`` (signed, ``lo < 0``) or ``[0, 2n-1]``,
    output ``(q + zp) / scale``, with ``n = 2**(b-1)``; computed in float32, returned in
    ``x``'s dtype.
    """
    scale, zero_point, low, high = grid(lo, hi, bits)
    if torch.is_grad_enabled() and x.requires_grad:  # autograd needs the out-of-place ops
        q = torch.clamp(torch.round(scale * x.float() - zero_point), low, high)
        return ((q + zero_point) / scale).to(x.dtype)
    # The same float32 operations in the same order, in place on one new tensor: the same
    # bits with one allocation instead of six (inference is dominated by these passes).
    out = torch.mul(x.float(), scale)
    out.sub_(zero_point).round_().clamp_(low, high).add_(zero_point).div_(scale)
    return out.to(x.dtype)


def fake_quantize_linear(x: torch.Tensor, scale: float, zero_point: int, low: int, high: int
                         ) -> torch.Tensor:
    """ONNX's ``QuantizeLinear`` then ``DequantizeLinear`` on a per-tensor grid, as onnxruntime
    computes them: ``q = clamp(round_half_even(x / scale) + zero_point, low, high)``, output
    ``(q - zero_point) * scale``; ``scale`` a float32 value, ``[low, high]`` the code type's
    range (uint8: ``[0, 255]``). Computed in float32, returned in ``x``'s dtype."""
    scale_t = torch.tensor(scale, dtype=torch.float32, device=x.device)
    q = torch.div(x.float(), scale_t).round_().add_(zero_point).clamp_(low, high)
    return q.sub_(zero_point).mul_(scale_t).to(x.dtype)
