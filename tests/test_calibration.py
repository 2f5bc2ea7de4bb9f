"""Activation ranges from real inputs (``calibration_data``): the histogram methods on
hand-computed histograms, the passes over the data, and what calibration must not change.

Expected values are worked out by hand (in the comments) or recomputed here in float64 from
the inputs each layer received (captured with forward pre-hooks on the weight-only model,
whose weights are the same), never with squant's own calibration code.
"""

from __future__ import annotations

import copy
import gc
import math
import time
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import squant
from squant.ranges import calibration_methods as cm
from squant.ranges.calibration import LayerObserver

SHAPE = (4,)
ACT_KEYS = ("act_lo", "act_hi", "act_bits")
DATA_RANGES = ("minmax", "ema", "kl", "percentile", "mse")


def mlp(seed: int = 0) -> nn.Sequential:
    """Linear -> ReLU -> Linear -> Linear: layer 2's input is non-negative, layer 3's signed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Linear(5, 3)).eval()


def batches(count: int = 5, size: int = 8, seed: int = 0, shape: tuple = SHAPE
            ) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((size, *shape), generator=generator) for _ in range(count)]


def act_ranges(qmodel: nn.Module) -> dict[str, tuple[float, float]]:
    return {name: (float(m.act_lo), float(m.act_hi)) for name, m in qmodel.named_modules()
            if getattr(m, "act_enabled", False)}


def captured_inputs(model: nn.Module, data: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Per quantized layer, the input it receives for each batch in the weight-only model."""
    qmodel = squant.quantize(model, 8)
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, squant.nn.QuantizedModule):
            module.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, []).append(args[0].clone()))
    with torch.no_grad():
        for batch in data:
            qmodel(batch)
    return seen


# --- the maths, on histograms worked out by hand ---------------------------------------------

def test_percentile_interpolates_inside_its_bin() -> None:
    # 2048 bins of one value each over [0, 2048]: the 99.99th percentile is 0.9999 * 2048.
    hist = cm.Histogram(np.ones(2048), 2048.0, signed=False)
    lo, hi = cm.percentile_range(hist, 99.99)
    assert lo == 0.0 and hi == pytest.approx(0.9999 * 2048, abs=1e-9)
    # Bins [-2,-1], [-1,0], [0,1], [1,2] holding 1, 0, 0, 3 values: the 25% quantile is the
    # first bin's upper edge (-1); the 75% one lies 2/3 into the last bin's three values.
    signed = cm.Histogram(np.array([1.0, 0.0, 0.0, 3.0]), 2.0, signed=True)
    assert cm.percentile_range(signed, 75.0) == pytest.approx((-1.0, 1 + 2 / 3))
    # A range always holds 0: 4 values in [1, 2] give lo = 0 (not 1), and hi 2.5/4 into the bin.
    positive = cm.Histogram(np.array([0.0, 0.0, 0.0, 4.0]), 2.0, signed=True)
    assert cm.percentile_range(positive, 62.5) == pytest.approx((0.0, 1.625))


def test_percentile_matches_numpy_on_samples_within_a_bin() -> None:
    x = np.random.default_rng(0).standard_normal(200_000)
    limit = np.abs(x).max()
    index = np.clip(np.floor((x + limit) * 4096 / (2 * limit)), 0, 4095).astype(int)
    hist = cm.Histogram(np.bincount(index, minlength=4096).astype(float), limit, signed=True)
    lo, hi = cm.percentile_range(hist, 99.0)
    width = hist.width
    assert abs(lo - np.percentile(x, 1.0)) <= width and abs(hi - np.percentile(x, 99.0)) <= width


