"""The flip step's error sum is the exact sum rounded once to float64 (spec, flip step 1)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from squant.kernels.constants import MAX_PARTIALS
from squant.kernels.exact_sum import error_sum as _error_sum


def error_sum(err):
    return _error_sum(err, np.empty(MAX_PARTIALS))


def _errors(seed: int, size: int, tiny_share: float) -> np.ndarray:
    """float32 errors in (-1, 1) mixing ordinary values with tiny and denormal ones."""
    rng = np.random.default_rng(seed)
    err = rng.uniform(-1, 1, size).astype(np.float32)
    tiny = rng.random(size) < tiny_share
    err[tiny] = (rng.standard_normal(tiny.sum()) * 10.0 ** rng.integers(-44, -6, tiny.sum()))
    return err.astype(np.float32)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 300), st.sampled_from([0.0, 0.01, 0.5, 1.0]))
def test_error_sum_is_the_correctly_rounded_exact_sum(seed, size, tiny_share):
    err = _errors(seed, size, tiny_share)
    assert error_sum(err[:size]) == math.fsum(err.astype(np.float64))


def test_error_sum_rounds_half_way_cases_like_the_exact_sum():
    """0.5 + 2**-60 is not 0.5: a naive float64 sum would lose the tiny part and round k to 0."""
    err = np.array([0.5, 2.0**-61, 2.0**-61, 0.25, -0.25], dtype=np.float32)
    total = error_sum(err)
    assert total == math.fsum(err.astype(np.float64))
    assert total == 0.5  # 0.5 + 2**-60 rounds to 0.5 in float64: the spec's "as float64 allows"
    err = np.array([0.75, 0.75, 2.0**-40, -(2.0**-41)], dtype=np.float32)
    assert error_sum(err) == math.fsum(err.astype(np.float64))


def test_error_sum_of_huge_groups_is_exact():
    """Beyond the fast path's bound (sum of |e| >= 8000) the slow path still gives the exact sum."""
    err = _errors(7, 40_000, 0.0)
    assert error_sum(err) == math.fsum(err.astype(np.float64))
    assert error_sum(err[123:30_000]) == math.fsum(err[123:30_000].astype(np.float64))
