"""How a batch is shared among threads: block ranges of decreasing work, and a calling thread
that never waits for a helper thread the OS has not started."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import squant
from squant.core import batch


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1e6), min_size=1, max_size=300), st.integers(2, 16))
def test_chunk_cuts_cover_every_block_once_in_order(work: list[float], threads: int) -> None:
    cuts = batch._chunk_cuts(np.array(work) + 1.0, threads)
    assert cuts[0] == 0 and cuts[-1] == len(work)
    assert all(a < b for a, b in zip(cuts, cuts[1:]))


def test_chunk_cuts_shrink_towards_the_end() -> None:
    """Guided: the first range holds about half a thread's share, the last ones little."""
    work = np.ones(1000)
    cuts = batch._chunk_cuts(work, 2)
    sizes = np.diff(cuts)
    assert 200 <= sizes[0] <= 300  # 1 / (2 * threads) of all
    assert sizes[-2] <= 1000 / 32 + 1  # down to 1 / (16 * threads) of all
    assert list(sizes[:-1]) == sorted(sizes[:-1], reverse=True)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_a_helper_that_cannot_start_is_not_waited_for() -> None:
    """With every pool thread held up (as on a busy machine where a helper waits for a core),
    a batch worth two threads is done by the calling thread alone, with the same codes."""
    rng = np.random.default_rng(5)
    weights = [rng.standard_normal((256, 128, 3, 3)).astype(np.float32),
               rng.standard_normal((512, 300)).astype(np.float32)]
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        alone = squant.quantize_weights(weights, 4)
        numba.set_num_threads(2)
        squant.quantize_weights(weights, 4)  # makes the pool
        release = threading.Event()
        blockers = [batch._pool.submit(release.wait) for _ in range(batch._pool._max_workers)]
        done: list = []

        def call() -> None:
            numba.set_num_threads(2)  # numba's setting is per thread
            done.append(squant.quantize_weights(weights, 4))

        caller = threading.Thread(target=call)
        caller.start()
        caller.join(timeout=60)
        finished = not caller.is_alive()
        release.set()
        for blocker in blockers:
            blocker.result()
        caller.join()
    finally:
        numba.set_num_threads(before)
    assert finished, "the calling thread waited for a helper that had not started"
    for a, b in zip(alone, done[0], strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