def test_kl_divergences_by_hand() -> None:
    # counts [2, 2, 1, 1] into 2 levels. i = 2: P = [2, 2+2]/6, Q = [2, 2]/4.
    # i = 3: P = [2, 2, 1+1]/6; bins 0,1 -> level 0 (mass 4 over 2 bins), bin 2 -> level 1 (1):
    # Q = [2, 2, 1]/5. i = 4: P = Q = [2, 2, 1, 1]/6.
    expected = [
        1 / 3 * math.log((1 / 3) / (1 / 2)) + 2 / 3 * math.log((2 / 3) / (1 / 2)),
        2 / 3 * math.log((1 / 3) / (2 / 5)) + 1 / 3 * math.log((1 / 3) / (1 / 5)),
        0.0,
    ]
    got = cm.kl_divergences(np.array([2.0, 2.0, 1.0, 1.0]), 2)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_kl_clips_a_lone_outlier_by_hand() -> None:
    # counts [3, 1, 0, 1] into 2 levels. i = 2: P = [3, 2]/5, Q = [3, 1]/4: KL 0.0541.
    # i = 3: bin 2 is empty but gets the outlier, Q has nothing there: infinite.
    # i = 4: Q spreads level 0 evenly, [2, 2], level 1 on its one non-empty bin: KL 0.1046.
    got = cm.kl_divergences(np.array([3.0, 1.0, 0.0, 1.0]), 2)
    assert got[0] == pytest.approx(0.6 * math.log(0.6 / 0.75) + 0.4 * math.log(0.4 / 0.25))
    assert got[1] == math.inf
    assert got[2] == pytest.approx(0.6 * math.log(0.6 / 0.4) + 0.2 * math.log(0.2 / 0.4))
    assert cm.kl_threshold(np.array([3.0, 1.0, 0.0, 1.0]), 0.5, 2) == 1.0  # 2 bins of 0.5


def test_kl_keeps_exactly_the_bins_that_hold_data_at_2048_bins() -> None:
    # Distinct counts in the first 128 of 2048 bins, into 128 levels: at i = 128, Q = P (one bin
    # per level, KL 0); every wider candidate merges unequal bins (KL > 0). T = 128 bins.
    counts = np.zeros(2048)
    counts[:128] = np.random.default_rng(1).permutation(128) + 1.0
    divergences = cm.kl_divergences(counts, 128)
    assert divergences[0] == 0.0 and (divergences[1:] > 0).all()
    hist = cm.Histogram(counts, 2048 * 0.01, signed=False)
    assert cm.kl_range(hist, 7) == (0.0, pytest.approx(128 * 0.01))
    # Signed: the |x| histogram decides, symmetric: the mirror image gives the same T.
    mirrored = cm.Histogram(np.concatenate([counts[::-1], np.zeros(2048)]), 20.48, signed=True)
    assert cm.kl_range(mirrored, 8) == (pytest.approx(-1.28), pytest.approx(1.28))


def reference_kl(counts: np.ndarray, levels: int) -> list[float]:
    """The published description, one candidate at a time, in plain Python."""
    out = []
    for i in range(levels, len(counts) + 1):
        p = list(counts[:i])
        p[-1] += sum(counts[i:])
        q = [0.0] * i
        for g in range(levels):
            members = [k for k in range(i) if k * levels // i == g]
            kept = [k for k in members if counts[k] > 0]
            for k in kept:
                q[k] = sum(counts[k] for k in members) / len(kept)
        if any(pk > 0 and qk == 0 for pk, qk in zip(p, q)):
            out.append(math.inf)
            continue
        p_total, q_total = sum(p), sum(q)
        out.append(sum(pk / p_total * math.log(pk / p_total / (qk / q_total))
                       for pk, qk in zip(p, q) if pk > 0))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_kl_divergences_follow_the_description_on_random_histograms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, 40).astype(float) * (rng.random(40) < 0.7)
    levels = int(rng.integers(2, 9))
    expected = reference_kl(counts, levels)
    got = cm.kl_divergences(counts, levels)
    assert [math.isinf(v) for v in got] == [math.isinf(v) for v in expected]
    finite = [k for k, v in enumerate(expected) if math.isfinite(v)]
    np.testing.assert_allclose(got[finite], np.array(expected)[finite], atol=1e-12)


