"""Property tests: squant's codes follow SQUANT_SPEC.md on nasty random weights.

Each test's name states the invariant. Weights come from ``strategies.py``; ``spec_oracle.py``
(a slow, literal transcription of the spec) is the reference for bit-exactness.

Error sums are evaluated exactly: every float32 is an integer multiple of 2**-149, so a sum of
float32 values, or of integer codes minus float32 values, is an exact Python int in *units* of
2**-149. ``x`` is always ``S * W - Z`` in float32, from the scale and zero point squant reports
(the oracle test checks those bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from spec_oracle import squant_oracle
from strategies import SCHEMES, Case, case_lists, cases, shapes

import squant
from squant.core.tensor import code_range

F32 = np.float32
UNIT_BITS = 149
HALF = 1 << (UNIT_BITS - 1)  # 1/2 in units
EPS32 = 2.0**-24  # float32 unit roundoff: |fl(a op b) - a op b| <= EPS32 * |a op b|
_to_int = np.frompyfunc(int, 1, 1)


def units(values: np.ndarray) -> np.ndarray:
    """Float32 values (or integers, or float64 multiples of 2**-149) as exact ints in units."""
    return _to_int(np.asarray(values, np.float64) * 2.0**UNIT_BITS)


def to_float64(sums: np.ndarray) -> np.ndarray:
    """Exact sums in units, rounded once to float64: the spec's flip step 1."""
    return np.array([int(s) / (1 << UNIT_BITS) for s in sums.ravel()]).reshape(sums.shape)


def grid_range(bits: int, scheme: str) -> tuple[int, int]:
    """``[t_min, t_max]``: ``[-n, n-1]`` asymmetric, ``[-(n-1), n-1]`` symmetric."""
    n = 2 ** (bits - 1)
    return (-(n - 1), n - 1) if scheme == "symmetric" else (-n, n - 1)


def quantize(case: Case, mode: str | None = None, weight: object = None) -> squant.QuantizedTensor:
    """``quantize_weight`` with the case's options (``mode`` and ``weight`` override them)."""
    return squant.quantize_weight(case.weight if weight is None else weight, case.bits,
                                  mode or case.mode, scheme=case.scheme,
                                  granularity=case.granularity)


def assert_same(a: squant.QuantizedTensor, b: squant.QuantizedTensor) -> None:
    """Same shape, codes, options, and scale and zero point bit for bit."""
    assert a.codes.dtype == b.codes.dtype == torch.int8
    assert torch.equal(a.codes, b.codes)
    assert_same_bits(a.scale.numpy(), b.scale.numpy())
    assert_same_bits(a.zero_point.numpy(), b.zero_point.numpy())
    assert (a.bits, a.mode, a.axis, a.scheme, a.granularity) == (
        b.bits, b.mode, b.axis, b.scheme, b.granularity)


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Float32 arrays equal bit for bit (so -0.0 differs from 0.0)."""
    assert actual.dtype == expected.dtype == F32 and actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


@dataclass(frozen=True)
class OnGrid:
    """A quantized weight seen the spec's way, as ``(O, I, K)``: codes and ``x = S*W - Z``."""

    codes: np.ndarray
    x: np.ndarray
    t_min: int
    t_max: int

    @property
    def rounded(self) -> np.ndarray:
        """EQ's value ``round(x)``, half to even."""
        return np.rint(self.x)

    @property
    def error(self) -> np.ndarray:
        """EQ's float32 error ``e = round(x) - x`` (exact: no rounding happens)."""
        return self.rounded - self.x

    @property
    def has_up(self) -> np.ndarray:
        """The spec's up candidate exists: ``e < 0`` and ``x < t_max``."""
        return (self.error < 0) & (self.x < self.t_max)

    @property
    def has_down(self) -> np.ndarray:
        """The spec's down candidate exists: ``e > 0`` and ``x > t_min``."""
        return (self.error > 0) & (self.x > self.t_min)

    @property
    def inside(self) -> np.ndarray:
        """``x`` lies inside the grid ``[t_min, t_max]``."""
        return (self.x >= self.t_min) & (self.x <= self.t_max)

    @property
    def unclamped(self) -> np.ndarray:
        """The final clamp cannot move the code: ``round(x)`` lies inside the grid."""
        return (self.rounded >= self.t_min) & (self.rounded <= self.t_max)

    def real_errors(self) -> np.ndarray:
        """``code - x`` exactly, in units."""
        return units(self.codes) - units(self.x)

    def has_enough_candidates(self, spec_sums: np.ndarray, axes: int | tuple[int, ...],
                              ) -> np.ndarray:
        """Per group: ``k = round(|SE|)`` flips find ``k`` real candidates, and nothing clamps.

        ``SE`` is the group's float64 error sum (from exact ``spec_sums``); its sign picks the
        direction. The spec sorts elements with a candidate (priority ``|e| > 0``) before those
        without (priority 0), so all ``k`` flips are real iff at least ``k`` exist.
        """
        se = to_float64(spec_sums)
        count = np.where(se < 0, self.has_up.sum(axes), self.has_down.sum(axes))
        return (count >= np.rint(np.abs(se))) & self.unclamped.all(axes)


