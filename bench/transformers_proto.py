"""Issue 21's input-aware objective, measured and prototyped in the benchmark (not in squant).

A Linear fed by a norm layer sees inputs whose feature ``c`` has scale ``gamma_c`` and mean
``beta_c`` (the norm's weight and bias; RMSNorm: ``beta = 0``). Modelling them as independent
Gaussians, the expected squared output error of a row with weight error ``d`` is
``sum(gamma_c**2 * d_c**2) + (sum(beta_c * d_c))**2``. ``gaussian_error`` reports both terms,
summed over the norm-fed layers and divided by the same terms of the weight itself, for any
method's weights. The PROTOTYPE method picks each group's range on that objective (RTN codes on
squant's integer-zero grid) to measure whether it wins; it is labelled "proto" in the table.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers_methods import Method, Weights, _linears

Norms = dict[str, tuple[torch.Tensor, torch.Tensor]]
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def feeding_norms(model: nn.Module) -> Norms:
    """``{linear name: (gamma, beta)}`` for the block Linears that a norm layer feeds directly,
    read from the module structure (Llama: input_layernorm -> q/k/v_proj,
    post_attention_layernorm -> gate/up_proj; BERT (post-norm): the previous block's
    output.LayerNorm (or embeddings.LayerNorm) -> query/key/value, attention.output.LayerNorm
    -> intermediate.dense). o_proj/down_proj and BERT's attention.output.dense/output.dense are
    fed by attention or the MLP's activation, so they have no entry."""
    modules = dict(model.named_modules())
    out: Norms = {}

    def add(linears: list[str], norm_name: str) -> None:
        norm = modules[norm_name]
        gamma = norm.weight.detach().float()
        bias = getattr(norm, "bias", None)
        beta = torch.zeros_like(gamma) if bias is None else bias.detach().float()
        out.update({name: (gamma, beta) for name in linears if name in modules})

    if "model.layers.0.input_layernorm" in modules:
        i = 0
        while f"model.layers.{i}.input_layernorm" in modules:
            p = f"model.layers.{i}."
            add([p + f"self_attn.{x}_proj" for x in "qkv"], p + "input_layernorm")
            add([p + "mlp.gate_proj", p + "mlp.up_proj"], p + "post_attention_layernorm")
            i += 1
    elif "encoder.layer.0.attention.self.query" in modules:
        i = 0
        while f"encoder.layer.{i}.attention.self.query" in modules:
            p = f"encoder.layer.{i}."
            feeder = ("embeddings.LayerNorm" if i == 0
                      else f"encoder.layer.{i - 1}.output.LayerNorm")
            add([p + f"attention.self.{x}" for x in ("query", "key", "value")], feeder)
            add([p + "intermediate.dense"], p + "attention.output.LayerNorm")
            i += 1
    return out


def gaussian_error(base: nn.Module, weights: Weights, norms: Norms) -> dict[str, float]:
    """Relative expected output error of the norm-fed layers under the Gaussian input model:
    ``gauss_diag = sum(gamma**2 d**2) / sum(gamma**2 w**2 + (beta.w)**2)``, ``gauss_mean`` the
    same for ``sum((beta.d)**2)``; and ``weight_mse_other``, the relative squared weight error
    of the other layers (their inputs have no norm to model)."""
    linears = _linears(base, list(weights))
    diag = mean = ref = other = other_ref = 0.0
    with torch.no_grad():
        for name, q in weights.items():
            w = linears[name].weight.detach().float()
            d = q.float() - w
            if name in norms:
                gamma, beta = norms[name]
                diag += float((d.square() * gamma.square()).sum())
                mean += float((d @ beta).square().sum())
                ref += float((w.square() * gamma.square()).sum() + (w @ beta).square().sum())
            else:
                other += float(d.square().sum())
                other_ref += float(w.square().sum())
    return {"gauss_diag": diag / max(ref, 1e-30), "gauss_mean": mean / max(ref, 1e-30),
            "weight_mse_other": other / max(other_ref, 1e-30)}


