"""Property tests of group-wise grids (``group_size``): every group of ``g`` consecutive elements
of an output channel (the last one shorter) is quantized exactly as a channel of its own.

Shapes include ``I * K`` not divisible by ``g``, ``g > I * K`` and ``g = 2``. Error sums are
exact, in units of 2**-149 (see ``test_properties.py``, whose helpers these reuse).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import KERNEL_DIMS, KINDS, MODES, SCHEMES, make_weight
from test_properties import OnGrid, assert_error_sums_within_half, grid_range, units

import squant
from squant.core.options import QuantOptions
from squant.core.tensor import quantize_with_options

F32 = np.float32
ANY_MODE = st.sampled_from(MODES)
ANY_RANGE = st.sampled_from(("minmax", "search", "fit"))


@st.composite
def grouped(draw: st.DrawFn, mode: st.SearchStrategy[str] = ANY_MODE,
            max_inputs: int = 40) -> tuple[np.ndarray, int, str, str, int, str]:
    """``(weight, bits, mode, scheme, group_size, source)``: a weight ``(O, I, *kernel)`` of a
    drawn kind and a group size that is a multiple of its kernel size: 2 (K = 1), one that does
    not divide ``I * K``, one larger than ``I * K``, or any."""
    k = draw(st.sampled_from((1, 1, 3, 9)))
    o, i = draw(st.integers(1, 6)), draw(st.integers(1, max_inputs))
    kernel = draw(st.sampled_from(KERNEL_DIMS[k]))
    kind, seed = draw(st.sampled_from(KINDS)), draw(st.integers(0, 2**32 - 1))
    bits, scheme = draw(st.integers(2, 8)), draw(st.sampled_from(SCHEMES))
    choice = draw(st.sampled_from(("two", "ragged", "larger", "any")))
    if choice == "two":
        group_size = 2 if k == 1 else k
    elif choice == "ragged":
        group_size = draw(st.integers(1, i)) * k
    elif choice == "larger":
        group_size = (i + draw(st.integers(1, 3))) * k
    else:
        group_size = draw(st.integers(1, i + 3)) * k
    group_size = max(group_size, 2)  # K = 1: at least 2
    shape = (o, i, *kernel)
    weight = make_weight(kind, shape, seed, bits, scheme, "channel")
    source = f"make_weight({kind!r}, {shape}, {seed}, {bits}, {scheme!r}), g={group_size}"
    return weight, bits, draw(mode), scheme, group_size, source


def group_slices(size: int, group_size: int) -> list[slice]:
    """Each group's elements in a channel of ``size``: consecutive, the last one shorter."""
    return [slice(s, min(s + group_size, size)) for s in range(0, size, group_size)]


def kernel_size(weight: np.ndarray) -> int:
    return int(np.prod(weight.shape[2:], dtype=np.int64))


@settings(max_examples=150, deadline=None)
@given(grouped(), ANY_RANGE)
def test_each_group_is_quantized_as_a_channel_of_its_own(drawn: tuple, range_: str) -> None:
    """Codes, scale and zero point of group ``j`` of channel ``o`` are bit for bit those of the
    group's elements quantized alone, per channel (any range); codes lie in the grid; ``scale``
    and ``zero_point`` are ``(O, n_groups)``; ``dequantize`` is ``(codes + Z) * fl32(1 / S)`` per
    group."""
    weight, bits, mode, scheme, g, _ = drawn
    q = squant.quantize_weight(weight, bits, mode, scheme=scheme, range=range_, group_size=g)
    o, k = weight.shape[0], kernel_size(weight)
    flat = weight.reshape(o, -1)
    slices = group_slices(flat.shape[1], g)
    assert q.codes.shape == weight.shape and q.group_size == g
    assert q.scale.shape == q.zero_point.shape == (o, len(slices))
    t_min, t_max = grid_range(bits, scheme)
    codes = q.codes.numpy().reshape(o, -1)
    assert codes.min() >= t_min and codes.max() <= t_max
    alone = squant.quantize_weights(
        [flat[:, part].reshape(o, -1, k) for part in slices], bits, mode, scheme=scheme,
        range=range_)
    dequantized = q.dequantize().numpy().reshape(o, -1)
    for j, (part, single) in enumerate(zip(slices, alone)):
        np.testing.assert_array_equal(codes[:, part], single.codes.numpy().reshape(o, -1))
        np.testing.assert_array_equal(q.scale[:, j].numpy().view(np.uint32),
                                      single.scale.numpy().view(np.uint32))
        np.testing.assert_array_equal(q.zero_point[:, j].numpy().view(np.uint32),
                                      single.zero_point.numpy().view(np.uint32))
        step = F32(1) / q.scale[:, j, None].numpy()  # fl32(1 / S): a float32 division
        expected = (codes[:, part].astype(F32) + q.zero_point[:, j, None].numpy()) * step
        np.testing.assert_array_equal(dequantized[:, part], expected)


