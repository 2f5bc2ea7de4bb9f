"""Benchmark: ``squant.export_onnx`` files run by onnxruntime, against the float ONNX model.

For the demo CNN (its 2,000 bundled Fashion-MNIST test images), a Linear-heavy net (4
transformer MLP blocks on 64 tokens and a classifier, random weights and Gaussian inputs), a
ResNet-18-shaped net (random weights, BatchNorms unfolded: the exporter folds them) and
MobileNetV2 with its real ImageNet weights (BatchNorms unfolded), the last two on the real photo
crops of bench/accuracy.py, at W8A8 (symmetric grid; and the default asymmetric one with
``include_zero=True``, whose non-zero weight zero points onnxruntime runs on a slow path), W4A8
and W4 weight-only (all squant KC, data-free activation ranges), it prints (symmetric W8A8
twice: with squant's session options, exact, and in a plain session):
- file size against the float ONNX file (torch.onnx.export's), and against that file without
  the exporter's debugging metadata, which squant's files drop ("bare float");
- onnxruntime latency against the float ONNX model at batch 1 and 8, with 1 and 2 threads:
  sessions interleaved in one process, each timed for >= 0.2 s per round, median over rounds;
- session memory: RSS growth of a fresh process (its imports done) creating the session and
  running one sample;
- top-1 agreement with the FP32 model, with the PyTorch quantized model (also over the inputs
  that are not near-ties of it: top-2 logits closer than 1% of their standard deviation, which
  float summation order alone may flip), and with the PyTorch
  model of the file (``export_onnx(faithful=True)``: the quantized model plus the first layer's
  input, layer outputs and residual adds quantized as the file does, and onnxruntime's fused
  integer kernels computed as it computes them), the largest difference of onnxruntime's
  outputs from that model's (0: the same bits), and accuracy on labelled data; the ops
  histogram of onnxruntime's optimized graph.
"W8A8 calibrated" ranges activations from the first 16 inputs (``act_range="percentile"``, and
``export_onnx(calibration_data=...)`` for the tensors squant does not range); every row is
evaluated on the other inputs. The first layer's input grid (``input_range``) is the range of
the preprocessing (normalized pixels in [0, 1]; the MLP: the example inputs' min and max).

Run: ``python bench/bench_onnx.py [--rounds 7] [--models demo,resnet18,mobilenet_v2]``.
Needs ``pip install -e ".[onnx,bench]"`` and, for MobileNetV2 and the photos, what
``bench/accuracy.py`` needs (it says what is missing).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see PERFORMANCE_NOTES.md

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import squant
from squant.demo_model import PIXEL_MEAN, PIXEL_STD, load_demo_data, load_demo_model
from squant.export.graph import drop_exporter_debug_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    missing_requirements,
    photo_crops,
)
from mobilenet_v2 import mobilenet_v2_imagenet  # noqa: E402
from resnet import resnet18  # noqa: E402

CONFIGS = {"W8A8": {"bits": 8, "act_bits": 8, "scheme": "symmetric"},
           "W8A8 asymmetric": {"bits": 8, "act_bits": 8, "include_zero": True},
           "W8A8 calibrated": {"bits": 8, "act_bits": 8, "scheme": "symmetric",
                               "act_range": "percentile"},
           "W4A8": {"bits": 4, "act_bits": 8}, "W4": {"bits": 4}}
CALIBRATION_IMAGES = 16  # the first inputs, kept apart from the evaluation inputs
# The same W8A8 file in a plain session (without the x64quantprecision option squant's
# session options set for 8-bit codes): faster on x86 without VNNI, not exact (saturation).
PLAIN_SESSION = "W8A8 plain session"
BATCHES = (1, 8)
THREADS = (1, 2)
# ImageNet-normalized pixels in [0, 1]: the first layer's input range, from the preprocessing
IMAGENET_RANGE = (min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)),
                  max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)))
RESULTS = Path(__file__).resolve().parent / "results" / "onnx.json"
# An input whose top-2 logits of the PyTorch quantized model lie closer than this share of its
# logits' standard deviation is a near-tie: float summation order alone may flip its top-1.
NEAR_TIE = 0.01


@dataclass
class Task:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    labels: torch.Tensor | None
    # export_onnx's input_range (the first layer's input grid): the preprocessing's range
    input_range: tuple[float, float] | str = "auto"


@dataclass
class Row:
    model: str
    config: str
    file_ratio: float  # against the float file torch.onnx.export writes
    file_ratio_bare: float  # against that file without torch's debugging metadata
    latency: dict[str, float]  # "b1/t1": time ratio to float ONNX
    memory_ratio: float
    agree_fp32: float
    agree_torch: float
    agree_torch_clear: float  # over the inputs that are not near-ties (NEAR_TIE)
    near_ties: float  # their share of the inputs
    agree_faithful: float  # with squant.export_faithful's PyTorch model of the file
    faithful_max_diff: float  # max |onnxruntime - faithful model| over the outputs
    accuracy: float | None
    export_s: float
    integer_layers: str
    ops: dict[str, int] = field(default_factory=dict)


class TransformerMLP(nn.Module):
    """A Linear-heavy net: 4 transformer MLP blocks (LayerNorm, 768 -> 3072, GELU, 3072 -> 768,
    residual) on 64 tokens, mean-pooled into a 1000-way Linear classifier."""

    def __init__(self, dim: int = 768, blocks: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                          nn.Linear(4 * dim, dim)) for _ in range(blocks))
        self.head = nn.Linear(dim, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(1))


def tasks(names: list[str]) -> list[Task]:
    built = []
    if "mlp" in names:
        torch.manual_seed(0)
        built.append(Task("transformer MLP", TransformerMLP().eval(),
                          torch.randn(56, 64, 768), None))
    if "demo" in names:
        images, labels = load_demo_data()
        built.append(Task("demo CNN", load_demo_model().eval(), images, labels,
                          ((0 - PIXEL_MEAN) / PIXEL_STD, (1 - PIXEL_MEAN) / PIXEL_STD)))
    photos_missing = missing_requirements()
    if photos_missing and {"resnet18", "mobilenet_v2"} & set(names):
        print("skipping the ImageNet-sized models:", *photos_missing, sep="\n  ")
        return built
    crops = photo_crops() if {"resnet18", "mobilenet_v2"} & set(names) else None
    if "resnet18" in names:
        torch.manual_seed(0)
        built.append(Task("ResNet-18-shaped", resnet18().eval(), crops, None, IMAGENET_RANGE))
    if "mobilenet_v2" in names:
        built.append(Task("MobileNetV2", mobilenet_v2_imagenet(), crops, None, IMAGENET_RANGE))
    return built


def session(path: Path, threads: int, plain: bool = False) -> ort.InferenceSession:
    options = (squant.onnx_session_options(path, threads=threads)
               if "squant" in path.name and not plain else ort.SessionOptions())
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs(path: Path, inputs: torch.Tensor, batch: int = 50, plain: bool = False
            ) -> np.ndarray:
    runner = session(path, 2, plain)
    name = runner.get_inputs()[0].name
    return np.concatenate([runner.run(None, {name: inputs[i:i + batch].numpy()})[0]
                           for i in range(0, len(inputs), batch)])


def latencies(paths: dict[str, Path], sample: torch.Tensor, rounds: int) -> dict[str, dict]:
    """``{file: {"b1/t1": median seconds per call, ...}}``, all files interleaved per round."""
    times: dict[str, dict[str, list[float]]] = {key: {} for key in paths}
    for threads in THREADS:
        sessions = {key: session(path, threads, key == PLAIN_SESSION)
                    for key, path in paths.items()}
        for batch in BATCHES:
            feed = sample[:batch].numpy()
            label = f"b{batch}/t{threads}"
            for runner in sessions.values():  # warm-up
                runner.run(None, {runner.get_inputs()[0].name: feed})
            for _ in range(rounds):
                for key, runner in sessions.items():
                    name = runner.get_inputs()[0].name
                    calls, start = 0, time.perf_counter()
                    while (elapsed := time.perf_counter() - start) < 0.2 or calls < 2:
                        runner.run(None, {name: feed})
                        calls += 1
                    times[key].setdefault(label, []).append(elapsed / calls)
    return {key: {label: statistics.median(v) for label, v in per.items()}
            for key, per in times.items()}


_RSS_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
import squant
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) * 1024
before = rss()  # after the imports: the session's own memory
plain = sys.argv[2] == "plain"
options = squant.onnx_session_options(sys.argv[1], threads=1) if "squant" in sys.argv[1] \\
    and not plain else ort.SessionOptions()
s = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
shape = [1] + [int(d) for d in sys.argv[3:]]
s.run(None, {s.get_inputs()[0].name: np.random.rand(*shape).astype(np.float32)})
print(rss() - before)
"""


