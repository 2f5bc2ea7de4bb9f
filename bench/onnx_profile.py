"""Where onnxruntime spends a conv net's time, float against squant's W4A8 file: its own
profiler's kernel times summed by op and by conv kind, per run, and their ratios; then the wall
time of ``session.run`` without the profiler (median, 3 interleaved rounds).

Conv kinds, from the weight's shape ``(O, I / group, kh, kw)``: ``pointwise`` (1x1, one group),
``depthwise`` (one input channel per group), ``grouped`` (several groups of several channels),
``dense kxk`` (one group, a larger kernel: the first conv of these nets, on 1-3 input
channels). Models: ``mobilenet_v2`` (needs its weights and photos, ``bench/mobilenet_v2.py``)
and ``demo`` (squant's demo CNN on its bundled Fashion-MNIST images).

Needs the ``onnx`` extra. Run:
``python bench/onnx_profile.py [--model mobilenet_v2] [--batch 8] [--threads 1] [--runs 10]``.
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

import squant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import export_float_onnx, tasks  # noqa: E402

KINDS = ("pointwise", "depthwise", "grouped", "dense kxk", "rest")


def conv_kind(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> str:
    """The kind of a (QLinear)Conv node by its weight's shape (``shapes``: initializer dims);
    ``rest`` for any other op."""
    if "Conv" not in node.op_type:
        return "rest"
    weight = shapes[node.input[3] if node.op_type == "QLinearConv" else node.input[1]]
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if group > 1:
        return "depthwise" if weight[1] == 1 else "grouped"
    return "pointwise" if weight[2:] == [1, 1] else "dense kxk"


def wall_ms(path: Path, feed: np.ndarray, threads: int, runs: int) -> float:
    """Median wall milliseconds of ``session.run`` without the profiler (after one run)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: feed}
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def profile(path: Path, feed: np.ndarray, threads: int, runs: int
            ) -> dict[tuple[str, str], float]:
    """Milliseconds per run of each (op, conv kind) in the session's optimized graph."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder, "optimized.onnx"))
        options.profile_file_prefix = str(Path(folder, "profile"))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
        shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
        kinds = {node.name: conv_kind(node, shapes) for node in graph.node}
        feed = {session.get_inputs()[0].name: feed}
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"][: -len("_kernel_time")]
            totals[event["args"]["op_name"], kinds.get(node, "rest")] += event["dur"]
    return {key: micros / runs / 1e3 for key, micros in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mobilenet_v2", "demo"), default="mobilenet_v2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    found = tasks([args.model])
    if not found:
        sys.exit(f"{args.model}: its weights or photos are missing (see above)")
    task = found[0]
    feed = task.inputs[: args.batch].numpy()
    example = task.inputs[:2]
    with tempfile.TemporaryDirectory() as folder:
        float_path = export_float_onnx(task.model, example, Path(folder, "float.onnx"))
        quantized_path = Path(folder, "w4a8.onnx")
        qmodel = squant.quantize(task.model, bits=4, act_bits=8,
                                 input_shape=tuple(task.inputs.shape[1:]))
        squant.export_onnx(qmodel, quantized_path, example, input_range=task.input_range)
        paths = {"float": float_path, "W4A8": quantized_path}
        timed = {label: profile(path, feed, args.threads, args.runs)
                 for label, path in paths.items()}
        walls = {label: [] for label in paths}
        for _ in range(3):  # interleaved rounds
            for label, path in paths.items():
                walls[label].append(wall_ms(path, feed, args.threads, args.runs))
        wall = {label: statistics.median(values) for label, values in walls.items()}
    print(f"{task.name}, batch {args.batch}, {args.threads} thread(s), {args.runs} runs: "
          "onnxruntime's kernel time per run")
    by_kind = {label: collections.Counter() for label in timed}
    for label, times in timed.items():
        for (op, kind), ms in sorted(times.items(), key=lambda item: -item[1]):
            print(f"  {label:6} {op:18} {kind:10} {ms:8.3f} ms")
            by_kind[label][kind] += ms
    for kind in KINDS:
        if by_kind["float"][kind] or by_kind["W4A8"][kind]:
            print(f"{kind:10} float {by_kind['float'][kind]:7.3f} ms  W4A8 "
                  f"{by_kind['W4A8'][kind]:7.3f} ms  ratio "
                  f"{by_kind['W4A8'][kind] / max(by_kind['float'][kind], 1e-9):.2f}x")
    total = {label: sum(counter.values()) for label, counter in by_kind.items()}
    print(f"all        float {total['float']:7.3f} ms  W4A8 {total['W4A8']:7.3f} ms  ratio "
          f"{total['W4A8'] / total['float']:.2f}x")
    print(f"wall       float {wall['float']:7.3f} ms  W4A8 {wall['W4A8']:7.3f} ms  ratio "
          f"{wall['W4A8'] / wall['float']:.2f}x  (session.run without the profiler, median)")
    # A file running each kind on the faster of its two kernels, switching between them for
    # free (each switch costs a (De)QuantizeLinear and a layout change): what no file beats.
    bound = sum(min(by_kind["float"][kind], by_kind["W4A8"][kind]) for kind in KINDS)
    print(f"lower bound {bound:6.3f} ms  ratio {bound / total['float']:.2f}x  (each kind on its "
          "faster kernels, switching for free)")


if __name__ == "__main__":
    main()