def on_grid(case: Case, mode: str | None = None) -> OnGrid:
    """Quantize the case and put the weight on its grid, both as ``(O, I, K)``."""
    q = quantize(case, mode)
    w = case.as_oik
    x = q.scale.numpy()[:, None, None] * w - q.zero_point.numpy()[:, None, None]  # float32
    codes = q.codes.numpy().reshape(w.shape).astype(np.int64)
    return OnGrid(codes, x, *grid_range(case.bits, case.scheme))


def assert_error_sums_within_half(after: np.ndarray, real_before: np.ndarray,
                                  spec_before: np.ndarray, where: np.ndarray) -> None:
    """``|after| <= 1/2 + |real_before - fl64(spec_before)|`` on every group ``where`` holds.

    All sums are exact, in units. A flip step whose ``k = round(|SE|)`` flips each move a code
    one step the right way leaves ``real_before -+ k``, and ``|SE -+ k| <= 1/2`` for the
    float64 ``SE = fl64(spec_before)`` it chose ``k`` from. So the only slack is how far ``SE``
    lies from the real error sum the flips act on: float64 rounding of the exact sum (step 1),
    plus, after KQ, the float32 rounding of the flipped errors ``e +- 1`` the spec keeps.
    """
    spec = to_float64(spec_before)
    slack = np.abs(real_before - units(spec))
    over = (np.abs(after) > HALF + slack).astype(bool)
    bad = np.argwhere(where & over)
    assert bad.size == 0, (
        f"{len(bad)} group(s) end with |sum(code - x)| > 1/2 + slack, first at {tuple(bad[0])}:"
        f" sum {int(after[tuple(bad[0])]) / (1 << UNIT_BITS)!r},"
        f" slack {int(slack[tuple(bad[0])]) / (1 << UNIT_BITS)!r}")


def _hand_made(rows: list[list[float]], shape: tuple[int, ...], mode: str, why: str) -> Case:
    weight = np.array(rows, np.float32).reshape(shape)
    return Case(weight, f"hand-made: {why}", 8, mode, "symmetric", "channel")


# 8-bit symmetric, amax 127: S = 1 and x = W. The kernel's exact EQ error sum is
# -1.5 + 2**-53 - 2**-80; float64 makes it -1.5, so k = 2 and the kernel ends at
# 0.5 + 2**-53 - 2**-80: over 1/2 by exactly the rounding of step 1's sum.
FLOAT64_SUM_CASE = _hand_made(
    [[0.5, 2.5, 4.5, -(2.0**-53), 2.0**-80, 0, 0, 0, 127]], (1, 1, 3, 3), "K",
    "KQ's float64 error sum rounds -1.5 + 2**-53 - 2**-80 to -1.5")
# x = 0.375 + 2**-25 rounds to 0 and KQ flips it up: the spec keeps the error
# fl32(1 - x) = 0.625, the real one is 0.625 - 2**-25. CQ then sees exactly 1.5, flips two
# codes down, and the channel really ends at -0.5 - 2**-25.
FLOAT32_ERROR_CASE = _hand_made(
    [[0.375 + 2.0**-25, 0.375 + 2.0**-25, 0], [1.5, 0, 0], [1.5, 0, 0],
     [-(0.25 + 2.0**-25), 0, 0], [127, 0, 0]], (1, 5, 3), "KC",
    "KQ keeps the flipped error fl32(1 - (0.375 + 2**-25)) = 0.625")


