"""SQuant vs round-to-nearest on every grid, on the bundled Fashion-MNIST model.

For each grid (asymmetric/symmetric, per channel/per tensor) at 8 and 4 bits: top-1 accuracy on
the 2,000 bundled test images of round-to-nearest (mode E) and of SQuant (mode KC).

Run: ``python bench/bench_grids.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see PERFORMANCE_NOTES.md

import squant
from squant.demo import accuracy
from squant.demo_model import load_demo_data, load_demo_model

GRIDS = [("asymmetric", "channel"), ("symmetric", "channel"), ("asymmetric", "tensor"),
         ("symmetric", "tensor")]


def main() -> None:
    model = load_demo_model()
    images, labels = load_demo_data()
    print(f"FP32 accuracy {accuracy(model, images, labels):.2%} on {len(labels)} images")
    print(f"{'grid':<22} {'bits':>4} {'RTN (E)':>8} {'SQuant KC':>10}")
    for scheme, granularity in GRIDS:
        for bits in (8, 4):
            rtn, kc = (accuracy(squant.quantize(model, bits, mode, scheme=scheme,
                                                granularity=granularity), images, labels)
                       for mode in ("E", "KC"))
            print(f"{scheme + ', ' + granularity:<22} {bits:>4} {rtn:>8.2%} {kc:>10.2%}")


if __name__ == "__main__":
    main()
