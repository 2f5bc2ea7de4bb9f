"""Where onnxruntime spends MobileNetV2's time, float against squant's W4A8 file: its own
profiler's kernel times summed by op and by conv kind (depthwise: ``group > 1``; pointwise:
1x1; other: the first 3x3 conv), per run, and their ratios; then the wall time of
``session.run`` without the profiler (median, 3 interleaved rounds).

Needs the ``onnx`` extra and MobileNetV2's weights (``bench/mobilenet_v2.py``). Run:
``python bench/onnx_profile.py [--batch 8] [--threads 1] [--runs 10]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import squant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import IMAGENET_RANGE, export_float_onnx  # noqa: E402
from mobilenet_v2 import mobilenet_v2_imagenet  # noqa: E402


def conv_kind(node: onnx.NodeProto) -> str:
    """``depthwise``, ``pointwise`` or ``other`` for a (Q)Conv node, ``-`` for any other op."""
    if "Conv" not in node.op_type:
        return "-"
    attributes = {a.name: a for a in node.attribute}
    if "group" in attributes and attributes["group"].i > 1:
        return "depthwise"
    if "kernel_shape" in attributes and list(attributes["kernel_shape"].ints) == [1, 1]:
        return "pointwise"
    return "other"


def wall_ms(path: Path, batch: int, threads: int, runs: int) -> float:
    """Median wall milliseconds of ``session.run`` without the profiler (after one run)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name:
            np.random.default_rng(0).random((batch, 3, 224, 224), np.float32)}
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def profile(path: Path, batch: int, threads: int, runs: int) -> dict[tuple[str, str], float]:
    """Milliseconds per run of each (op, conv kind) in the session's optimized graph."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder, "optimized.onnx"))
        options.profile_file_prefix = str(Path(folder, "profile"))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        kinds = {node.name: conv_kind(node)
                 for node in onnx.load(options.optimized_model_filepath).graph.node}
        feed = {session.get_inputs()[0].name:
                np.random.default_rng(0).random((batch, 3, 224, 224), np.float32)}
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"][: -len("_kernel_time")]
            totals[event["args"]["op_name"], kinds.get(node, "-")] += event["dur"]
    return {key: micros / runs / 1e3 for key, micros in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    model = mobilenet_v2_imagenet()
    example = torch.rand(2, 3, 224, 224)
    with tempfile.TemporaryDirectory() as folder:
        float_path = export_float_onnx(model, example, Path(folder, "float.onnx"))
        quantized_path = Path(folder, "w4a8.onnx")
        qmodel = squant.quantize(model, bits=4, act_bits=8, input_shape=(3, 224, 224))
        squant.export_onnx(qmodel, quantized_path, example, input_range=IMAGENET_RANGE)
        paths = {"float": float_path, "W4A8": quantized_path}
        timed = {label: profile(path, args.batch, args.threads, args.runs)
                 for label, path in paths.items()}
        walls = {label: [] for label in paths}
        for _ in range(3):  # interleaved rounds
            for label, path in paths.items():
                walls[label].append(wall_ms(path, args.batch, args.threads, args.runs))
        wall = {label: statistics.median(values) for label, values in walls.items()}
    print(f"MobileNetV2, batch {args.batch}, {args.threads} thread(s), {args.runs} runs: "
          "onnxruntime's kernel time per run")
    by_kind = {label: collections.Counter() for label in timed}
    for label, times in timed.items():
        for (op, kind), ms in sorted(times.items(), key=lambda item: -item[1]):
            print(f"  {label:6} {op:18} {kind:10} {ms:8.2f} ms")
            by_kind[label][kind if kind != "-" else "rest"] += ms
    for kind in ("pointwise", "depthwise", "other", "rest"):
        print(f"{kind:10} float {by_kind['float'][kind]:7.2f} ms  W4A8 "
              f"{by_kind['W4A8'][kind]:7.2f} ms  ratio "
              f"{by_kind['W4A8'][kind] / max(by_kind['float'][kind], 1e-9):.2f}x")
    total = {label: sum(counter.values()) for label, counter in by_kind.items()}
    print(f"all        float {total['float']:7.2f} ms  W4A8 {total['W4A8']:7.2f} ms  ratio "
          f"{total['W4A8'] / total['float']:.2f}x")
    print(f"wall       float {wall['float']:7.2f} ms  W4A8 {wall['W4A8']:7.2f} ms  ratio "
          f"{wall['W4A8'] / wall['float']:.2f}x  (session.run without the profiler, median)")


if __name__ == "__main__":
    main()
