"""The quantizers ``bench/bench_transformers.py`` compares, each applied to the same set of
layers: every ``nn.Linear`` inside the transformer blocks (``model.layers.*`` of SmolLM2,
``encoder.layer.*`` of MiniLM). Embeddings, norms, SmolLM2's ``lm_head`` (tied to the
embedding) and MiniLM's pooler stay float for every method.

Each method maps ``(model, names, bits)`` to ``{name: dequantized float32 weight}``; the caller
times that call and writes the weights back, so every method is evaluated the same way.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import squant

Weights = dict[str, torch.Tensor]
BLOCK_PREFIXES = ("model.layers.", "encoder.layer.")


@dataclass(frozen=True)
class Method:
    """A quantizer of the table: ``label`` in the table, ``family`` for the plot, ``group``
    (None: per output channel) and the function, or the ``reason`` it cannot run here."""

    label: str
    family: str
    group: int | None
    run: Callable[[nn.Module, list[str], int], Weights] | None
    reason: str = ""


def block_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers inside the transformer blocks, in module order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(BLOCK_PREFIXES)]


def rtn_weight(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Round to nearest on squant's asymmetric grid, per output row or per group of ``group``
    consecutive input features (the last group shorter if ``group`` does not divide ``I``).

    Per group: ``S = (2**b - 1) / max(hi - lo, 1e-8)``, ``Z = round(S * lo) + 2**(b-1)``,
    ``q = clamp(round(S * w - Z), -2**(b-1), 2**(b-1) - 1)``, weight ``(q + Z) / S``, all in
    float32 (kernels/grid.py, ``grid_params``). ``w``: ``(O, I)`` float; returns float32.
    """
    w = w.detach().float()
    rows, cols = w.shape
    g = cols if group is None else min(group, cols)
    pad = (-cols) % g
    # Pad with the row's last value: the last group's min and max stay its own.
    padded = torch.cat([w, w[:, -1:].expand(rows, pad)], 1) if pad else w
    groups = padded.reshape(rows, -1, g)
    n = 2 ** (bits - 1)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = torch.tensor(2.0**bits - 1) / (hi - lo).clamp(min=1e-8)
    zero = torch.round(scale * lo) + n
    codes = torch.clamp(torch.round(scale * groups - zero), -n, n - 1)
    return ((codes + zero) / scale).reshape(rows, -1)[:, :cols]


def _linears(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    return {name: modules[name] for name in names}


def rtn(group: int | None) -> Callable[[nn.Module, list[str], int], Weights]:
    """Plain torch RTN (per channel, or in groups of ``group``) of every named Linear."""
    def run(model: nn.Module, names: list[str], bits: int) -> Weights:
        return {name: rtn_weight(m.weight, bits, group)
                for name, m in _linears(model, names).items()}
    return run


def squant_model(group: int | None, mode: str | None = None, **options: object
                 ) -> Callable[[nn.Module, list[str], int], Weights]:
    """``squant.quantize(model, bits, mode, skip=<every other Linear>, inplace=True)`` (with
    ``group_size`` when given; mode/range None: squant's recipe for the grid), then the
    dequantized weights of the named layers."""
    def run(model: nn.Module, names: list[str], bits: int) -> Weights:
        chosen = set(names)
        skip = [n for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n not in chosen]
        extra = dict(options) if group is None else {"group_size": group, **options}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = squant.quantize(model, bits, mode, skip=skip, inplace=True, **extra)
        float_model = squant.dequantize(qmodel, inplace=True)
        return {name: m.weight.detach().float() for name, m in
                _linears(float_model, names).items()}
    return run


def squant_groups_as_channels(group: int) -> Callable[[nn.Module, list[str], int], Weights]:
    """Bench prototype of grouped SQuant before squant has ``group_size``: each weight viewed as
    ``(O * I / g, g)`` so that every group is a channel of one batched ``quantize_weights`` call
    (KC; for a Linear the K pass is empty, so this is CQ within each group). Needs g | I."""
    def run(model: nn.Module, names: list[str], bits: int) -> Weights:
        linears = _linears(model, names)
        views = [m.weight.detach().float().reshape(-1, group) for m in linears.values()]
        done = squant.quantize_weights(views, bits, "KC")
        return {name: q.dequantize().reshape(m.weight.shape)
                for (name, m), q in zip(linears.items(), done)}
    return run


def hqq(group: int, integer_zero: bool = False
        ) -> Callable[[nn.Module, list[str], int], Weights]:
    """HQQ with its optimiser and its own defaults (``hqq_base_quant_config``: axis 1, zero
    rounded at 4 bits only, then refined in float), on the CPU, one weight at a time.
    ``integer_zero``: then round each optimised zero point to an integer and round the codes
    again on that grid (what HQQ's optimiser gives on squant's kind of grid)."""
    def run(model: nn.Module, names: list[str], bits: int) -> Weights:
        from hqq.core.quantize import Quantizer

        out = {}
        for name, m in _linears(model, names).items():
            w = m.weight.detach().float()
            codes, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group,
                                             optimize=True, round_zero=bits == 4, axis=1,
                                             bitpack=False, device="cpu")
            zero, scale = meta["zero"], meta["scale"]
            if integer_zero:
                zero = torch.round(zero)
                codes = torch.clamp(torch.round(w.reshape(-1, group) / scale + zero), 0,
                                    2**bits - 1)
            out[name] = ((codes.float() - zero) * scale).reshape(meta["shape"])
        return out
    return run


