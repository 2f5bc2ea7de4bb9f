"""A literal, slow transcription of shared/SQUANT_SPEC.md, used only as a test oracle.

It follows the spec line by line with full stable sorts and ``math.fsum`` so that the fast
numba kernels can be checked against the spec itself on random inputs, not only against the
fixed conformance cases. Deliberately simple; never used by the package.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def _grid(w: np.ndarray, bits: int, scheme: str, granularity: str):
    n = 2 ** (bits - 1)
    o = w.shape[0]
    if granularity == "tensor":
        lo = np.full(o, w.min(), dtype=F32)
        hi = np.full(o, w.max(), dtype=F32)
    else:
        lo = w.min(axis=(1, 2)).astype(F32)
        hi = w.max(axis=(1, 2)).astype(F32)
    if scheme == "symmetric":
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = F32(n - 1) / np.maximum(amax, F32(1e-8))
        zero = np.zeros(o, dtype=F32)
        t_min, t_max = -(n - 1), n - 1
    else:
        scale = F32(2**bits - 1) / np.maximum(hi - lo, F32(1e-8))
        zero = (np.rint(scale * lo) + F32(n)).astype(F32)
        t_min, t_max = -n, n - 1
    return scale.astype(F32), zero, t_min, t_max


def _flip_group(idx, order_up, order_down, err, up_pri, down_pri, up_val, up_err, down_val,
                down_err, value):
    """Spec 'The flip step on one group'. ``idx`` are the flat indices of the group; the order
    comes from ``order_up``/``order_down`` (KQ: the EQ priorities; CQ: the current ones, i.e.
    ``up_pri``/``down_pri`` themselves) and step 5 sets ``up_pri``/``down_pri``."""
    se = math.fsum(float(v) for v in err[idx])  # step 1: as exactly as float64 allows
    up = se < 0
    k = int(np.rint(abs(se)))  # step 2
    order_pri = order_up if up else order_down
    order = idx[np.argsort(-order_pri[idx], kind="stable")]  # step 3
    for i in order[:k]:  # step 4
        if up:
            value[i], err[i] = up_val[i], up_err[i]
        else:
            value[i], err[i] = down_val[i], down_err[i]
    if k >= abs(se):  # step 5
        j = order[k - 1]
        (down_pri if up else up_pri)[j] = abs(err[j])
    else:
        j = order[k]
        (up_pri if up else down_pri)[j] = abs(err[j])


def squant_oracle(w3: np.ndarray, bits: int, kernel: bool, channel: bool,
                  scheme: str = "asymmetric", granularity: str = "channel"):
    """Quantize an ``(O, I, K)`` float32 weight as the spec says; returns codes, scale, zero."""
    w3 = np.asarray(w3, dtype=F32)
    o, i_dim, k_dim = w3.shape
    scale, zero, t_min, t_max = _grid(w3, bits, scheme, granularity)
    x = (scale[:, None, None] * w3 - zero[:, None, None]).astype(F32).reshape(o, -1)
    r = np.rint(x).astype(F32)
    e = (r - x).astype(F32)
    has_up = (e < 0) & (x < t_max)
    has_down = (e > 0) & (x > t_min)
    up_val = np.where(has_up, r + 1, r)
    down_val = np.where(has_down, r - 1, r)
    up_err = np.where(has_up, (e + F32(1)).astype(F32), F32(0)).astype(F32)
    down_err = np.where(has_down, (e - F32(1)).astype(F32), F32(0)).astype(F32)
    up_pri = np.where(has_up, np.abs(e), F32(0)).astype(F32)
    down_pri = np.where(has_down, np.abs(e), F32(0)).astype(F32)
    value = r.copy()
    err = e.copy()
    for c in range(o):
        args = (err[c], up_pri[c], down_pri[c], up_val[c], up_err[c], down_val[c], down_err[c],
                value[c])
        if kernel and k_dim > 1:
            kernels = [np.arange(i * k_dim, (i + 1) * k_dim) for i in range(i_dim)]
            # The orders come from EQ priorities; then every priority is reset to 0.
            eq_up, eq_down = up_pri[c].copy(), down_pri[c].copy()
            up_pri[c][:] = 0
            down_pri[c][:] = 0
            for idx in kernels:
                _flip_group(idx, eq_up, eq_down, *args)
        if channel:
            _flip_group(np.arange(i_dim * k_dim), up_pri[c], down_pri[c], *args)
    codes = np.clip(value, t_min, t_max).astype(np.int8).reshape(w3.shape)
    return codes, scale, zero
