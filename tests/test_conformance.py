"""The default mode reproduces the authors' published implementation bit for bit, and the other
grids reproduce the spec's reference.

``data/reference`` holds the cases of ``shared/reference`` (see its README): float32 weights and
the codes, scales and zero points that the authors' code gives for them. ``data/reference_grids``
holds cases on the symmetric and per-tensor grids, from the spec's independent reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA

import squant

REFERENCE_CASES = sorted((DATA / "reference").glob("case_*.npz"))
GRID_CASES = sorted((DATA / "reference_grids").glob("grid_*.npz"))
MODES = {(False, False): "E", (True, False): "K", (False, True): "C", (True, True): "KC"}


def _mode(case: np.lib.npyio.NpzFile) -> str:
    return MODES[(bool(case["kernel"]), bool(case["channel"]))]


# Every case with the native kernels and with numba's JIT.
pytestmark = pytest.mark.usefixtures("both_kernels")

def test_all_reference_cases_are_present():
    assert len(REFERENCE_CASES) == 55
    assert len(GRID_CASES) == 33


@pytest.mark.parametrize("path", REFERENCE_CASES, ids=lambda p: p.stem)
def test_reference_case_is_reproduced_exactly(path):
    case = np.load(path)
    q = squant.quantize_weight(case["w"], int(case["bits"]), _mode(case))
    np.testing.assert_array_equal(q.codes.numpy(), case["codes"])
    np.testing.assert_array_equal(q.scale.numpy(), case["scale"])
    np.testing.assert_array_equal(q.zero_point.numpy(), case["zero_point"])
    assert q.codes.dtype == torch.int8 and q.scale.dtype == torch.float32


@pytest.mark.parametrize("path", GRID_CASES, ids=lambda p: p.stem)
def test_grid_case_is_reproduced_exactly(path):
    case = np.load(path)
    q = squant.quantize_weight(case["w"], int(case["bits"]), _mode(case),
                               scheme=str(case["scheme"]), granularity=str(case["granularity"]))
    np.testing.assert_array_equal(q.codes.numpy(), case["codes"])
    np.testing.assert_array_equal(q.scale.numpy(), case["scale"])
    np.testing.assert_array_equal(q.zero_point.numpy(), case["zero_point"])
    assert (q.scheme, q.granularity) == (str(case["scheme"]), str(case["granularity"]))


def test_reference_cases_batched_in_one_call_are_reproduced_exactly():
    """The ragged batch gives each weight exactly what it gets alone, whatever its neighbours."""
    cases = [np.load(p) for p in REFERENCE_CASES]
    by_mode: dict[str, list] = {}
    for case in cases:
        by_mode.setdefault(_mode(case), []).append(case)
    for mode, group in by_mode.items():
        results = squant.quantize_weights([c["w"] for c in group], [int(c["bits"]) for c in group],
                                          mode)
        for case, q in zip(group, results):
            np.testing.assert_array_equal(q.codes.numpy(), case["codes"])
            np.testing.assert_array_equal(q.scale.numpy(), case["scale"])
            np.testing.assert_array_equal(q.zero_point.numpy(), case["zero_point"])