def session_memory(path: Path, shape: tuple[int, ...], plain: bool = False) -> int:
    """RSS growth (bytes) of a fresh process that creates the session and runs one sample."""
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path),
                           "plain" if plain else "squant", *map(str, shape)],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def export_float_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The float model as ``torch.onnx.export`` writes it (dynamic batch) at ``path``, and beside
    it the same file without the exporter's debugging metadata, which squant's files drop
    ("bare float"): returns the bare file's path."""
    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                      verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    bare = onnx.load(str(path))
    drop_exporter_debug_info(bare)
    onnx.save(bare, str(path.with_suffix(".bare.onnx")))
    return path.with_suffix(".bare.onnx")


def agreement_without_near_ties(reference: torch.Tensor, top1: torch.Tensor
                                ) -> tuple[float, float]:
    """Top-1 agreement of ``top1`` with the logits ``reference`` over the inputs whose top-2
    margin is at least ``NEAR_TIE`` times their logits' standard deviation, and the share of
    the other inputs (near-ties)."""
    best = reference.topk(2, dim=1).values
    clear = (best[:, 0] - best[:, 1]) >= NEAR_TIE * reference.std(dim=1)
    agree = (top1[clear] == reference.argmax(1)[clear]).float().mean()
    return float(agree), 1.0 - float(clear.float().mean())