@settings(max_examples=600, deadline=None)
@given(cases())
def test_kernels_equal_the_spec_oracle(case: Case) -> None:
    """Codes, scale and zero point equal the literal spec transcription bit for bit."""
    q = quantize(case)
    codes, scale, zero = squant_oracle(case.as_oik, case.bits, "K" in case.mode,
                                       "C" in case.mode, case.scheme, case.granularity)
    np.testing.assert_array_equal(q.codes.numpy().reshape(codes.shape), codes)
    assert_same_bits(q.scale.numpy(), scale)
    assert_same_bits(q.zero_point.numpy(), zero)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_codes_lie_in_the_grid_range(case: Case) -> None:
    """Codes are int8 of the weight's shape, in ``[-n, n-1]`` or, symmetric, ``[-(n-1), n-1]``."""
    codes = quantize(case).codes
    t_min, t_max = grid_range(case.bits, case.scheme)
    assert codes.dtype == torch.int8 and tuple(codes.shape) == case.weight.shape
    assert t_min <= int(codes.min()) and int(codes.max()) <= t_max


@settings(max_examples=300, deadline=None)
@given(cases())
def test_each_code_is_the_floor_or_ceiling_of_its_x_or_else_the_nearest_grid_end(
        case: Case) -> None:
    """Where ``x`` lies in ``[t_min, t_max]`` the code is ``floor(x)`` or ``ceil(x)``; outside
    it is the end of the grid nearest to ``x`` (the clamp)."""
    g = on_grid(case)
    floor_or_ceil = (g.codes == np.floor(g.x)) | (g.codes == np.ceil(g.x))
    nearest_end = g.codes == np.where(g.x < g.t_min, g.t_min, g.t_max)
    wrong = np.argwhere(~np.where(g.inside, floor_or_ceil, nearest_end))
    assert wrong.size == 0, f"code {g.codes[tuple(wrong[0])]} for x {g.x[tuple(wrong[0])]!r}"


@settings(max_examples=150, deadline=None)
@given(cases(mode=st.just("E")))
def test_mode_e_is_round_half_to_even_then_clamp(case: Case) -> None:
    """Mode E is plain rounding: ``clamp(round_half_even(x), t_min, t_max)``."""
    g = on_grid(case)
    np.testing.assert_array_equal(g.codes, np.clip(g.rounded, g.t_min, g.t_max))


@settings(max_examples=400, deadline=None)
@given(cases(mode=st.just("K"), shape=shapes(ks=(3, 9, 25, 27))))
@example(FLOAT64_SUM_CASE)
def test_kq_leaves_each_kernel_error_sum_within_half_where_it_has_the_candidates(
        case: Case) -> None:
    """After mode K, ``|sum(code - x)| <= 1/2`` on every kernel that has the candidates.

    A kernel qualifies when its EQ error sum ``SE`` calls for ``k = round(|SE|)`` flips in a
    direction and at least ``k`` of its elements have a candidate in that direction (a flip
    without one leaves the code where it is), and ``round(x)`` lies in the grid for all of its
    elements (else the final clamp moves a code). With every ``x`` inside the grid this always
    holds; it fails where ``x`` overhangs a grid end (the asymmetric grid's ends, constant
    channels), which the strategies produce often. The only slack is the float64 rounding
    of ``SE`` (``FLOAT64_SUM_CASE`` ends 2**-53 - 2**-80 over 1/2).
    """
    g = on_grid(case)
    eq = units(g.error).sum(axis=2)
    after = g.real_errors().sum(axis=2)
    assert_error_sums_within_half(after, eq, eq, g.has_enough_candidates(eq, 2))