@settings(max_examples=150, deadline=None)
@given(grouped(mode=st.just("C")))
def test_cq_leaves_each_group_error_sum_within_half_where_it_has_the_candidates(
        drawn: tuple) -> None:
    """After mode C, ``|sum(code - x)| <= 1/2`` on every group that has the candidates (the
    statement of ``test_properties`` for channels, with the group as the channel)."""
    weight, bits, mode, scheme, g, _ = drawn
    q = squant.quantize_weight(weight, bits, mode, scheme=scheme, group_size=g)
    o = weight.shape[0]
    flat, codes = weight.reshape(o, -1), q.codes.numpy().reshape(o, -1).astype(np.int64)
    for j, part in enumerate(group_slices(flat.shape[1], g)):
        x = q.scale[:, j, None].numpy() * flat[:, part] - q.zero_point[:, j, None].numpy()
        grid = OnGrid(codes[:, part, None], x[:, :, None], *grid_range(bits, scheme))
        eq = units(grid.error).sum(axis=(1, 2))
        after = grid.real_errors().sum(axis=(1, 2))
        assert_error_sums_within_half(after, eq, eq, grid.has_enough_candidates(eq, (1, 2)))


@settings(max_examples=100, deadline=None)
@given(grouped(), st.integers(0, 3), ANY_RANGE)
def test_a_group_as_large_as_the_channel_is_the_per_channel_grid(drawn: tuple, extra: int,
                                                                 range_: str) -> None:
    """``group_size >= I * K`` gives per channel's codes, scale and zero point exactly, for
    the same mode and range."""
    weight, bits, mode, scheme, _, _ = drawn
    size = weight[0].size
    k = kernel_size(weight)
    g = max(2, size + extra * k)
    if g % k:
        g = size
    if g < 2:
        return
    grouped_q = squant.quantize_weight(weight, bits, mode, scheme=scheme, range=range_,
                                       group_size=g)
    channel_q = squant.quantize_weight(weight, bits, mode, scheme=scheme, range=range_)
    assert torch.equal(grouped_q.codes, channel_q.codes)
    assert torch.equal(grouped_q.scale.reshape(-1), channel_q.scale)
    assert torch.equal(grouped_q.zero_point.reshape(-1), channel_q.zero_point)
    assert torch.equal(grouped_q.dequantize(), channel_q.dequantize())


@settings(max_examples=25, deadline=None)
@given(st.lists(grouped(), min_size=1, max_size=4), st.data())
def test_one_batched_call_equals_one_call_per_weight(batch: list[tuple],
                                                     data: st.DataObject) -> None:
    """Grouped and per-channel weights in one call give each weight's own result (the
    batch mixes group sizes, bits and per-channel weights)."""
    weights = [b[0] for b in batch]
    sizes = [b[4] if data.draw(st.booleans()) else None for b in batch]
    options = [QuantOptions(b[1], b[2], b[3], group_size=s) for b, s in zip(batch, sizes)]
    names = [f"w{i}" for i in range(len(batch))]
    together = quantize_with_options(weights, [0] * len(batch), options, names)
    for w, opts, q in zip(weights, options, together):
        alone = squant.quantize_weight(w, opts.bits, opts.mode, scheme=opts.scheme,
                                       range=opts.range, group_size=opts.group_size)
        assert torch.equal(q.codes, alone.codes) and torch.equal(q.scale, alone.scale)
        assert torch.equal(q.zero_point, alone.zero_point)


@pytest.mark.parametrize("options", [
    [QuantOptions(4, "KC", group_size=96), QuantOptions(3, "KC", group_size=45, range="search")],
    [QuantOptions(4, group_size=96), QuantOptions(3, "KC", range="fit", group_size=45)],
], ids=["minmax-search", "fit"])
def test_codes_do_not_depend_on_the_number_of_threads(options: list[QuantOptions]) -> None:
    """Over 2**17 elements in groups of a ragged size, several bit widths, modes and ranges
    (the grouped recipe, E + fit, too): the same results on 1 and 2 threads."""
    rng = np.random.default_rng(21)
    weights = [rng.standard_normal((300, 500)).astype(F32),
               rng.standard_t(2, (64, 40, 3, 3)).astype(F32)]

    def run() -> list[squant.QuantizedTensor]:
        return quantize_with_options(weights, [0, 0], options, ["linear", "conv"])

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = run()
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
        assert torch.equal(a.zero_point, b.zero_point)