def run_task(task: Task, folder: Path, rounds: int) -> list[Row]:
    calibration = list(task.inputs[:CALIBRATION_IMAGES].split(8))
    labels = None if task.labels is None else task.labels[CALIBRATION_IMAGES:]
    task = replace(task, inputs=task.inputs[CALIBRATION_IMAGES:], labels=labels)
    example = task.inputs[:2]
    shape = tuple(task.inputs.shape[1:])
    float_path = folder / f"{task.name}-float.onnx".replace(" ", "_")
    bare_bytes = export_float_onnx(task.model, example, float_path).stat().st_size
    with torch.no_grad():
        fp32 = torch.cat([task.model(task.inputs[i:i + 50])
                          for i in range(0, len(task.inputs), 50)]).argmax(1)
    paths, rows = {"float": float_path}, {}
    for config, options in CONFIGS.items():
        data = {"calibration_data": calibration} if "act_range" in options else {}
        extra = {"input_shape": shape} if "act_bits" in options and not data else data
        qmodel = squant.quantize(task.model, **options, **extra)
        path = folder / f"{task.name}-{config}-squant.onnx".replace(" ", "_")
        start = time.perf_counter()
        grid = {"input_range": task.input_range} if "act_bits" in options else {}
        report = squant.export_onnx(qmodel, path, example, **data, **grid, faithful=True)
        export_s = time.perf_counter() - start
        faithful = report.faithful_model
        with torch.no_grad():
            torch_out = torch.cat([qmodel(task.inputs[i:i + 50])
                                   for i in range(0, len(task.inputs), 50)])
            torch_top1 = torch_out.argmax(1)
            faithful_out = torch.cat([faithful(task.inputs[i:i + 50])
                                      for i in range(0, len(task.inputs), 50)])
        faithful_top1 = faithful_out.argmax(1)
        onnx_out = torch.from_numpy(outputs(path, task.inputs))
        onnx_top1 = onnx_out.argmax(1)
        accuracy = (None if task.labels is None
                    else float((onnx_top1 == task.labels).float().mean()))
        rows[config] = Row(
            task.name, config, path.stat().st_size / float_path.stat().st_size,
            path.stat().st_size / bare_bytes, {},
            session_memory(path, shape) / session_memory(float_path, shape),
            float((onnx_top1 == fp32).float().mean()),
            float((onnx_top1 == torch_top1).float().mean()),
            *agreement_without_near_ties(torch_out, onnx_top1),
            float((onnx_top1 == faithful_top1).float().mean()),
            float((onnx_out - faithful_out).abs().max()), accuracy, export_s,
            f"{report.integer_layers}/{len(report.layers)}", dict(report.optimized_ops))
        paths[config] = path
        if config == "W8A8":
            plain_out = torch.from_numpy(outputs(path, task.inputs, plain=True))
            plain_top1 = plain_out.argmax(1)
            rows[PLAIN_SESSION] = replace(
                rows[config], config=PLAIN_SESSION,
                memory_ratio=session_memory(path, shape, plain=True) / session_memory(
                    float_path, shape),
                agree_fp32=float((plain_top1 == fp32).float().mean()),
                agree_torch=float((plain_top1 == torch_top1).float().mean()),
                **dict(zip(("agree_torch_clear", "near_ties"),
                           agreement_without_near_ties(torch_out, plain_top1))),
                agree_faithful=float((plain_top1 == faithful_top1).float().mean()),
                faithful_max_diff=float((plain_out - faithful_out).abs().max()),
                accuracy=(None if task.labels is None
                          else float((plain_top1 == task.labels).float().mean())))
            paths[PLAIN_SESSION] = path
    timed = latencies(paths, task.inputs, rounds)
    for config, row in rows.items():
        row.latency = {label: timed[config][label] / timed["float"][label]
                       for label in timed["float"]}
    print(f"  {task.name}: float ONNX "
          + ", ".join(f"{label} {seconds * 1e3:.1f} ms" for label, seconds in
                      timed["float"].items()))
    return list(rows.values())