@settings(max_examples=300, deadline=None)
@given(cases(mode=st.just("C")))
def test_cq_leaves_each_channel_error_sum_within_half_where_it_has_the_candidates(
        case: Case) -> None:
    """After mode C, ``|sum(code - x)| <= 1/2`` on every channel that has the candidates.

    The same statement as for KQ, with the channel as the group and EQ's errors as input.
    """
    g = on_grid(case)
    eq = units(g.error).sum(axis=(1, 2))
    after = g.real_errors().sum(axis=(1, 2))
    assert_error_sums_within_half(after, eq, eq, g.has_enough_candidates(eq, (1, 2)))


@settings(max_examples=500, deadline=None)
@given(cases(mode=st.just("KC")))
@example(FLOAT32_ERROR_CASE)
def test_kc_leaves_each_channel_error_sum_within_half_where_every_x_is_inside_the_grid(
        case: Case) -> None:
    """After mode KC, ``|sum(code - x)| <= 1/2`` on every channel whose ``x`` all lie in
    ``[t_min, t_max]``, up to the slack below.

    Why that condition: inside the grid an element has a candidate exactly when its error is
    non-zero, its sign saying which way. Then every kernel has the candidates KQ needs (its
    ``|SE| >= k - 1/2`` needs at least ``2k - 1`` errors of one sign), every element a kernel
    hands on has a real candidate in the handed-on direction (or priority 0), and CQ needs no
    more flips than there are handed-on elements in its direction; each of its flips moves a
    code one step the right way (a flip back after KQ's flip sets the spec's error to 0, not
    ``e``, but the code still moves by one). So CQ's ``k`` flips act on the real sum.

    "Enough candidates in the channel" is not enough: where ``x`` overhangs a grid end, an
    element with ``e < 0`` and ``x > t_max`` has no up candidate, yet a kernel may hand it on
    with priority ``|e|``; CQ's flip then moves nothing. E.g.
    ``make_weight('sparse', (10, 9, 3), 3455843477, 3, 'asymmetric', 'channel')``, channel 2:
    two up candidates, ``k = 1``, and the channel ends at -0.853.

    Slack: CQ chooses ``k`` from the spec's float32 errors, in which KQ's flipped ``e +- 1``
    are rounded; the real sum it acts on can differ by ~2**-25 per such element
    (``FLOAT32_ERROR_CASE`` ends 2**-25 over 1/2). The KQ stage is mode K's result.
    """
    g = on_grid(case)
    kq = on_grid(case, "K")
    kept = g.error + (kq.codes - g.rounded).astype(F32)  # float32 e, e + 1 or e - 1, as the spec
    real_before = kq.real_errors().sum(axis=(1, 2))
    after = g.real_errors().sum(axis=(1, 2))
    assert_error_sums_within_half(after, real_before, units(kept).sum(axis=(1, 2)),
                                  g.inside.all(axis=(1, 2)))


@settings(max_examples=6, deadline=None)
@given(case_lists(min_elements=100_000))
def test_codes_do_not_depend_on_the_number_of_threads(batch: list[Case]) -> None:
    """One batched call gives the same results with 1 thread as with all of them.

    The batch splits its channels into blocks of about 2**15 elements, the parallel work items;
    over 100k elements make at least four, and a block may hold channels of several weights.
    """
    def run() -> list[squant.QuantizedTensor]:
        return squant.quantize_weights([c.weight for c in batch], [c.bits for c in batch],
                                       batch[0].mode, scheme=batch[0].scheme,
                                       granularity=batch[0].granularity)

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        every = run()
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, every, strict=True):
        assert_same(a, b)


@settings(max_examples=60, deadline=None)
@given(case_lists(), st.data())
def test_one_batched_call_equals_one_call_per_weight(batch: list[Case], data: st.DataObject,
                                                     ) -> None:
    """``quantize_weights`` with per-weight bits and axes equals ``quantize_weight`` on each."""
    axes = [data.draw(st.integers(-c.weight.ndim, c.weight.ndim - 1)) for c in batch]
    first = batch[0]
    together = squant.quantize_weights([c.weight for c in batch], [c.bits for c in batch],
                                       first.mode, axes, scheme=first.scheme,
                                       granularity=first.granularity)
    for case, axis, q in zip(batch, axes, together, strict=True):
        assert_same(q, squant.quantize_weight(case.weight, case.bits, case.mode, axis,
                                              scheme=case.scheme, granularity=case.granularity))