def test_kl_leaves_the_exact_zeros_out() -> None:
    """A spike of exact zeros in bin 0 would force the smallest threshold (its group's Q spreads
    it); counted as zeros, it changes nothing against the histogram without it."""
    counts = np.exp(-np.linspace(0, 6, 2048)) * 1e4
    plain = cm.Histogram(counts.copy(), 6.0, signed=False)
    spiked = cm.Histogram(counts.copy(), 6.0, signed=False)
    spiked.counts[0] += 1e7
    assert cm.kl_range(spiked, 8)[1] == pytest.approx(256 * plain.width)  # the smallest
    spiked.zeros = 1e7
    assert cm.kl_range(spiked, 8) == cm.kl_range(plain, 8)
    assert cm.kl_range(plain, 8)[1] > 4 * 256 * plain.width


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_on_a_uniform_histogram_is_the_closed_form(bits: int) -> None:
    # Uniform on [0, 1]: error(T) = T * (T s)**2 / 12 + (1 - T)**3 / 3, s = 1/(2**b - 1);
    # zero derivative: T s / 2 = 1 - T, T = 1 / (1 + s/2). Uniform on [-1, 1] (density 1/2),
    # range [-T, T]: step 2 T s, T = 1 / (1 + s). The bin-edge optimum is within a bin.
    s = 1 / (2**bits - 1)
    hist = cm.Histogram(np.ones(2048), 1.0, signed=False)
    lo, hi = cm.mse_range(hist, bits)
    assert lo == 0.0 and abs(hi - 1 / (1 + s / 2)) <= hist.width
    signed = cm.Histogram(np.ones(4096), 1.0, signed=True)
    lo, hi = cm.mse_range(signed, bits)
    assert abs(hi - 1 / (1 + s)) <= signed.width and abs(lo + 1 / (1 + s)) <= signed.width


def test_mse_errors_are_the_sum_over_bins() -> None:
    """The prefix-sum algebra against a plain loop over bins for a few ranges."""
    rng = np.random.default_rng(2)
    hist = cm.Histogram(rng.integers(0, 50, 64).astype(float), 3.0, signed=True)
    edges, width, bits = hist.edges, hist.width, 3
    for a, b in [(0, 64), (10, 40), (31, 33), (32, 50)]:
        lo, hi = edges[a], edges[b]
        step = (hi - lo) / (2**bits - 1)
        total = 0.0
        for k, count in enumerate(hist.counts):
            centre = (edges[k] + edges[k + 1]) / 2
            if k < a:
                total += count * ((centre - lo) ** 2 + width**2 / 12)
            elif k >= b:
                total += count * ((centre - hi) ** 2 + width**2 / 12)
            else:
                total += count * step**2 / 12
        got = cm.mse_errors(hist, bits, np.array([a]), np.array([b]))[0, 0]
        assert got == pytest.approx(total, rel=1e-12)


def test_mse_exact_zeros_cost_nothing() -> None:
    """ReLU's zeros sit on the grid: adding them (bin 0 and the zero count) moves nothing."""
    counts = np.exp(-np.linspace(0, 8, 2048))
    plain = cm.Histogram(counts.copy(), 4.0, signed=False)
    with_zeros = cm.Histogram(counts.copy(), 4.0, signed=False, zeros=1e4)
    with_zeros.counts[0] += 1e4
    assert cm.mse_range(with_zeros, 4) == cm.mse_range(plain, 4)


def test_ema_update_is_the_recurrence() -> None:
    assert cm.ema_update(None, (-1.0, 2.0), 0.9) == (-1.0, 2.0)
    assert cm.ema_update((-1.0, 2.0), (-3.0, 4.0), 0.75) == pytest.approx((-1.5, 2.5))


# --- calibration of a model ------------------------------------------------------------------

def test_minmax_is_the_global_min_and_max_of_each_layers_inputs() -> None:
    data = batches()
    seen = captured_inputs(mlp(), data)
    ranges = act_ranges(squant.quantize(mlp(), 8, act_bits=8, calibration_data=data,
                                        act_range="minmax"))
    for name in ("2", "3"):
        values = torch.cat(seen[name]).double()
        expected = (min(float(values.min()), 0.0), max(float(values.max()), 0.0))
        assert ranges[name] == pytest.approx(expected, rel=1e-6)