def _group_objective(weight: np.ndarray, q: squant.QuantizedTensor,
                     moments: np.ndarray | None) -> np.ndarray:
    """Per group, what the search minimises, in float64: ``sum(d**2)``, or with input moments
    ``sum_c var_c * sum_k d**2 + (sum_c mean_c * sum_k d)**2`` (``d``: the weight's error)."""
    o, i = weight.shape[:2]
    k = kernel_size(weight)
    slices = group_slices(i * k, q.group_size)
    index = np.concatenate([np.full(p.stop - p.start, j) for j, p in enumerate(slices)])
    step = 1.0 / q.scale.numpy().astype(np.float64)[:, index]  # as the kernel evaluates it
    zero = q.zero_point.numpy().astype(np.float64)[:, index]
    codes = q.codes.numpy().reshape(o, -1).astype(np.float64)
    d = (weight.reshape(o, -1).astype(np.float64) - (codes + zero) * step).reshape(o, i, k)
    out = np.zeros(q.scale.shape)
    for j, part in enumerate(slices):
        inputs = slice(part.start // k, part.stop // k)
        if moments is None:
            out[:, j] = (d[:, inputs] ** 2).sum(axis=(1, 2))
        else:
            var, mean = moments[0, 0, inputs], moments[0, 1, inputs]
            out[:, j] = ((d[:, inputs] ** 2).sum(2) @ var) + ((d[:, inputs].sum(2) @ mean) ** 2)
    return out


@settings(max_examples=80, deadline=None)
@given(grouped(), st.booleans(), st.integers(0, 2**32 - 1))
def test_search_is_never_worse_than_minmax_by_its_own_objective(drawn: tuple,
                                                                with_moments: bool,
                                                                seed: int) -> None:
    """Per group, ``range="search"`` ends with an objective no larger than minmax's: the
    weight's squared error, or with input moments (variances, means) the output error."""
    weight, bits, mode, scheme, g, _ = drawn
    if not np.isfinite(weight.astype(np.float64).max() - weight.min()) or (
            np.abs(weight).max() > 1e30):
        return
    rng = np.random.default_rng(seed)
    moments = None
    if with_moments:
        i = weight.shape[1]
        moments = np.stack([rng.uniform(0.1, 3, i), rng.normal(0, 2, i)])[None]
    found = []
    for range_ in ("minmax", "search"):
        opts = QuantOptions(bits, mode, scheme, range=range_, group_size=g)
        q = quantize_with_options([weight], [0], [opts], ["w"], moments=[moments])[0]
        found.append(_group_objective(weight, q, moments))
    minmax, search = found
    assert (search <= minmax * (1 + 1e-9) + 1e-300).all()


@pytest.mark.parametrize("value, error", [(1, squant.QuantizationError),
                                          (0, squant.QuantizationError),
                                          (True, TypeError), (4.0, TypeError),
                                          ("8", TypeError)])
def test_bad_group_sizes_are_refused(value: object, error: type) -> None:
    with pytest.raises(error, match="group_size"):
        squant.quantize_weight(np.ones((2, 8), F32), group_size=value)


def test_group_size_needs_per_channel_granularity_and_whole_kernels() -> None:
    with pytest.raises(squant.QuantizationError, match="granularity 'channel'"):
        squant.quantize_weight(np.ones((2, 8), F32), granularity="tensor", group_size=4)
    with pytest.raises(squant.QuantizationError,
                       match=r"weight: group_size 8 is not a multiple of its kernel size 9"):
        squant.quantize_weight(np.ones((2, 3, 3, 3), F32), group_size=8)


def test_a_transposed_weight_is_grouped_along_its_own_channels() -> None:
    """Axis 1 (ConvTranspose): the same as grouping the weight moved to axis 0."""
    w = np.random.default_rng(3).standard_normal((7, 5, 2, 2)).astype(F32)
    q = squant.quantize_weight(w, 3, axis=1, group_size=12)
    moved = squant.quantize_weight(np.ascontiguousarray(np.moveaxis(w, 1, 0)), 3,
                                   group_size=12)
    assert q.scale.shape == (5, 3)
    assert torch.equal(q.codes, moved.codes.movedim(0, 1))
    assert torch.equal(q.scale, moved.scale)
    assert torch.equal(q.dequantize(), moved.dequantize().movedim(0, 1))
