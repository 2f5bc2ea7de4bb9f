"""Benchmark: the first call of a process, cold (empty numba cache) and cached, vs a baseline.

Each figure comes from fresh Python processes: ``import torch``, ``import squant`` and the first
``squant.quantize(model, bits=4)`` (mode KC, ResNet-18 and ResNet-50 shapes, random weights):
- cold: ``NUMBA_CACHE_DIR`` pointing at an empty folder, so every kernel compiles (the first-ever
  call after installation);
- cached cold: a second process on that cache (kernels loaded, not compiled), counted beyond
  ``import torch``;
- per jitted function, the exclusive compile time of the cold call (numba's ``numba:compile``
  events; a function's time without the functions it calls, summed over its specializations).

Both kernels of this checkout are measured: ``native`` (the library built at install,
``squant.kernels.native``; build it in a source checkout with ``python -m
squant.kernels.native.build``) and ``jit`` (``SQUANT_KERNELS=jit``: numba's JIT).

``--baseline DIR`` runs the same in another checkout of squant (its default kernels; e.g.
``git worktree add ../base <commit>``), imported from its root, side by side. Run:
``python bench/bench_cold_start.py [--baseline ../base] [--rounds 2]`` (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("ResNet-18", "ResNet-50")

_WORKER = r"""
import json, os, sys, time
start = time.perf_counter()
import torch
torch_done = time.perf_counter()
import squant
squant_done = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from resnet import resnet18, resnet50
model = {"ResNet-18": resnet18, "ResNet-50": resnet50}[sys.argv[2]]()
events = []
if os.environ["SQUANT_KERNELS"] != "native":  # the native kernels never import numba
    from numba.core import event
    recorder = event.RecordingListener()
    event.register("numba:compile", recorder)
    events = recorder.buffer
call = time.perf_counter()
squant.quantize(model, bits=4, inplace=True)
done = time.perf_counter()
exclusive, stack = {}, []
for stamp, ev in events:
    func = ev.data["dispatcher"].py_func
    name = func.__module__.replace("squant.kernels.", "kernels.") + "." + func.__qualname__
    if ev.is_start:
        stack.append([name, stamp, 0.0])
        continue
    name, begun, children = stack.pop()
    exclusive[name] = exclusive.get(name, 0.0) + (stamp - begun) - children
    if stack:
        stack[-1][2] += stamp - begun
assert os.environ["SQUANT_KERNELS"] != "native" or "numba" not in sys.modules
print(json.dumps({"torch": torch_done - start, "squant": squant_done - torch_done,
                  "first_call": done - call, "compile": exclusive}))
"""


def run(checkout: Path, model: str, cache: str, kernels: str) -> dict:
    """One fresh process importing squant from ``checkout`` with numba's cache in ``cache`` and
    ``SQUANT_KERNELS=kernels``."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(checkout),
           "OMP_WAIT_POLICY": "PASSIVE", "SQUANT_KERNELS": kernels}
    out = subprocess.run([sys.executable, "-c", _WORKER, str(HERE), model], cwd=checkout,
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(checkout: Path, rounds: int, kernels: str) -> dict:
    """Median cold and cached-cold figures, and the compile table of the first cold round."""
    cold, cached, tables, torch_times = [], {m: [] for m in MODELS}, [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            first = run(checkout, MODELS[0], cache, kernels)
            cold.append(first["squant"] + first["first_call"])
            tables.append(first["compile"])
            for model in MODELS:
                again = run(checkout, model, cache, kernels)
                cached[model].append(again["squant"] + again["first_call"])
                torch_times.append(again["torch"])
    return {"cold": statistics.median(cold), "torch": statistics.median(torch_times),
            "cached": {m: statistics.median(v) for m, v in cached.items()},
            "compile": tables[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another squant checkout to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--functions", type=int, default=14, help="rows of the compile table")
    args = parser.parse_args()
    runs = {"native": (HERE.parent, "native"), "jit": (HERE.parent, "jit")}
    if args.baseline:
        runs = {"baseline": (args.baseline.resolve(), "auto"), **runs}
    results = {name: measure(path, args.rounds, kernels) for name, (path, kernels) in runs.items()}
    print(f"cores {os.cpu_count()}, OMP_WAIT_POLICY=PASSIVE, median of {args.rounds} rounds; "
          "numba threads: its default")
    print(f"{'':<52}" + "".join(f"{name:>10}" for name in results))
    rows = [("import torch", lambda r: r["torch"]),
            ("cold: import squant + first quantize(ResNet-18)", lambda r: r["cold"])]
    rows += [(f"cached cold, {m}: beyond import torch", lambda r, m=m: r["cached"][m])
             for m in MODELS]
    for label, get in rows:
        print(f"{label:<52}" + "".join(f"{get(r):>9.2f}s" for r in results.values()))
    print(f"\ncompile time per jitted function (exclusive, cold call), top {args.functions}:")
    names = set().union(*(r["compile"] for r in results.values()))
    last = list(results.values())[-1]["compile"]
    order = sorted(names, key=lambda n: -max(r["compile"].get(n, 0.0) for r in results.values()))
    for name in order[:args.functions]:
        print(f"{name:<52}" + "".join(
            f"{r['compile'][name]:>9.2f}s" if name in r["compile"] else f"{'-':>10}"
            for r in results.values()))
    print(f"{'all (' + str(len(last)) + ' functions here)':<52}" + "".join(
        f"{sum(r['compile'].values()):>9.2f}s" for r in results.values()))


if __name__ == "__main__":
    main()
