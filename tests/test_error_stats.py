"""``squant quantize --report``'s statistics (one numba pass, ``squant.kernels.error_stats``)
equal ``squant.core.report``'s (numpy, float64 sums of the differences) on every kind of weight,
grid and group size: the sums up to float64 rounding, the largest weight error exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import cases

import squant
from squant.core.report import layer_report
from squant.io import checkpoint_stats


@settings(max_examples=60, deadline=None)
@given(case=cases(), group=st.one_of(st.none(), st.integers(2, 80)), blocks=st.booleans(),
       transposed=st.booleans())
def test_statistics_equal_the_report(case, group, blocks, transposed) -> None:
    weight = torch.from_numpy(case.weight)
    axis = 0
    if transposed:  # output channels on axis 1, as a ConvTranspose weight
        weight, axis = weight.transpose(0, 1).contiguous(), 1
    if group is not None:
        group = case.weight[0].size if group > case.weight[0].size else group
        ksize = case.as_oik.shape[2]
        group = max(ksize, group // ksize * ksize)  # convs: groups of whole kernels
        group = group if group >= 2 else None  # a channel of one weight has no groups
    granularity = "channel" if group is not None else case.granularity
    q = squant.quantize_weight(weight, case.bits, mode=case.mode, scheme=case.scheme,
                               granularity=granularity, axis=axis, group_size=group)
    with pytest.MonkeyPatch.context() as patch:
        if blocks:  # the blocks of channels the threads take: a few channels each
            patch.setattr(checkpoint_stats, "_STATS_ELEMENTS", 3 * case.as_oik[0].size)
        stats = checkpoint_stats.tensor_stats("w", weight, q)
    report = layer_report("w", "", weight.shape, [weight], [q], 0.0)
    assert stats["max_abs_weight_error"] == report.max_abs_weight_error
    for field, value in stats.items():
        assert value == pytest.approx(getattr(report, field), rel=1e-9, abs=1e-9), field