def test_minmax_does_not_depend_on_the_batch_order() -> None:
    data = batches(7)
    order = np.random.default_rng(3).permutation(7)
    first = squant.quantize(mlp(), 4, act_bits=4, calibration_data=data, act_range="minmax")
    second = squant.quantize(mlp(), 4, act_bits=4, calibration_data=[data[i] for i in order],
                             act_range="minmax")
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_ema_is_the_direct_recurrence_over_batches(momentum: float) -> None:
    data = batches(6)
    seen = captured_inputs(mlp(), data)
    ranges = act_ranges(squant.quantize(mlp(), 8, act_bits=8, calibration_data=data,
                                        act_range="ema", momentum=momentum))
    for name in ("2", "3"):
        lo, hi = float(seen[name][0].min()), float(seen[name][0].max())
        for x in seen[name][1:]:
            lo = momentum * lo + (1 - momentum) * float(x.min())
            hi = momentum * hi + (1 - momentum) * float(x.max())
        assert ranges[name] == pytest.approx((min(lo, 0.0), max(hi, 0.0)), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("method", DATA_RANGES)
def test_one_batch_of_one_sample_calibrates(method: str) -> None:
    qmodel = squant.quantize(mlp(), 4, act_bits=4, calibration_data=[torch.randn(1, 4)],
                             act_range=method)
    for lo, hi in act_ranges(qmodel).values():
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= 0 <= hi
    assert torch.isfinite(qmodel(torch.randn(3, 4))).all()


def test_a_tensor_alone_is_one_batch() -> None:
    x = torch.randn(16, 4)
    alone = squant.quantize(mlp(), 4, act_bits=4, calibration_data=x, act_range="minmax")
    listed = squant.quantize(mlp(), 4, act_bits=4, calibration_data=[x], act_range="minmax")
    assert act_ranges(alone) == act_ranges(listed)


@pytest.mark.parametrize("method", DATA_RANGES)
def test_histogram_ranges_lie_within_the_minmax_range(method: str) -> None:
    data = batches(4, 64)
    minmax = act_ranges(squant.quantize(mlp(), 4, act_bits=4, calibration_data=data,
                                        act_range="minmax"))
    got = act_ranges(squant.quantize(mlp(), 4, act_bits=4, calibration_data=data,
                                     act_range=method))
    for name, (lo, hi) in got.items():
        if method == "kl" and lo < 0:  # symmetric: the larger side bounds it
            bound = max(-minmax[name][0], minmax[name][1])
            assert -1e-6 <= hi <= bound * (1 + 1e-6) and lo == -hi
            continue
        assert minmax[name][0] * (1 + 1e-6) - 1e-6 <= lo <= 0 <= hi <= minmax[name][1] * (1 + 1e-6)


def test_tuple_and_dict_batches_are_unpacked() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(x) + self.b(y))

    torch.manual_seed(0)
    model = TwoInputs().eval()
    xs, ys = batches(3, 4, seed=1), batches(3, 4, seed=2, shape=(3,))
    by_tuple = squant.quantize(model, 8, act_bits=8, act_range="minmax",
                               calibration_data=list(zip(xs, ys)))
    by_dict = squant.quantize(model, 8, act_bits=8, act_range="minmax",
                              calibration_data=[{"x": x, "y": y} for x, y in zip(xs, ys)])
    assert act_ranges(by_tuple) == act_ranges(by_dict) and set(act_ranges(by_dict)) == {"b", "c"}


