"""Accuracy: SQuant KC keeps at least round-to-nearest's accuracy on real data (bundled slice)."""

from __future__ import annotations

import squant
from squant.demo import accuracy, round_to_nearest
from squant.demo_model import load_demo_data, load_demo_model


def test_kc_at_least_as_accurate_as_round_to_nearest_at_4_bits() -> None:
    """On the 2,000 bundled Fashion-MNIST test images, 4-bit SQuant KC >= 4-bit RTN."""
    model = load_demo_model()
    images, labels = load_demo_data()
    kc = accuracy(squant.quantize(model, bits=4, mode="KC"), images, labels)
    rtn = accuracy(round_to_nearest(model, 4), images, labels)
    assert kc >= rtn, f"4-bit SQuant KC {kc:.2%} < round to nearest {rtn:.2%}"
