"""Benchmark: the native library against numba's JIT kernels, per kernel size of ResNet-50's
layers (1x1 convs and the fc, 3x3 convs, the 7x7 stem), 4-bit KC, and numpy round-to-nearest of
the same weights: CPU time of the calling thread per weight, one numba thread, the three timed
in turn in the same process (medians). Both kernels give the same codes (checked here too).

On a CPU with AVX2 the native library runs three passes in C (kernels/native/*.c): KQ on 3x3
kernels with the transposes around it, CQ after it, and CQ after EQ (1x1 kernels and Linear
rows); the rest is numba's code compiled ahead of time (the 7x7 row: KQ on other kernel sizes is
numba's).

Run: ``python bench/bench_kernel_sizes.py [--repeats 15]`` (needs the native library built).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see PERFORMANCE_NOTES.md
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import sys
import time
from pathlib import Path

import numpy as np
from squant.kernels import native

from squant import kernels
from squant.core import batch
from squant.core.options import QuantOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import median_times, numpy_rtn, random_weights  # noqa: E402
from resnet import resnet50, weight_shapes  # noqa: E402


def with_kernel(entry, weights: list[np.ndarray]) -> list:
    """``batch.quantize_batch`` of ``weights`` (4-bit KC) with the kernel ``entry``."""
    before = batch.kernel
    batch.kernel = lambda name: entry if name == "quantize_blocks" else before(name)
    try:
        return batch.quantize_batch(weights, [QuantOptions(bits=4, mode="KC")] * len(weights))
    finally:
        batch.kernel = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    library = native.load()
    if library is None:
        sys.exit(f"the native library does not load: {native.why_not_native()}")
    shapes = weight_shapes(resnet50())
    weights = random_weights(shapes)
    by_size: dict[int, list[np.ndarray]] = {}
    for w in weights:  # as the kernels take them: (O, I, K)
        size = int(np.prod(w.shape[2:], dtype=np.int64))
        by_size.setdefault(size, []).append(w.reshape(w.shape[0], w.shape[1], size))
    print(f"numba threads {os.environ['NUMBA_NUM_THREADS']}; CPU time of the calling thread; "
          f"passes in C: {'yes' if library.native_passes.all() else 'no (no AVX2)'}")
    print(f"{'ResNet-50 layers':18} {'weights':>8} {'numpy RTN':>10} {'numba JIT':>10} "
          f"{'native':>10} {'native/JIT':>11} {'native/RTN':>11}   (ns per weight)")
    for size, group in sorted(by_size.items()):
        jit = with_kernel(kernels.quantize_blocks, group)
        ours = with_kernel(library.quantize_blocks, group)
        for a, b in zip(jit, ours):
            if not np.array_equal(a.codes, b.codes):
                sys.exit("the native kernels' codes differ from the JIT's")
        times = median_times({"rtn": lambda g=group: numpy_rtn(g),
                              "jit": lambda g=group: with_kernel(kernels.quantize_blocks, g),
                              "native": lambda g=group: with_kernel(library.quantize_blocks, g)},
                             args.repeats, clock=time.thread_time)
        count = sum(w.size for w in group)
        ns = {key: value / count * 1e9 for key, value in times.items()}
        side = int(round(size ** 0.5))
        print(f"{f'{side}x{side} ({len(group)} layers)':18} {count / 1e6:7.2f}M "
              f"{ns['rtn']:10.2f} {ns['jit']:10.2f} {ns['native']:10.2f} "
              f"{ns['native'] / ns['jit']:10.2f}x {ns['native'] / ns['rtn']:10.2f}x")


if __name__ == "__main__":
    main()
