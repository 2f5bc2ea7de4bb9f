"""Benchmark: SQuant's kernels on ResNet-18 and ResNet-50 layer shapes vs numpy round-to-nearest.

Prints, per model (random weights with the exact layer shapes, 4-bit, mode KC):
- cold first call in a fresh process, with numba's on-disk cache empty (compile) and warm (load);
- warm median of the batched call (``quantize_weights``: one kernel call for every layer) and of
  per-layer ``quantize_weight`` calls;
- plain numpy per-channel round-to-nearest of the same weights, timed in the same process, and
  the ratios to it (ratios hold on a noisy machine; absolute times do not);
- batched KC with ``range="search"`` and its ratio to batched KC (minmax).

Run: ``python bench/bench_kernels.py [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see PERFORMANCE_NOTES.md

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch

import squant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from busy import busy_cores  # noqa: E402
from resnet import resnet18, resnet50, weight_shapes  # noqa: E402

BITS = 4


def random_weights(shapes: list[tuple[int, ...]], seed: int = 0) -> list[np.ndarray]:
    """He-normal float32 weights with the given shapes."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)
            for s in shapes]


def numpy_rtn(weights: list[np.ndarray], bits: int = BITS) -> list[np.ndarray]:
    """Per-output-channel asymmetric round-to-nearest in plain numpy, layer by layer."""
    n = 2 ** (bits - 1)
    out = []
    for w in weights:
        w2 = w.reshape(w.shape[0], -1)
        lo, hi = w2.min(axis=1, keepdims=True), w2.max(axis=1, keepdims=True)
        scale = np.float32(2**bits - 1) / np.maximum(hi - lo, np.float32(1e-8))
        zero = np.rint(scale * lo) + np.float32(n)
        out.append(np.clip(np.rint(scale * w2 - zero), -n, n - 1).astype(np.int8))
    return out


def median_times(fns: dict, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Median time in seconds (wall, or ``clock``'s) of each ``fns[name]()`` over ``repeats``
    rounds (after one warm-up). Each round runs every function once, interleaved, so that all
    see the same machine: ratios then hold even when the machine is busy."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


_COLD_SCRIPT = """
import time
start = time.perf_counter()
import numpy as np, squant
imported = time.perf_counter()
squant.quantize_weight(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32))
done = time.perf_counter()
print(f"{imported - start:.3f} {done - imported:.3f}")
"""


def cold_call(cache_dir: str | None, kernels: str = "auto") -> tuple[float, float]:
    """(import time, first-call time) in a fresh process; ``cache_dir`` overrides numba's cache,
    ``kernels`` is ``SQUANT_KERNELS`` (``native``: the library built at install; ``jit``)."""
    env = {**os.environ, "SQUANT_KERNELS": kernels}
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", _COLD_SCRIPT], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="time the warm table with N busy-loop processes running")
    parser.add_argument("--warm-only", action="store_true", help="skip the cold figures")
    args = parser.parse_args()
    print(f"threads: numba {numba.get_num_threads()}, torch {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, cores {os.cpu_count()}"
          f"{f', {args.busy} busy-loop processes running' if args.busy else ''}")
    if not args.warm_only:
        cold_figures()
    with busy_cores(args.busy):
        warm_table(args.repeats)


def cold_figures() -> None:
    """The first call in a fresh process: native kernels, then numba's JIT with an empty and
    with a warm numba cache."""
    with tempfile.TemporaryDirectory() as empty:
        imp, first = cold_call(empty, "native")
        print(f"cold, native kernels (no numba):   import {imp:.2f} s + first call {first:.2f} s"
              f"  -> {imp + first:.2f} s in all")
        imp, compile_s = cold_call(empty, "jit")
        print(f"cold, JIT, empty numba cache:      import {imp:.2f} s + first call "
              f"{compile_s:.2f} s")
        imp, load_s = cold_call(empty, "jit")
        print(f"cold, JIT, warm numba cache:       import {imp:.2f} s + first call {load_s:.2f} s"
              f"  -> {imp + load_s:.2f} s in all")
    print()


def warm_table(repeats: int) -> None:
    """Warm medians of squant and numpy RTN on ResNet-18 and ResNet-50 shapes, interleaved."""
    header = (f"{'model':<10} {'weights':>9} {'numpy RTN':>10} {'KC batched':>11} {'ratio':>6}"
              f" {'KC per-layer':>13} {'ratio':>6} {'E batched':>10} {'ratio':>6}"
              f" {'KC search':>10} {'vs KC':>6}")
    print(header)
    print("-" * len(header))
    for name, build in (("ResNet-18", resnet18), ("ResNet-50", resnet50)):
        weights = random_weights(weight_shapes(build()))
        count = sum(w.size for w in weights)
        t = median_times({
            "rtn": lambda ws=weights: numpy_rtn(ws),
            "batched": lambda ws=weights: squant.quantize_weights(ws, BITS),
            "per_layer": lambda ws=weights: [squant.quantize_weight(w, BITS) for w in ws],
            "eq_only": lambda ws=weights: squant.quantize_weights(ws, BITS, "E"),
            "search": lambda ws=weights: squant.quantize_weights(ws, BITS, range="search"),
        }, repeats)
        rtn, batched, per_layer, eq_only = t["rtn"], t["batched"], t["per_layer"], t["eq_only"]
        search = t["search"]
        print(f"{name:<10} {count / 1e6:>8.1f}M {rtn * 1e3:>8.1f}ms {batched * 1e3:>9.1f}ms"
              f" {batched / rtn:>5.2f}x {per_layer * 1e3:>11.1f}ms {per_layer / rtn:>5.2f}x"
              f" {eq_only * 1e3:>8.1f}ms {eq_only / rtn:>5.2f}x"
              f" {search * 1e3:>8.1f}ms {search / batched:>5.2f}x")


if __name__ == "__main__":
    main()
