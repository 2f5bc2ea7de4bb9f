"""Why no per-layer rule makes ``range="search"`` beat minmax on every model.

Two experiments on the models where the search loses (``bench/accuracy.py``: the Fashion-MNIST
CNN, MobileNetV2 folded at 3 bits; both have no BatchNorm left, so the search minimises each
channel's weight error):

1. **One layer at a time** (Fashion-MNIST CNN): every layer alone gets the search's weights, the
   others keep minmax SQuant KC; then all the layers that helped alone get them together. If
   the effects added up, a rule that picks the right layers would win; they do not add up.
2. **A margin** (Fashion CNN and MobileNetV2 folded): a channel keeps its shrunk range only if
   that cuts its weight error by more than a fraction ``margin`` (0 is ``range="search"``
   itself, checked here weight for weight; a large margin is minmax). If one margin won on
   both models, the search would only need a threshold; the best margins lie at opposite ends.

Same set-up as ``bench/accuracy.py``; run ``python bench/search_ablation.py`` (about 2 minutes
on 2 cores). Writes ``bench/results/search_ablation.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads must not spin

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

import squant
from squant import kernels
from squant.demo_model import load_demo_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_data import exit_if_missing, fashion_mnist_test, photo_crops  # noqa: E402
from accuracy_rows import HEADER, Row, Task, compare, format_row, logits  # noqa: E402
from mobilenet_v2 import fold_batchnorm, mobilenet_v2_imagenet  # noqa: E402
from search_oracle import LAYERS, kc_on_ranges, with_weights  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "search_ablation.json"
MARGINS = (0.0, 0.1, 0.2, 0.3, 0.5)


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every Conv2d and Linear of ``model``, by name."""
    return {name: module.weight.detach() for name, module in model.named_modules()
            if isinstance(module, LAYERS)}


def score(task: Task, reference: torch.Tensor, model: nn.Module, bits: int, method: str
          ) -> Row:
    """One printed row: ``model`` against the FP32 ``reference`` logits."""
    row = Row(task.name, bits, method, **compare(task, reference, logits(model, task.inputs)),
              seconds=0.0)
    print(format_row(row), flush=True)
    return row


def one_layer_at_a_time(task: Task, bits: int) -> list[Row]:
    """Minmax KC with the search's weights in one layer, for each layer; then in all the
    layers whose KL dropped alone."""
    reference = logits(task.model, task.inputs)
    minmax = layer_weights(squant.dequantize(squant.quantize(task.model, bits)))
    searched = layer_weights(squant.dequantize(squant.quantize(task.model, bits,
                                                               range="search")))
    rows = [score(task, reference, with_weights(task.model, minmax), bits, "KC")]
    helped = {}
    for name in minmax:
        row = score(task, reference, with_weights(task.model, minmax | {name: searched[name]}),
                    bits, f"search on {name}")
        rows.append(row)
        if row.kl < rows[0].kl:
            helped[name] = searched[name]
    rows.append(score(task, reference, with_weights(task.model, minmax | helped), bits,
                      f"search on the {len(helped)} that helped"))
    rows.append(score(task, reference, with_weights(task.model, searched), bits, "KC search"))
    return rows


def margin_weight(weight: torch.Tensor, bits: int, margin: float) -> torch.Tensor:
    """``weight`` quantized with SQuant KC and dequantized, each channel on the shrunk range of
    least weight error if that error is below ``1 - margin`` times its minmax error, else on
    its minmax range."""
    shape = weight.shape
    flat = np.ascontiguousarray(weight.numpy().reshape(shape[0], shape[1], -1), np.float32)
    lo, hi = flat.reshape(shape[0], -1).min(1), flat.reshape(shape[0], -1).max(1)
    candidates = np.stack([kc_on_ranges(flat, bits, f * lo, f * hi)
                           for f in kernels.SHRINK_FACTORS])
    errors = ((candidates - flat) ** 2).reshape(len(candidates), shape[0], -1).sum(-1)
    channels = np.arange(shape[0])
    best = errors.argmin(0)  # the earliest on ties, as the kernels keep
    keep = errors[best, channels] < (1.0 - margin) * errors[0]
    chosen = candidates[np.where(keep, best, 0), channels]
    return torch.from_numpy(chosen.astype(np.float32).reshape(shape))


def margins(task: Task, bits: int) -> list[Row]:
    """Minmax KC, and the search with each of ``MARGINS``."""
    reference = logits(task.model, task.inputs)
    rows = [score(task, reference, squant.quantize(task.model, bits), bits, "KC")]
    weights = layer_weights(task.model)
    searched = layer_weights(squant.dequantize(squant.quantize(task.model, bits,
                                                               range="search")))
    for margin in MARGINS:
        chosen = {name: margin_weight(w, bits, margin) for name, w in weights.items()}
        if margin == 0.0 and not all(torch.equal(chosen[n], searched[n]) for n in chosen):
            raise SystemExit("margin 0 does not reproduce range=\"search\": fix the emulation")
        rows.append(score(task, reference, with_weights(task.model, chosen), bits,
                          f"search, margin {margin:.0%}"))
    return rows


def main() -> None:
    """Check requirements, then run both experiments at 4 and 3 bits."""
    exit_if_missing("search_ablation.py")
    images, labels = fashion_mnist_test()
    crops = photo_crops()
    fashion = Task("Fashion-MNIST CNN", load_demo_model().eval(), images, labels, (4, 3), {})
    folded = Task("MobileNetV2 folded", fold_batchnorm(mobilenet_v2_imagenet().eval()), crops,
                  None, (4, 3), {})
    print("time is not measured here (0.0ms)\n" + HEADER + "\n" + "-" * len(HEADER))
    rows = [row for bits in (4, 3) for row in one_layer_at_a_time(fashion, bits)]
    rows += [row for task in (fashion, folded) for bits in (4, 3) for row in margins(task, bits)]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