@settings(max_examples=300, deadline=None)
@given(cases())
def test_dequantized_weight_is_within_one_grid_step_inside_the_grid_range(case: Case) -> None:
    """``|dequantize() - W| <= 1/S`` wherever ``W`` lies in ``[(t_min + Z)/S, (t_max + Z)/S]``.

    Plus float32 rounding, bounded (u = 2**-24) from ``x = fl(fl(S*W) - Z)`` and
    ``d = fl(fl(q + Z) / S)``: ``|q - x| <= 1``, ``|x - (S*W - Z)| <= u*(|S*W| + |x|(1+2u))``
    and ``|d - (q + Z)/S| <= |d|*(2u + u**2)/(1-u)**2``, so
    ``|d - W| <= 1/S + u*(|W| + |x|(1+2u)/S + 2|d|(1+2u))``, times ``1 + 2**-40`` for the
    float64 arithmetic of the bound, plus ``2**-147`` for float32 underflow.
    """
    q = quantize(case)
    g = on_grid(case)
    w = case.as_oik.astype(np.float64)
    d = q.dequantize().numpy().reshape(w.shape).astype(np.float64)
    scale = q.scale.numpy().astype(np.float64)[:, None, None]
    zero = q.zero_point.numpy().astype(np.float64)[:, None, None]
    inside = ((g.t_min + zero) / scale <= w) & (w <= (g.t_max + zero) / scale)
    rounding = EPS32 * (np.abs(w) + np.abs(g.x) * (1 + 2 * EPS32) / scale
                        + 2 * np.abs(d) * (1 + 2 * EPS32))
    bound = (1 / scale + rounding) * (1 + 2.0**-40) + 2.0**-147
    bad = np.argwhere(inside & (np.abs(d - w) > bound))
    assert bad.size == 0, (f"W {w[tuple(bad[0])]!r} dequantizes to {d[tuple(bad[0])]!r},"
                           f" step 1/S = {1 / scale[tuple(bad[0])[0], 0, 0]!r}")


@settings(max_examples=60, deadline=None)
@given(cases())
def test_numpy_and_torch_inputs_give_identical_results(case: Case) -> None:
    """A numpy array, a torch tensor (even one that requires grad) and a strided copy of the
    same values quantize identically."""
    expected = quantize(case)
    assert_same(quantize(case, weight=torch.from_numpy(case.weight).requires_grad_()),
                 expected)
    fortran = np.asfortranarray(case.weight)
    assert_same(quantize(case, weight=fortran), expected)
    assert_same(quantize(case, weight=torch.from_numpy(fortran)), expected)


@settings(max_examples=80, deadline=None)
@given(cases(), st.sampled_from([torch.float16, torch.bfloat16, torch.float64]))
def test_half_bfloat16_and_double_inputs_quantize_their_float32_value(
        case: Case, dtype: torch.dtype) -> None:
    """A float16, bfloat16 or float64 weight (torch, or numpy where it exists) quantizes as its
    float32 value ``w.float()``. The float64 weight carries detail below float32's precision."""
    detailed = case.weight.astype(np.float64) * (1 + 2.0**-26)
    weight = torch.from_numpy(np.clip(detailed, -65504, 65504)).to(dtype)
    expected = quantize(case, weight=weight.float())
    assert_same(quantize(case, weight=weight), expected)
    if dtype != torch.bfloat16:
        assert_same(quantize(case, weight=weight.numpy()), expected)


@settings(max_examples=80, deadline=None)
@given(cases(), st.data())
def test_output_channel_axis_is_moved_to_the_front_and_back(case: Case, data: st.DataObject,
                                                             ) -> None:
    """Output channels on any axis (1 for ConvTranspose, or negative) quantize like the same
    weight with that axis moved to 0, codes and dequantized weight moved back."""
    ndim = case.weight.ndim
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    moved = np.moveaxis(case.weight, 0, axis)
    q = squant.quantize_weight(moved, case.bits, case.mode, axis, scheme=case.scheme,
                               granularity=case.granularity)
    front = quantize(case)
    assert q.axis == axis % ndim
    np.testing.assert_array_equal(q.codes.numpy(), np.moveaxis(front.codes.numpy(), 0, axis))
    assert_same_bits(q.scale.numpy(), front.scale.numpy())
    assert_same_bits(q.zero_point.numpy(), front.zero_point.numpy())
    np.testing.assert_array_equal(q.dequantize().numpy(),
                                  np.moveaxis(front.dequantize().numpy(), 0, axis))


