"""Benchmark: ``squant quantize`` on a synthetic multi-GB safetensors checkpoint.

Writes a checkpoint of random float32 conv/linear-shaped weights (and their biases) to a
temporary folder (deleted at the end), then runs ``python -m squant quantize IN OUT --bits 4``
as a child process, ``--runs`` times, and prints for each run:
- throughput: input bytes / wall time of the child, and the same without the child's start-up
  (interpreter, torch and numba imports, timed alone in a child that only imports squant.cli);
- peak RSS of the child (its VmHWM, polled) against the input file size;
each followed by the same run with ``--report``, and the median time with it against the median
without it; and, measured in this process, a baseline: the same checkpoint read with
``safe_open`` and quantized with per-channel numpy round-to-nearest (no packing, no writing).

The input file is in the page cache after being written (the machine has the memory), so the
figures measure squant, not the disk. Targets: >= 200 MB/s, peak RSS <= 0.5x the file, and
``--report`` costing at most 1.3x the run without it.

Run: ``python bench/bench_cli.py [--gigabytes 2] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from squant.io.file_format import TensorSpec
from squant.io.file_io import SafetensorsWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import numpy_rtn  # noqa: E402

# One "block" of layer shapes (about 67 MB of float32), repeated to reach the size asked for.
BLOCK = [(256, 256, 3, 3), (512, 256, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3), (256, 64, 1, 1),
         (1024, 1024), (4096, 1024), (1024, 4096), (1000, 2048), (128, 3, 7, 7)]
TARGET_MB_S, TARGET_RSS, TARGET_REPORT = 200.0, 0.5, 1.3


def checkpoint_specs(gigabytes: float) -> list[TensorSpec]:
    """Weights and biases of repeated blocks of layers, until the file holds ``gigabytes``."""
    specs, total, index = [], 0, 0
    while total < gigabytes * 1e9:
        for shape in BLOCK:
            specs.append(TensorSpec(f"layer{index}.weight", torch.float32, shape))
            specs.append(TensorSpec(f"layer{index}.bias", torch.float32, shape[:1]))
            total += 4 * (int(np.prod(shape)) + shape[0])
            index += 1
    return specs


def write_checkpoint(path: Path, specs: list[TensorSpec]) -> None:
    """Random float32 tensors, written one at a time (this process never holds them all)."""
    rng = np.random.default_rng(0)
    with SafetensorsWriter(path, specs) as writer:
        for spec in specs:
            data = rng.standard_normal(spec.shape, dtype=np.float32)
            writer.write(spec.name, torch.from_numpy(data))


def poll_peak_rss(pid: int, done: threading.Event, peak: list[int]) -> None:
    """Poll ``pid``'s VmHWM (its peak RSS since its exec) every 5 ms until ``done``, into
    ``peak[0]`` (bytes). Not ``wait4``'s ``ru_maxrss``: Linux carries the parent's peak across
    fork and exec into it."""
    while not done.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            peak[0] = max(peak[0], int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024)
        except (OSError, TypeError):  # gone, or a zombie without memory
            return
        time.sleep(0.005)


def run_child(command: list[str], cwd: str | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (bytes, polled) of one child process (run in ``cwd``); raises
    if it fails."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=cwd)
        done, peak = threading.Event(), [0]
        poller = threading.Thread(target=poll_peak_rss, args=(child.pid, done, peak))
        poller.start()
        _, status, _ = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        poller.join()
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed: {stderr.read().decode()}")
    return seconds, float(peak[0])


def numpy_baseline(path: Path, names: list[str]) -> float:
    """Seconds to read every tensor with ``safe_open`` and round its weights to nearest."""
    start = time.perf_counter()
    with safe_open(str(path), framework="numpy") as file:
        for name in names:
            tensor = file.get_tensor(name)
            if tensor.ndim >= 2:
                numpy_rtn([tensor])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.0, help="input size (default 2)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="squant-bench-") as folder:
        source, out = Path(folder) / "model.safetensors", Path(folder) / "q.safetensors"
        specs = checkpoint_specs(args.gigabytes)
        start = time.perf_counter()
        write_checkpoint(source, specs)
        size = source.stat().st_size
        print(f"input: {len(specs)} tensors, {size / 1e6:.0f} MB "
              f"(written in {time.perf_counter() - start:.1f} s)")
        startup, startup_rss = run_child([sys.executable, "-c", "import squant.cli"])
        print(f"child start-up alone: {startup:.2f} s, {startup_rss / 1e6:.0f} MB RSS")
        command = [sys.executable, "-m", "squant", "quantize", str(source), str(out), "--bits",
                   str(args.bits), "--quiet"]
        plain, report = [], []
        for run in range(1, args.runs + 1):  # runs with and without --report interleaved
            seconds, rss = run_child(command)
            plain.append(seconds)
            rate = size / 1e6 / seconds
            print(f"run {run}: {seconds:.2f} s, {rate:.0f} MB/s "
                  f"({size / 1e6 / (seconds - startup):.0f} MB/s without start-up), "
                  f"peak RSS {rss / 1e6:.0f} MB = {rss / size:.2f}x the input; "
                  f"output {out.stat().st_size / size:.3f}x the input  "
                  f"[targets: >= {TARGET_MB_S:.0f} MB/s {'ok' if rate >= TARGET_MB_S else 'MISSED'}"
                  f", <= {TARGET_RSS}x {'ok' if rss <= TARGET_RSS * size else 'MISSED'}]")
            report.append(run_child([*command, "--report", str(Path(folder) / "r.json")])[0])
            print(f"run {run} with --report: {report[-1]:.2f} s")
        ratio = statistics.median(report) / statistics.median(plain)
        print(f"with --report: {statistics.median(report):.2f} s (median of {args.runs}) = "
              f"{ratio:.2f}x the run without it ({statistics.median(plain):.2f} s)  [target: <= "
              f"{TARGET_REPORT}x {'ok' if ratio <= TARGET_REPORT else 'MISSED'}]; median of "
              f"the {args.runs} paired ratios: "
              f"{statistics.median(r / p for r, p in zip(report, plain)):.2f}x")
        baseline = numpy_baseline(source, [spec.name for spec in specs])
        print(f"numpy round-to-nearest baseline (this process, read + round, no packing or "
              f"writing): {size / 1e6 / baseline:.0f} MB/s")


if __name__ == "__main__":
    main()