class Spy(nn.Module):
    """Identity that remembers, for each call, a weak reference to its output, whether autograd
    was on, and whether it was in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * 1.0
        self.refs.append(weakref.ref(out))
        self.calls.append((torch.is_grad_enabled(), self.training))
        return out


def spy_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         Spy(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 3))


@pytest.mark.parametrize("method", ["ema", "kl"])
def test_no_activation_outlives_its_batch(method: str) -> None:
    """Histograms, not stored activations: every activation is freed after calibration, and
    an observer's state has the same size after 1 batch as after 40."""
    data = [torch.randn(2, 3, 8, 8) for _ in range(6)]
    qmodel = squant.quantize(spy_net(), 8, act_bits=8, calibration_data=data, act_range=method)
    gc.collect()
    refs = qmodel[4].refs
    assert len(refs) == (12 if method == "kl" else 6)  # two passes for kl
    assert all(ref() is None for ref in refs)
    sizes = []
    for count in (1, 40):
        observer = LayerObserver("layer", 8)
        for x in [torch.randn(16, 8) for _ in range(count)]:
            observer.observe(x)
        observer.start_histogram()
        for x in [torch.randn(16, 8) for _ in range(count)]:
            observer.observe(x)
        assert not any(isinstance(v, torch.Tensor) for v in vars(observer).values())
        sizes.append((observer.state_size(), observer.hist.counts.nbytes))
    assert sizes[0] == sizes[1]


def test_calibration_runs_in_eval_mode_without_autograd_and_restores_the_flags() -> None:
    model = spy_net()
    model[1].running_mean.uniform_(-1, 1)
    eval_model = copy.deepcopy(model).eval()
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items()
             if "running" in k or "tracked" in k}
    data = [torch.randn(2, 3, 8, 8, requires_grad=True) for _ in range(3)]
    qmodel = squant.quantize(model, 8, act_bits=8, calibration_data=data, act_range="minmax")
    assert qmodel[4].calls == [(False, False)] * 3
    assert all(m.training for m in qmodel.modules()) and all(m.training for m in model.modules())
    for key, value in stats.items():
        assert torch.equal(qmodel.state_dict()[key], value), key
        assert torch.equal(model.state_dict()[key], value), key
    # Dropout and batch statistics would change the ranges if calibration ran in training mode.
    assert act_ranges(qmodel) == act_ranges(squant.quantize(
        eval_model, 8, act_bits=8, calibration_data=data, act_range="minmax"))


def test_state_dict_and_save_load_round_trip(tmp_path) -> None:
    data = batches(4, 32)
    source = squant.quantize(mlp(), 4, act_bits=4, calibration_data=data, act_range="kl")
    target = squant.quantize(mlp(), 4, act_bits=4, calibration_data=data, act_range="minmax")
    x = torch.randn(16, *SHAPE)
    assert not torch.equal(source(x), target(x))
    assert {k for k in source.state_dict() if k.endswith(ACT_KEYS)} == {
        f"{n}.{k}" for n in ("2", "3") for k in ACT_KEYS}
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    squant.save(source, tmp_path / "q.safetensors")
    loaded = squant.load(tmp_path / "q.safetensors", mlp())
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_report_names_the_method_of_each_range() -> None:
    qmodel = squant.quantize(mlp(), 4, act_bits=4, calibration_data=batches(), act_range="mse",
                             report=True)
    rows = {row.name: row for row in qmodel.squant_report.layers}
    assert rows["0"].act_method is None
    assert rows["2"].act_method == rows["3"].act_method == "mse"
    assert rows["2"].act_hi == float(qmodel[2].act_hi)
    assert "] mse" in qmodel.squant_report.table()
    paper = squant.quantize(mlp(), 4, act_bits=4, input_shape=SHAPE, report=True)
    assert {row.act_method for row in paper.squant_report.layers} == {None, "paper"}


def test_options_object_is_the_keywords_and_mse_is_the_default_with_data() -> None:
    data = batches()
    options = squant.ActivationOptions(4, calibration_data=data, range="percentile",
                                       percentile=99.0)
    by_object = squant.quantize(mlp(), 4, activations=options).state_dict()
    by_keywords = squant.quantize(mlp(), 4, act_bits=4, calibration_data=data,
                                  act_range="percentile", percentile=99.0).state_dict()
    for key, value in by_object.items():
        assert torch.equal(value, by_keywords[key]), key
    assert squant.ActivationOptions(4, calibration_data=data).range == "mse"
    assert squant.ActivationOptions(4, (4,)).range == "paper"