def _grid(groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """RTN of ``groups`` on squant's asymmetric grid of the range ``[lo, hi]`` (kernels/grid.py),
    codes clamped, so a shrunk range clips the extremes."""
    n = 2 ** (bits - 1)
    scale = torch.tensor(2.0**bits - 1) / (hi - lo).clamp(min=1e-8)
    zero = torch.round(scale * lo) + n
    return (torch.clamp(torch.round(scale * groups - zero), -n, n - 1) + zero) / scale


def weighted_range_rtn(w: torch.Tensor, omega: torch.Tensor, bits: int, group: int
                       ) -> torch.Tensor:
    """PROTOTYPE. Each group's range chosen to minimise ``sum(omega_c * d_c**2)``: the max end
    shrunk by each factor of ``SHRINK`` (min end fixed), the best kept, then the min end
    likewise. ``w``: ``(O, I)`` with ``group | I``; ``omega``: ``(I,)``; returns float32."""
    rows, cols = w.shape
    groups = w.detach().float().reshape(rows, cols // group, group)
    weight = omega.float().reshape(1, cols // group, group)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    best = _grid(groups, lo, hi, bits)
    best_err = ((best - groups).square() * weight).sum(-1, keepdim=True)
    for end in ("hi", "lo"):
        base_lo, base_hi = lo, hi
        for factor in SHRINK[1:]:
            cand_lo, cand_hi = ((base_lo, base_hi * factor) if end == "hi"
                                else (base_lo * factor, base_hi))
            cand = _grid(groups, cand_lo, cand_hi, bits)
            err = ((cand - groups).square() * weight).sum(-1, keepdim=True)
            better = err < best_err
            best = torch.where(better, cand, best)
            best_err = torch.where(better, err, best_err)
            lo = torch.where(better, cand_lo, lo)
            hi = torch.where(better, cand_hi, hi)
    return best.reshape(rows, cols)


def proto_method(group: int, norms: Norms, weighted: bool):
    """The prototype on every named Linear: ``omega = gamma**2`` where a norm feeds the layer
    (``weighted``), else 1 (plain MSE range search)."""
    def run(model: nn.Module, names: list[str], bits: int) -> Weights:
        out = {}
        for name, m in _linears(model, names).items():
            cols = m.weight.shape[1]
            omega = (norms[name][0].square() if weighted and name in norms
                     else torch.ones(cols))
            out[name] = weighted_range_rtn(m.weight, omega, bits, group)
        return out
    return run


def weighted_fit(w: torch.Tensor, omega: torch.Tensor, bits: int, group: int,
                 factors: tuple[float, ...], p: float = 0.5) -> torch.Tensor:
    """PROTOTYPE of ``range="fit"`` (kernels/fit.py: the same candidates, round to nearest on
    integer-zero grids) with each element's error weighted: ``sum (omega_c * |d_c|) ** p`` per
    group (``omega = |gamma|``: the error of the output term ``gamma_c x_c w_c`` of a
    norm-fed input). ``omega`` = ones is the kernels' fit. ``w``: ``(O, I)`` with
    ``group | I``; returns float32."""
    rows, cols = w.shape
    groups = w.detach().float().reshape(rows, cols // group, group)
    weight = omega.float().reshape(1, cols // group, group)
    levels = 2**bits - 1
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = levels / (hi - lo).clamp(min=1e-8)

    def error(q: torch.Tensor) -> torch.Tensor:
        return ((q - groups).abs() * weight).pow(p).sum(-1, keepdim=True)

    def on_grid(s: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(groups * s), bottom, bottom + levels) / s

    best = on_grid(scale, torch.round(lo * scale))
    best_err = error(best)
    for f in factors:
        s = scale / f
        top, bottom = torch.round(hi * s) - levels, torch.round(lo * s)
        first, last = torch.minimum(top, bottom), torch.maximum(top, bottom)
        if f > 1:
            first = last = torch.floor((first + last) * 0.5)
        for k in range(4):  # window starts first .. last (at most 3 for these factors)
            cand = on_grid(s, first + k)
            err = error(cand)
            better = (first + k <= last) & (err < best_err)
            best = torch.where(better, cand, best)
            best_err = torch.where(better, err, best_err)
    return best.reshape(rows, cols)


def weighted_fit_method(group: int, norms: Norms, power: float, p: float = 0.5):
    """The weighted fit on every named Linear: ``omega = |gamma| ** power`` where a norm feeds
    the layer, else 1 (``power`` 0: the kernels' unweighted fit); the kernels' factors."""
    from squant.kernels.fit import FIT_FACTORS, FIT_FACTORS_WIDE

    def run(model: nn.Module, names: list[str], bits: int) -> Weights:
        factors = tuple(float(f) for f in (FIT_FACTORS if bits < 4 else FIT_FACTORS_WIDE))
        out = {}
        for name, m in _linears(model, names).items():
            cols = m.weight.shape[1]
            omega = (norms[name][0].abs() ** power if power and name in norms
                     else torch.ones(cols))
            out[name] = weighted_fit(m.weight, omega, bits, group, factors, p)
        return out
    return run


def methods(norms: Norms) -> list[Method]:
    """The prototype rows: MSE range search and gamma**2-weighted range search, g64 and g128;
    the fit unweighted and weighted by |gamma| (p = 1/2 and 1), g64."""
    out = []
    for g in (64, 128):
        out.append(Method(f"proto RTN+MSE range g{g}", "proto", g, proto_method(g, norms, False)))
        out.append(Method(f"proto RTN+γ² range g{g}", "proto", g, proto_method(g, norms, True)))
    out.append(Method("proto fit g64", "proto", 64, weighted_fit_method(64, norms, 0.0)))
    out.append(Method("proto fit |γ| g64", "proto", 64, weighted_fit_method(64, norms, 1.0)))
    out.append(Method("proto fit |γ|^0.5 g64", "proto", 64, weighted_fit_method(64, norms, 0.5)))
    out.append(Method("proto fit |γ| p=1 g64", "proto", 64,
                      weighted_fit_method(64, norms, 1.0, p=1.0)))
    return out