def quanto_qint4(model: nn.Module, names: list[str], bits: int) -> Weights:
    """optimum-quanto ``quantize(weights=qint4)`` (its groups of 128) + ``freeze`` of the named
    layers; the other Linears excluded."""
    from optimum.quanto import freeze, qint4, quantize

    chosen = set(names)
    exclude = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen]
    quantize(model, weights=qint4, exclude=exclude)
    freeze(model)
    return {name: m.qweight.dequantize().float() for name, m in _linears(model, names).items()}


def methods(bits: int, squant_grouped: bool) -> list[Method]:
    """The table's methods at ``bits``. ``squant_grouped``: squant has ``group_size`` (else the
    groups-as-channels prototype stands in)."""
    out = [Method("RTN per channel", "RTN", None, rtn(None)),
           Method("SQuant KC per channel", "SQuant", None, squant_model(None))]
    for g in (32, 64, 128):
        out.append(Method(f"RTN g{g}", "RTN", g, rtn(g)))
        if squant_grouped:  # quantize(model, bits, group_size=g): the grouped recipe (E + fit)
            out.append(Method(f"SQuant g{g}", "SQuant", g, squant_model(g)))
        else:
            out.append(Method(f"SQuant g{g} (groups as channels)", "SQuant", g,
                              squant_groups_as_channels(g)))
    if squant_grouped:  # the paper's passes in groups, and the least-squares range search
        out.append(Method("SQuant KC g64", "SQuant KC", 64,
                          squant_model(64, "KC", range="minmax")))
        out.append(Method("SQuant E g64 range=search", "SQuant KC", 64,
                          squant_model(64, "E", range="search")))
    for label, g, run in (("HQQ g64", 64, hqq(64)), ("HQQ g128", 128, hqq(128)),
                          ("HQQ g64 integer zero", 64, hqq(64, integer_zero=True))):
        out.append(Method(label, "HQQ", g, run) if importlib.util.find_spec("hqq")
                   else Method(label, "HQQ", g, None,
                               "hqq not installed: DISABLE_CUDA=1 pip install --no-deps hqq"))
    if importlib.util.find_spec("optimum.quanto") is None:
        out.append(Method("quanto qint4 g128", "quanto", 128, None,
                          "optimum-quanto not installed: pip install --no-deps optimum-quanto"))
    elif bits != 4:
        out.append(Method("quanto qint4 g128", "quanto", 128, None,
                          f"quanto has no {bits}-bit integer weight type (qint2/4/8 only)"))
    else:
        out.append(Method("quanto qint4 g128", "quanto", 128, quanto_qint4))
    return out
