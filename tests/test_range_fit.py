"""``range="fit"`` (kernels/fit.py) and the grid's recipe (``mode``/``range`` None).

The fit keeps, per channel or group, the grid with the least ``sum |d| ** 0.5`` among minmax's
and its candidates, so it is never worse than minmax by that objective; its grids keep an
integer zero point and codes in range; with ``include_zero`` level 0 stays among the codes.
Shapes and weights as in ``test_groups.py`` (ragged groups, g > row, g = 2, kernels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_groups import group_slices, grouped
from test_properties import grid_range
from torch import nn

import squant
from squant.core.options import GROUPED_RECIPE, PAPER_RECIPE, QuantOptions

F32 = np.float32


def fit_objective(weight: np.ndarray, q: squant.QuantizedTensor) -> np.ndarray:
    """Per channel (or group), ``sum |w - (q + Z) * (1 / S)| ** 0.5``, each term in float32
    as the kernel evaluates it (which may fuse and reorder: see ``float32_slack``)."""
    o = weight.shape[0]
    size = weight[0].size
    g = q.group_size or size
    slices = group_slices(size, g)
    index = np.concatenate([np.full(p.stop - p.start, j) for j, p in enumerate(slices)])
    step = (F32(1) / q.scale.numpy().reshape(o, -1))[:, index]
    zero = q.zero_point.numpy().reshape(o, -1)[:, index]
    codes = q.codes.numpy().reshape(o, -1).astype(F32)
    with np.errstate(over="ignore", invalid="ignore"):
        d = np.abs(weight.reshape(o, -1).astype(F32) - (codes + zero) * step)
    return np.stack([np.sqrt(d[:, p]).astype(np.float64).sum(1) for p in slices], 1)


def float32_slack(weight: np.ndarray, group_size: int | None) -> np.ndarray:
    """Per group, how far two float32 evaluations of the objective may differ: a term's
    ``|d|`` is off by a few ulp of ``|w|``, so its square root by up to ``sqrt(4 ulp)``."""
    o = weight.shape[0]
    flat = np.abs(weight.reshape(o, -1).astype(np.float64))
    slices = group_slices(flat.shape[1], group_size or flat.shape[1])
    return np.stack([np.sqrt(flat[:, p] * 2.0**-21).sum(1) for p in slices], 1)


def _finite(weight: np.ndarray) -> bool:
    return bool(np.isfinite(weight.astype(np.float64).max() - weight.min())
                and np.abs(weight).max() < 1e30)


@settings(max_examples=150, deadline=None)
@given(grouped(), st.booleans(), st.booleans())
def test_fit_is_never_worse_than_minmax_by_its_objective(drawn: tuple, per_channel: bool,
                                                         include_zero: bool) -> None:
    """Per group (or channel), any mode and scheme: the fit's ``sum |d|**0.5`` is at most
    minmax's; codes in the grid's range; zero points integers (0 when symmetric); with
    ``include_zero`` level 0 (code ``-Z``) is among the codes."""
    weight, bits, mode, scheme, g, _ = drawn
    if not _finite(weight):
        return
    g = None if per_channel else g
    found = {}
    for range_ in ("minmax", "fit"):
        found[range_] = squant.quantize_weight(weight, bits, mode, scheme=scheme, range=range_,
                                               group_size=g, include_zero=include_zero)
    fit = found["fit"]
    minmax = fit_objective(weight, found["minmax"])
    assert (fit_objective(weight, fit) <= minmax * (1 + 1e-6) + float32_slack(weight, g)).all()
    t_min, t_max = grid_range(bits, scheme)
    assert fit.codes.min() >= t_min and fit.codes.max() <= t_max
    zero = fit.zero_point.numpy()
    assert np.array_equal(zero, np.rint(zero))
    if scheme == "symmetric":
        assert (zero == 0).all()
    elif include_zero:
        assert ((-zero >= t_min) & (-zero <= t_max)).all()


def test_fit_beats_minmax_on_gaussian_groups_and_changes_some_grids() -> None:
    """On 4096 Gaussian groups of 64 the fit lowers the total objective and keeps a grid other
    than minmax's for part of them (it is not a no-op), at 3 and 4 bits."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((64, 4096)).astype(F32)
    for bits in (3, 4):
        minmax = squant.quantize_weight(weight, bits, "E", range="minmax", group_size=64)
        fit = squant.quantize_weight(weight, bits, "E", range="fit", group_size=64)
        changed = (fit.scale != minmax.scale).float().mean()
        assert 0.05 < changed < 1.0
        assert fit_objective(weight, fit).sum() < 0.99 * fit_objective(weight, minmax).sum()


