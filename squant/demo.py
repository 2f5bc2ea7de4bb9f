"""``squant demo``: the bundled Fashion-MNIST CNN quantized by round-to-nearest and by SQuant.

Needs no download: the model's weights and 2,000 real test images ship with the package. Every
method is run at 8, 6, 4, 3 and 2 bits, then SQuant KC with activations also quantized (W8A8,
W4A8), and evaluated on those images; one table shows accuracy, weight error and quantization
time.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .demo_model import load_demo_data, load_demo_model
from .model import quantize

BITS = (8, 6, 4, 3, 2)
METHODS = ("RTN", "E", "K", "C", "KC")
# (weight bits, activation bits) of the rows with activations quantized too (weights by KC).
WEIGHT_ACT_BITS = ((8, 8), (4, 8))
INPUT_SHAPE = (1, 28, 28)
_LAYERS = (nn.Conv2d, nn.Linear)
_EVAL_BATCH = 1000  # images per forward: larger batches run faster, up to ~100 MB activations


@dataclass(frozen=True)
class DemoRow:
    """One quantized version of the model and how it does."""

    bits: int
    method: str
    accuracy: float
    weight_error: float
    seconds: float
    act_bits: int | None = None

    @property
    def label(self) -> str:
        """``"8"`` for weights only, ``"W8A8"`` with activations quantized too."""
        return str(self.bits) if self.act_bits is None else f"W{self.bits}A{self.act_bits}"


def round_to_nearest(model: nn.Module, bits: int) -> nn.Module:
    """A float copy of ``model`` whose conv/linear weights are rounded to nearest on the
    per-channel asymmetric grid: the plain baseline, written independently of the kernels."""
    n = 2 ** (bits - 1)
    rounded = copy.deepcopy(model)
    for module in rounded.modules():
        if isinstance(module, _LAYERS):
            w = module.weight.detach()
            flat = w.reshape(w.shape[0], -1)
            lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
            scale = (2**bits - 1) / torch.clamp(hi - lo, min=1e-8)
            zero = torch.round(scale * lo) + n
            codes = torch.clamp(torch.round(scale * flat - zero), -n, n - 1)
            module.weight.data = ((codes + zero) / scale).reshape(w.shape)
    return rounded


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on the images, in [0, 1] (channels-last: faster on CPU)."""
    model = model.eval().to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), _EVAL_BATCH):
            logits = model(images[start : start + _EVAL_BATCH])
            correct += int((logits.argmax(dim=1) == labels[start : start + _EVAL_BATCH]).sum())
    return correct / len(images)


def weight_error(reference: nn.Module, candidate: nn.Module) -> float:
    """Relative L2 error ``||W - W_hat|| / ||W||`` over all conv/linear weights."""
    ref = {n: m.weight.detach() for n, m in reference.named_modules() if isinstance(m, _LAYERS)}
    num = den = 0.0
    for name, module in candidate.named_modules():
        if name in ref:
            num += float(((module.weight.detach() - ref[name]) ** 2).sum())
            den += float((ref[name] ** 2).sum())
    return (num / den) ** 0.5


def _timed(build: Callable[[], nn.Module]) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    model = build()
    return model, time.perf_counter() - start


def run_demo(bits: tuple[int, ...] = BITS, methods: tuple[str, ...] = METHODS,
             weight_act_bits: tuple[tuple[int, int], ...] = WEIGHT_ACT_BITS
             ) -> tuple[float, list[DemoRow]]:
    """FP32 accuracy and one :class:`DemoRow` per (bits, method), then one per (weight bits,
    activation bits) with SQuant KC weights and data-free activation ranges (the paper's rule,
    timed with the calibration)."""
    model = load_demo_model()
    images, labels = load_demo_data()
    quantize(model, 4)  # load the compiled kernels once, so that the times below are warm
    rows = []
    for b in bits:
        for method in methods:
            if method == "RTN":
                quantized, seconds = _timed(lambda b=b: round_to_nearest(model, b))
            else:
                quantized, seconds = _timed(lambda b=b, m=method: quantize(model, b, m))
            rows.append(DemoRow(b, method, accuracy(quantized, images, labels),
                                weight_error(model, quantized), seconds))
    for w, a in weight_act_bits:
        quantized, seconds = _timed(lambda w=w, a=a: quantize(
            model, w, "KC", act_bits=a, input_shape=INPUT_SHAPE))
        rows.append(DemoRow(w, "KC", accuracy(quantized, images, labels),
                            weight_error(model, quantized), seconds, act_bits=a))
    return accuracy(model, images, labels), rows


def format_table(fp32_accuracy: float, rows: list[DemoRow], images: int) -> str:
    """The demo's table: one line per bits and method."""
    lines = [f"Fashion-MNIST CNN, {images} test images, FP32 accuracy {fp32_accuracy:.2%}",
             "RTN = round to nearest (plain torch); E, K, C, KC = SQuant modes (KC = the paper)",
             "WxAy = KC weights at x bits, activations at y bits (data-free ranges by the paper's",
             "       rule; first layer's input float, last layer's 8 bits); others: weights only",
             "weight err = ||W - Q|| / ||W|| over all layers; time = quantizing the whole model",
             "",
             f"{'bits':>4}  {'method':<6} {'accuracy':>9} {'weight err':>11} {'time':>9}",
             "-" * 44]
    for row in rows:
        lines.append(f"{row.label:>4}  {row.method:<6} {row.accuracy:>9.2%} "
                     f"{row.weight_error:>11.4f} {row.seconds * 1e3:>7.1f}ms")
    return "\n".join(lines)


def main() -> None:
    """Run the demo and print its table."""
    fp32, rows = run_demo()
    print(format_table(fp32, rows, len(load_demo_data()[1])))