def test_a_slow_calibration_shows_a_progress_bar(capsys) -> None:
    class Slow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(0.45)
            return x

    model = nn.Sequential(nn.Linear(4, 4), Slow(), nn.Linear(4, 2))
    squant.quantize(model, 8, act_bits=8, calibration_data=batches(4), act_range="minmax")
    assert "squant calibration" in capsys.readouterr().err
    squant.quantize(mlp(), 8, act_bits=8, calibration_data=batches(4), act_range="minmax")
    assert "squant calibration" not in capsys.readouterr().err


# --- bad input ---------------------------------------------------------------------------------

class Poison(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[0, 0] = self.value
        return x


@pytest.mark.parametrize("value, kind", [(math.nan, "NaN"), (math.inf, "Inf"), (-math.inf, "Inf")])
def test_non_finite_layer_input_names_the_layer(value: float, kind: str) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), Poison(value),
                          nn.Linear(5, 3))
    with pytest.raises(squant.QuantizationError, match=f"layer '4' received {kind} values"):
        squant.quantize(model, 8, act_bits=8, calibration_data=batches(), act_range="kl")


def generator_of_batches():
    yield from batches()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"calibration_data": []}, squant.QuantizationError, "holds no batch"),
    ({"calibration_data": [torch.randn(8, 4), torch.randn(8, 5)]}, squant.QuantizationError,
     r"batch 1 has per-sample shapes \(5,\), but batch 0 had \(4,\)"),
    ({"calibration_data": [torch.randn(8, 4), (torch.randn(8, 4),)]}, squant.QuantizationError,
     "batch 1 has per-sample shapes"),
    ({"calibration_data": [torch.randn(8, 7)]}, squant.QuantizationError,
     r"calibration batch 0 \(shape \(8, 7\)\) does not run through Sequential"),
    ({"calibration_data": generator_of_batches(), "act_range": "kl"}, squant.QuantizationError,
     "reads calibration_data twice.*one-shot generator"),
    ({"calibration_data": batches(), "act_range": "paper"}, squant.QuantizationError,
     "act_range='paper' is data-free"),
    ({"calibration_data": batches(), "act_range": "bn"}, squant.QuantizationError,
     "act_range='bn' is data-free"),
    ({"act_range": "kl"}, squant.QuantizationError, "give calibration_data"),
    ({"calibration_data": batches(), "input_shape": SHAPE}, squant.QuantizationError,
     "input_shape is an option of the data-free ranges"),
    ({"calibration_data": batches(), "sigma": 3.0}, squant.QuantizationError,
     "sigma is an option of the data-free ranges"),
    ({"calibration_data": 3}, TypeError, "calibration_data must be an iterable"),
    ({"calibration_data": ["abc"]}, TypeError, "calibration batch 0 is a str"),
    ({"calibration_data": batches(), "momentum": 1.0}, squant.QuantizationError, "momentum"),
    ({"calibration_data": batches(), "percentile": 40}, squant.QuantizationError, "percentile"),
])
def test_bad_calibration_input_raises_clear_errors(kwargs: dict, error: type, message: str
                                                   ) -> None:
    with pytest.raises(error, match=message):
        squant.quantize(mlp(), 4, act_bits=4, **kwargs)


def test_a_generator_is_fine_for_one_pass_methods() -> None:
    qmodel = squant.quantize(mlp(), 4, act_bits=4, calibration_data=generator_of_batches(),
                             act_range="minmax")
    assert act_ranges(qmodel) == act_ranges(squant.quantize(
        mlp(), 4, act_bits=4, calibration_data=batches(), act_range="minmax"))


def test_data_that_changes_between_passes_is_refused() -> None:
    class Shrinking:
        def __init__(self) -> None:
            self.count = 4

        def __iter__(self):
            self.count -= 1
            return iter(batches(self.count))

    with pytest.raises(squant.QuantizationError, match="3 batches in the first pass and 2"):
        squant.quantize(mlp(), 4, act_bits=4, calibration_data=Shrinking(), act_range="mse")