def table(rows: list[Row]) -> str:
    labels = [f"b{b}/t{t}" for t in THREADS for b in BATCHES]
    head = ("| model | config | file | file vs bare float | "
            + " | ".join(f"latency {lb}" for lb in labels)
            + " | memory | agree FP32 | agree torch | agree torch w/o near-ties (their share)"
            " | agree faithful | max diff faithful"
            " | accuracy | integer layers"
            " | export |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        accuracy = "—" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        lines.append(
            f"| {r.model} | {r.config} | {r.file_ratio:.3f}x | {r.file_ratio_bare:.3f}x | "
            + " | ".join(f"{r.latency[lb]:.2f}x" for lb in labels)
            + f" | {r.memory_ratio:.2f}x | {100 * r.agree_fp32:.1f}% | "
            f"{100 * r.agree_torch:.1f}% | "
            f"{100 * r.agree_torch_clear:.1f}% ({100 * r.near_ties:.1f}%) | "
            f"{100 * r.agree_faithful:.1f}% | "
            f"{r.faithful_max_diff:.2g} | {accuracy} | "
            f"{r.integer_layers} | {r.export_s:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default="demo,mlp,resnet18,mobilenet_v2")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores; latency ratios to the float ONNX model")
    with tempfile.TemporaryDirectory() as folder:
        for task in tasks(args.models.split(",")):
            rows += run_task(task, Path(folder), args.rounds)
    print(table(rows))
    for row in rows:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(row.ops.items()))
        print(f"  {row.model} {row.config}: {ops}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
