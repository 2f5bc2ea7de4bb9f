"""How far any per-channel range choice can go: ``range="search"`` against an oracle.

The oracle sees real inputs. For every Conv2d and Linear it records the second moments
``H = E[x x^T]`` of the layer's real input patches (per group) on every tenth evaluation input,
quantizes each output channel with SQuant KC on its full range and on each shrunk range that
``range="search"`` tries (the kernels' own factors), and keeps the range whose real output
error ``d^T H d`` is least (``d``: the channel's weight error). No data-free criterion that
picks among those ranges layer by layer can do better on that measure, so where the oracle does
not beat minmax, the range search cannot be expected to.

Rows per model, at 4 and 3 bits: SQuant KC (minmax), KC with ``range="search"``, and the oracle.
Same set-up as ``bench/accuracy.py``; run ``python bench/search_oracle.py`` (about 1-2 minutes
on 2 cores, 2-3 GiB of memory). Writes ``bench/results/search_oracle.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads must not spin

import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import squant
from squant import kernels
from squant.demo_model import load_demo_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_data import exit_if_missing, fashion_mnist_test, photo_crops  # noqa: E402
from accuracy_rows import HEADER, Row, Task, compare, format_row, logits  # noqa: E402
from mobilenet_v2 import mobilenet_v2_imagenet  # noqa: E402

BITS = (4, 3)
RESULTS = Path(__file__).resolve().parent / "results" / "search_oracle.json"
LAYERS = (nn.Conv2d, nn.Linear)


def input_second_moments(model: nn.Module, inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """Per layer name, ``E[x x^T]`` of its input patches, ``(groups, n, n)`` float64."""
    found = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().double()
            if isinstance(module, nn.Linear):
                patches = x.reshape(-1, x.shape[-1]).T[None]
            else:
                cols = F.unfold(x, module.kernel_size, module.dilation, module.padding,
                                module.stride)
                cols = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)
                patches = cols.reshape(module.groups, cols.shape[0] // module.groups, -1)
            found[name] = (patches @ patches.transpose(1, 2) / patches.shape[-1]).numpy()
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, LAYERS)]
    with torch.inference_mode():
        model(inputs)
    for handle in handles:
        handle.remove()
    return found


def kc_on_ranges(weight: np.ndarray, bits: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """SQuant KC of a ``(O, I, K)`` float32 weight, channel ``c`` on the grid of
    ``[lo[c], hi[c]]``, dequantized (float64)."""
    out, inner, ksize = weight.shape
    codes = np.empty(weight.size, np.int8)
    channel = np.arange(out, dtype=np.int64) * inner * ksize
    scale, zero = np.empty(out, np.float32), np.empty(out, np.float32)
    finite = np.empty(out, np.bool_)
    flags = kernels.KERNEL_PASS | kernels.CHANNEL_PASS | kernels.GIVEN_RANGE
    kernels.quantize_blocks(
        weight.ctypes.data + channel * 4, codes.ctypes.data + channel,
        np.full(out, inner, np.int64), np.full(out, ksize, np.int64),
        np.full(out, bits, np.int64), np.full(out, flags, np.int64),
        lo.astype(np.float32), hi.astype(np.float32), np.array([0, out], np.int64),
        scale, zero, finite, 0, 1, None, np.full(out, kernels.NO_MOMENTS, np.int64))
    codes = codes.reshape(weight.shape).astype(np.float64)
    return (codes + zero[:, None, None]) / scale.astype(np.float64)[:, None, None]


def oracle_weight(module: nn.Module, moments: np.ndarray, bits: int) -> torch.Tensor:
    """The layer's weight quantized channel by channel on the range of least real output
    error among minmax and the search's shrunk ranges."""
    shape = module.weight.shape
    weight = np.ascontiguousarray(module.weight.detach().numpy().reshape(shape[0], shape[1], -1),
                                  np.float32)
    groups = moments.shape[0]
    flat = weight.reshape(shape[0], -1)
    lo, hi = flat.min(1), flat.max(1)
    best, best_error = None, None
    for factor in kernels.SHRINK_FACTORS:
        candidate = kc_on_ranges(weight, bits, factor * lo, factor * hi)
        diff = (candidate - weight).reshape(groups, shape[0] // groups, -1)
        error = ((diff @ moments) * diff).sum(-1).reshape(-1)
        if best is None:
            best, best_error = candidate, error
        else:
            better = error < best_error
            best[better], best_error = candidate[better], np.minimum(error, best_error)
    return torch.from_numpy(best.astype(np.float32).reshape(shape))


def with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the float ``model`` whose named layers hold ``weights``."""
    copied = copy.deepcopy(model)
    modules = dict(copied.named_modules())
    for name, weight in weights.items():
        modules[name].weight.data = weight.clone()
    return copied


def oracle_model(model: nn.Module, moments: dict[str, np.ndarray], bits: int) -> nn.Module:
    """A float copy of ``model`` holding the oracle's dequantized weights."""
    return with_weights(model, {name: oracle_weight(module, moments[name], bits)
                                for name, module in model.named_modules()
                                if isinstance(module, LAYERS)})


def run(task: Task) -> list[Row]:
    """KC, KC search and the oracle on one task, printed as they come."""
    reference = logits(task.model, task.inputs)
    moments = input_second_moments(task.model, task.inputs[::10])
    methods = {
        "KC": lambda bits: squant.quantize(task.model, bits),
        "KC search": lambda bits: squant.quantize(task.model, bits, range="search"),
        "KC oracle search": lambda bits: oracle_model(task.model, moments, bits),
    }
    rows = []
    for bits in BITS:
        for method, quantize in methods.items():
            start = time.perf_counter()
            quantized = quantize(bits)
            seconds = time.perf_counter() - start
            scores = compare(task, reference, logits(quantized, task.inputs))
            rows.append(Row(task.name, bits, method, **scores, seconds=seconds))
            print(format_row(rows[-1]), flush=True)
    return rows


def main() -> None:
    """Check requirements, then run MobileNetV2 (unfolded) and the Fashion-MNIST CNN."""
    exit_if_missing("search_oracle.py")
    squant.quantize(load_demo_model(), 4, range="search")  # load the kernels: warm timings
    crops = photo_crops()
    images, labels = fashion_mnist_test()
    tasks = [Task("MobileNetV2 unfolded", mobilenet_v2_imagenet().eval(), crops, None, BITS, {}),
             Task("Fashion-MNIST CNN", load_demo_model(), images, labels, BITS, {})]
    print("KC = SQuant KC on each channel's full range; search = range=\"search\"; oracle = "
          "the search's ranges chosen by the real output error (time: quantizing)")
    print(HEADER + "\n" + "-" * len(HEADER))
    rows = [row for task in tasks for row in run(task)]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