@settings(max_examples=50, deadline=None)
@given(cases(scheme=st.just("symmetric")))
def test_symmetric_zero_points_are_exactly_zero(case: Case) -> None:
    """On the symmetric grid every zero point is 0."""
    zero = quantize(case).zero_point
    assert zero.shape == (case.weight.shape[0],) and bool((zero == 0).all())


@settings(max_examples=60, deadline=None)
@given(cases(granularity=st.just("tensor")))
def test_per_tensor_grid_is_the_whole_tensor_as_one_channel(case: Case) -> None:
    """Granularity "tensor" reports one scale and zero point for every channel: those of the
    per-channel grid of the weight flattened to one channel."""
    q = quantize(case)
    whole = quantize(Case(case.weight.reshape(1, -1), case.source, case.bits, case.mode,
                          case.scheme, "channel"))
    o = case.weight.shape[0]
    assert_same_bits(q.scale.numpy(), np.repeat(whole.scale.numpy(), o))
    assert_same_bits(q.zero_point.numpy(), np.repeat(whole.zero_point.numpy(), o))


INPUT_FORMS = {
    "numpy": lambda w: w.copy(),
    "numpy float64": lambda w: w.astype(np.float64),
    "numpy strided": lambda w: np.repeat(w, 2, axis=-1)[..., ::2],
    "torch": lambda w: torch.from_numpy(w.copy()),
    "torch float16": lambda w: torch.from_numpy(np.clip(w, -65504, 65504)).half(),
    "torch strided": lambda w: torch.from_numpy(np.repeat(w, 2, axis=0))[::2],
}


def _value_bytes(weight: np.ndarray | torch.Tensor) -> bytes:
    return (weight.numpy() if isinstance(weight, torch.Tensor) else weight).tobytes()


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from(sorted(INPUT_FORMS)))
def test_the_input_weight_is_not_modified(case: Case, form: str) -> None:
    """Quantizing leaves the weight's values untouched, whatever its type, dtype and layout."""
    weight = INPUT_FORMS[form](case.weight)
    before = _value_bytes(weight)
    quantize(case, weight=weight)
    assert _value_bytes(weight) == before


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.sampled_from(["KC", "E"]), st.integers(1, 6), st.integers(2, 12),
       st.floats(0.01, 5.0), st.floats(-3.0, 3.0), st.integers(0, 2**31 - 1))
def test_include_zero_puts_zero_on_every_grid(bits, mode, rows, cols, spread, shift, seed):
    """Every channel's range contains 0, so the code ``-Z`` (which dequantizes to 0 exactly)
    lies in the code range; channels whose range already held 0 are quantized as without the
    option."""
    weight = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) * spread
    weight = weight + shift  # all-positive or all-negative channels too
    wide = squant.quantize_weight(weight, bits, mode, include_zero=True)
    plain = squant.quantize_weight(weight, bits, mode)
    n = 2 ** (bits - 1)
    assert bool(((-wide.zero_point >= -n) & (-wide.zero_point <= n - 1)).all())
    holds_zero = (weight.min(1).values <= 0) & (weight.max(1).values >= 0)
    assert torch.equal(wide.codes[holds_zero], plain.codes[holds_zero])
    assert torch.equal(wide.scale[holds_zero], plain.scale[holds_zero])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_code_range_is_what_the_kernels_reach(bits: int, scheme: str) -> None:
    """``code_range`` (used by the reports and by load_state_dict's check) holds exactly the
    codes the kernels give: a channel spanning [-1, 1] reaches both ends, never beyond."""
    weight = torch.linspace(-1.0, 1.0, 2 * 2**bits + 1).repeat(3, 1)
    q = squant.quantize_weight(weight, bits, "E", scheme=scheme)
    assert q.code_range == code_range(bits, scheme)
    assert (int(q.codes.min()), int(q.codes.max())) == q.code_range
