"""How long ``import squant`` takes beyond ``import torch``, and which modules it loads.

Each import runs in a fresh interpreter, the variants interleaved round by round, and the
medians are printed side by side. ``--baseline DIR`` adds another checkout of squant (e.g. a
``git worktree`` of an older commit), imported from its root, as a baseline column.

Run: ``python bench/bench_import.py [--rounds 15] [--baseline ../old-checkout]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "transformers", "matplotlib")


def time_import(statement: str, cwd: Path | None) -> float:
    """Wall seconds of a fresh interpreter running ``statement`` (interpreter start included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], cwd=cwd, check=True)
    return time.perf_counter() - start


def loaded_modules(cwd: Path | None) -> tuple[int, list[str]]:
    """How many squant modules ``import squant`` loads, and which optional dependencies."""
    code = ("import sys, squant; names = set(sys.modules); "
            "print(sum(n.startswith('squant') for n in names)); "
            f"print(' '.join(sorted({{n.split('.')[0] for n in names}} & set({OPTIONAL!r}))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    return int(out[0]), out[1].split() if len(out) > 1 else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--baseline", type=Path, help="another squant checkout to compare with")
    args = parser.parse_args()
    variants = {"python": ("pass", None), "import torch": ("import torch", None),
                "import squant": ("import squant", None)}
    if args.baseline:
        variants["import squant (baseline)"] = ("import squant", args.baseline.resolve())
    for statement, cwd in variants.values():  # warm the OS and numba caches once
        time_import(statement, cwd)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (statement, cwd) in variants.items():
            times[name].append(time_import(statement, cwd))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"median of {args.rounds} fresh interpreters, interleaved")
    print(f"{'what':<28} {'wall':>8} {'beyond torch':>13} {'squant modules':>15}  optional loaded")
    for name, median in medians.items():
        beyond = "" if "squant" not in name else f"{median - medians['import torch']:>12.3f}s"
        modules, optional = ("", "") if "squant" not in name else loaded_modules(variants[name][1])
        print(f"{name:<28} {median:>7.3f}s {beyond:>13} {modules!s:>15}  "
              f"{' '.join(optional) or ('none' if 'squant' in name else '')}")


if __name__ == "__main__":
    main()
