"""How close each method's 4-bit g64 weights of SmolLM2 come to its reference weights, which sit
on Q4_1 grids (blocks of 32, a float step and a float offset each): the share of weights within
1% of a step of the reference, the share of 32-blocks where every weight is, and the mean
``|Q - w| / step`` (``step``: the group's minmax step; 0.25 for weights uniform between levels).
A float zero point (HQQ) can follow a block's offset; an integer one (RTN, squant) cannot.

    python bench/transformers_lattice.py        # 2 threads; HQQ takes ~20-40 s here
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import requirements  # noqa: E402
import transformers_data as data  # noqa: E402
import transformers_methods as tm  # noqa: E402


def closeness(reference: dict[str, torch.Tensor], weights: tm.Weights, group: int = 64,
              block: int = 32) -> tuple[float, float, float]:
    """``(share of weights within 1% of a step, share of whole blocks within, mean |d|/step)``
    over every named ``(O, I)`` weight, ``group | I`` and ``block | I``."""
    close = total = blocks = block_total = 0
    relative = 0.0
    for name, q in weights.items():
        w = reference[name]
        rows, cols = w.shape
        groups = w.reshape(rows, cols // group, group)
        step = ((groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15).clamp(
            min=1e-12)
        d = (q.reshape(groups.shape) - groups).abs() / step
        near = d < 0.01
        close += int(near.sum())
        total += near.numel()
        relative += float(d.sum())
        whole = near.reshape(rows, cols // block, block).all(-1)
        blocks += int(whole.sum())
        block_total += whole.numel()
    return close / total, blocks / block_total, relative / total


def main() -> int:
    requirements.exit_if_missing("transformers_lattice.py", data.missing_requirements())
    torch.set_num_threads(2)
    base, _ = data.load_smollm2()
    names = tm.block_linears(base)
    modules = dict(base.named_modules())
    reference = {n: modules[n].weight.detach().float() for n in names}
    runs = {"RTN g64": tm.rtn(64), "SQuant g64": tm.squant_model(64), "HQQ g64": tm.hqq(64)}
    print("| method (4 bits) | weights within 1% of a step | 32-blocks all within | "
          "mean abs(d)/step |")
    print("| --- | --- | --- | --- |")
    for label, run in runs.items():
        near, whole, mean = closeness(reference, run(copy.deepcopy(base), names, 4))
        print(f"| {label} | {100 * near:.1f}% | {100 * whole:.1f}% | {mean:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
