"""Benchmark: ``squant.quantize(model, bits=4)`` on ResNet-18 and ResNet-50 vs numpy RTN.

Prints, per model (torchvision's layer shapes, random weights, 4-bit, mode KC):
- warm median of ``squant.quantize`` with ``inplace=True``, with the default copy, and of
  per-layer ``squant.quantize_weight`` calls on the same weights;
- numpy per-channel round-to-nearest of the same weights, timed in the same process, and the
  ratios to it (ratios hold on a noisy machine; absolute times do not);
- cold: the first ``squant.quantize`` in a fresh process (numba's on-disk cache warm);
- peak extra memory of one ``squant.quantize`` call (peak RSS above the RSS before the call, in
  a fresh process whose kernels are already loaded), against the size of the float32 weights:
  the larger of the copy and in-place calls.

The issue-20 targets (2 threads): inplace <= 1.0x, copy <= 1.5x; with ``--busy 2`` (two
busy-loop processes on the cores) inplace and per-layer <= 2x. The load average is printed
before and after: on a shared machine other processes count as "busy" too.

``--baseline DIR`` times another checkout's squant (e.g. ``git archive`` of an older commit
unpacked in DIR) in the same process, interleaved: a before/after table. Run:
``python bench/bench_model.py [--repeats 10] [--busy 2] [--warm-only] [--cpu] [--baseline DIR]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see PERFORMANCE_NOTES.md

import copy
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numba
import torch

import squant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import median_times, numpy_rtn  # noqa: E402
from busy import busy_cores  # noqa: E402
from resnet import resnet18, resnet50  # noqa: E402

MODELS = {"ResNet-18": resnet18, "ResNet-50": resnet50}
BITS = 4


def layer_weights(model: torch.nn.Module) -> list:
    """The conv and linear weights as numpy arrays (views, no copy)."""
    return [m.weight.detach().numpy() for m in model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(name: str, inplace: bool, warm: bool) -> dict:
    """In a fresh process: time a quantize call and measure its peak extra RSS.

    ``warm``: first quantize a tiny model, so that loading the compiled kernels (tens of MB,
    once per process) is neither timed nor counted.
    """
    if warm:
        squant.quantize(torch.nn.Linear(4, 4), BITS)
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    weights_mib = sum(w.nbytes for w in layer_weights(model)) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    squant.quantize(model, BITS, inplace=inplace)
    seconds = time.perf_counter() - start
    extra_mib = (_status_kib("VmHWM") - before) / 1024
    return {"seconds": seconds, "extra_mib": extra_mib, "weights_mib": weights_mib}


def run_worker(name: str, inplace: bool, warm: bool) -> dict:
    """Run :func:`worker` in a fresh Python process and return what it measured."""
    out = subprocess.run([sys.executable, __file__, "--worker", name,
                          *(["--inplace"] if inplace else []), *(["--warm"] if warm else [])],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def import_checkout(root: Path) -> ModuleType:
    """The ``squant`` package of another checkout, imported beside the one this script uses
    (numba caches each checkout's kernels by their file, so both coexist in one process)."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules)
            if k == "squant" or k.startswith("squant.")}
    sys.path.insert(0, str(root))
    try:
        other = importlib.import_module("squant")
        if not Path(other.__file__).resolve().is_relative_to(root):
            raise SystemExit(f"--baseline {root}: imported {other.__file__} instead")
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k == "squant" or k.startswith("squant.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--inplace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="time the warm columns with N busy-loop processes running")
    parser.add_argument("--warm-only", action="store_true",
                        help="skip the cold and memory columns (fresh processes)")
    parser.add_argument("--cpu", action="store_true",
                        help="warm columns as CPU time of the calling thread with 1 numba thread "
                             "(what other processes on a shared machine barely change)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also time the squant of another checkout (e.g. `git archive` of an "
                             "older commit), interleaved in this process; warm columns only")
    args = parser.parse_args()
    versions = {"": squant}
    if args.baseline:
        versions = {"baseline": import_checkout(args.baseline.resolve()), "this": squant}
        args.warm_only = True
    clock = time.perf_counter
    if args.cpu:
        numba.set_num_threads(1)
        clock = time.thread_time
    if args.worker:
        print(json.dumps(worker(args.worker, args.inplace, args.warm)))
        return
    print(f"threads: numba {numba.get_num_threads()}, torch {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, cores {os.cpu_count()}"
          f"{f', {args.busy} busy-loop processes running' if args.busy else ''}"
          f"{'; CPU time of the calling thread' if args.cpu else '; wall time'}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    width = 19 if args.baseline else 10
    header = (f"{'model':<{width}} {'numpy RTN':>10} {'inplace':>9} {'ratio':>6} {'copy':>9} "
              f"{'ratio':>6} {'per-layer':>10} {'ratio':>6} {'cold':>8} {'weights':>8} "
              f"{'peak extra':>16}")
    print(header)
    print("-" * len(header))
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        weights = layer_weights(model)
        copies = iter([copy.deepcopy(model)  # made untimed
                       for _ in range((args.repeats + 1) * len(versions))])
        fns = {"rtn": lambda ws=weights: numpy_rtn(ws)}
        for label, sq in versions.items():
            fns.update({
                (label, "inplace"): lambda sq=sq, cs=copies: sq.quantize(next(cs), BITS,
                                                                         inplace=True),
                (label, "copy"): lambda sq=sq, m=model: sq.quantize(m, BITS),
                (label, "per_layer"): lambda sq=sq, ws=weights: [sq.quantize_weight(w, BITS)
                                                                 for w in ws],
            })
        with busy_cores(args.busy):
            t = median_times(fns, args.repeats, clock)
        rtn = t["rtn"]
        for label in versions:
            inplace, copied, per_layer = (t[label, "inplace"], t[label, "copy"],
                                          t[label, "per_layer"])
            line = (f"{(name + ' ' + label).strip():<{width}} {rtn * 1e3:>8.1f}ms"
                    f" {inplace * 1e3:>7.1f}ms {inplace / rtn:>5.2f}x"
                    f" {copied * 1e3:>7.1f}ms {copied / rtn:>5.2f}x"
                    f" {per_layer * 1e3:>8.1f}ms {per_layer / rtn:>5.2f}x")
            if not args.warm_only:
                cold = run_worker(name, inplace=False, warm=False)
                memory = max(run_worker(name, inplace=False, warm=True)["extra_mib"],
                             run_worker(name, inplace=True, warm=True)["extra_mib"])
                line += (f" {cold['seconds']:>7.2f}s {cold['weights_mib']:>6.0f}MB"
                         f" {memory:>6.0f}MB ({memory / cold['weights_mib']:.2f}x)")
            print(line)
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