def test_the_recipe_depends_on_the_grid() -> None:
    """mode/range None: the paper's KC/minmax per channel, E/fit with a group_size; given
    values are kept; ``fit`` with granularity tensor is refused."""
    assert (QuantOptions(4).mode, QuantOptions(4).range) == ("KC", "minmax")
    grouped_opts = QuantOptions(4, group_size=64)
    assert (grouped_opts.mode, grouped_opts.range) == (GROUPED_RECIPE["mode"],
                                                       GROUPED_RECIPE["range"])
    assert QuantOptions(4, "KC", range="minmax", group_size=64).mode == "KC"
    assert PAPER_RECIPE == {"mode": "KC", "range": "minmax"}
    with pytest.raises(squant.QuantizationError, match="range 'fit'"):
        QuantOptions(4, range="fit", granularity="tensor")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 200)).astype(F32)
    default = squant.quantize_weight(w, 3, group_size=32)
    explicit = squant.quantize_weight(w, 3, "E", range="fit", group_size=32)
    assert (default.mode, default.range) == ("E", "fit")
    assert torch.equal(default.codes, explicit.codes)
    assert torch.equal(default.scale, explicit.scale)
    paper = squant.quantize_weight(w, 3)
    assert (paper.mode, paper.range) == ("KC", "minmax")


def test_quantize_gives_each_layer_the_recipe_of_its_grid() -> None:
    """In ``squant.quantize``, a layer whose ``layer_options`` drop or add a group_size gets
    that grid's recipe, unless the call names mode or range."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    qnet = squant.quantize(net, 4, group_size=16, layer_options={"2": {"group_size": None}})
    assert (qnet[0].mode, qnet[0].range, qnet[0].group_size) == ("E", "fit", 16)
    assert (qnet[2].mode, qnet[2].range, qnet[2].group_size) == ("KC", "minmax", None)
    qnet = squant.quantize(net, 4, layer_options={"0": {"group_size": 16}})
    assert (qnet[0].mode, qnet[0].range) == ("E", "fit")
    assert (qnet[2].mode, qnet[2].range) == ("KC", "minmax")
    qnet = squant.quantize(net, 4, "KC", group_size=16, layer_options={"2": {"range": "minmax"}})
    assert (qnet[0].mode, qnet[0].range) == ("KC", "fit")
    assert (qnet[2].mode, qnet[2].range) == ("KC", "minmax")
    want = squant.quantize_weight(net[0].weight, 4, group_size=16)
    assert torch.equal(qnet[0].codes, squant.quantize_weight(net[0].weight, 4, "KC",
                                                            range="fit", group_size=16).codes)
    assert torch.equal(squant.quantize(net, 4, group_size=16)[0].codes, want.codes)


def candidate_objectives(weight: np.ndarray, bits: int, g: int, include_zero: bool
                         ) -> np.ndarray:
    """Per group of a 2-D weight, the least ``sum |d| ** 0.5`` over minmax's grid and every
    candidate grid the fit's spec names (kernels/fit.py: steps ``minmax / f`` for each ``f`` of
    ``FIT_FACTORS`` at 2-3 bits, ``FIT_FACTORS_WIDE`` at 4+; for finer steps every window start
    between the one that puts the top level on the max and the one that puts the bottom level on the
    min, for coarser ones the middle start; with ``include_zero`` only windows holding level 0),
    each by round to nearest, written here from that spec in numpy. Infinite for a flat group
    (range within 1e-8), which keeps minmax's grid."""
    from squant.kernels.fit import FIT_FACTORS, FIT_FACTORS_WIDE

    count = F32(2**bits - 1)
    rows = []
    for row in weight.astype(F32):
        best_row = []
        for part in group_slices(row.shape[0], g):
            w = row[part]
            lo, hi = w.min(), w.max()
            if include_zero:
                lo, hi = min(lo, F32(0)), max(hi, F32(0))
            if not hi - lo > F32(1e-8):  # a flat group keeps minmax's exact grid: no candidates
                best_row.append(np.inf)
                continue
            scale = count / max(hi - lo, F32(1e-8))
            grids = [(scale, np.rint(scale * lo))]
            for f in FIT_FACTORS if bits < 4 else FIT_FACTORS_WIDE:
                s = F32(scale / f)
                top, bottom = np.rint(hi * s) - count, np.rint(lo * s)
                first, last = min(top, bottom), max(top, bottom)
                if include_zero:
                    first, last = max(first, -count), min(last, F32(0))
                if f > 1 and first <= last:
                    first = last = np.floor((first + last) * F32(0.5))
                grids += [(s, F32(b)) for b in np.arange(first, last + 1)]
            errors = []
            for s, b in grids:
                level = np.clip(np.rint(s * w), b, b + count)
                errors.append(np.sqrt(np.abs(w - level * (F32(1) / s))).astype(np.float64).sum())
            best_row.append(min(errors))
        rows.append(best_row)
    return np.array(rows)


@settings(max_examples=100, deadline=None)
@given(grouped(mode=st.just("E")), st.booleans())
def test_round_to_nearest_fit_finds_the_best_candidate(drawn: tuple, include_zero: bool
                                                       ) -> None:
    """Mode E, asymmetric (kernels' ``_fit_rounded``, one pass per candidate, codes written
    once): each group's objective is the least over every candidate grid of the spec,
    enumerated independently in numpy (to float32 slack), not just below minmax's."""
    weight, bits, _, _, g, _ = drawn
    if not _finite(weight):
        return
    weight = weight.reshape(weight.shape[0], -1)
    q = squant.quantize_weight(weight, bits, "E", scheme="asymmetric", range="fit",
                               group_size=g, include_zero=include_zero)
    got = fit_objective(weight, q)
    want = candidate_objectives(weight, bits, g, include_zero)
    assert (got <= want * (1 + 1e-6) + float32_slack(weight, g)).all()
