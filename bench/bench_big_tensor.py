"""Benchmark: peak memory of ``squant quantize`` on one tensor far larger than its 64 MB chunk.

Writes a safetensors file holding one 50,000 x 4,096 float32 tensor (819 MB, an LLM's
vocabulary-sized weight; and a 64 x 64 one) to a temporary folder (deleted at the end) and
prints the peak RSS (VmHWM, polled: ``bench_cli.run_child``) of child processes:
- baseline: a child that imports squant and reads the tensor alone with ``safe_open``;
- ``squant quantize`` of the tensor (``lm_head.weight``: quantized, 4 bits, in blocks of rows),
  and with ``--skip lm_head`` (copied as float, in blocks of rows).

``--tree PATH`` runs the children from another checkout of squant (``git archive main | tar -x
-C PATH``), to compare with it. Target: peak RSS <= 700 MB for the quantize runs.

Run: ``python bench/bench_big_tensor.py [--rows 50000] [--tree PATH]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from squant.io.file_format import TensorSpec
from squant.io.file_io import SafetensorsWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import run_child  # noqa: E402

COLUMNS, TARGET_MB = 4096, 700
NAME = "lm_head.weight"
RUNS = {"quantized": [], "skipped (copied)": ["--skip", "lm_head"]}
READ_ALONE = ("import sys, squant.cli; from safetensors import safe_open\n"
              "with safe_open(sys.argv[1], framework='pt') as f: f.get_tensor(sys.argv[2]).sum()")


def write_tensor(path: Path, name: str, rows: int) -> None:
    """Random float32 rows, written a block at a time (this process never holds them all)."""
    rng = np.random.default_rng(0)
    block = 4096
    specs = [TensorSpec(name, torch.float32, (rows, COLUMNS)),
             TensorSpec("fc.weight", torch.float32, (64, 64))]  # something to quantize
    with SafetensorsWriter(path, specs) as writer:
        writer.write("fc.weight", torch.randn(64, 64))
        for start in range(0, rows, block):
            data = rng.standard_normal((min(block, rows - start), COLUMNS), dtype=np.float32)
            writer.write(name, torch.from_numpy(data), start * COLUMNS * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows of 4096 float32")
    parser.add_argument("--tree", type=Path, help="run the children from this checkout")
    args = parser.parse_args()
    cwd = str(args.tree.resolve()) if args.tree else None
    with tempfile.TemporaryDirectory(prefix="squant-bench-") as folder:
        source, out = Path(folder) / "model.safetensors", Path(folder) / "q.safetensors"
        write_tensor(source, NAME, args.rows)
        size = source.stat().st_size
        _, alone = run_child([sys.executable, "-c", READ_ALONE, str(source), NAME], cwd)
        for run, options in RUNS.items():
            seconds, rss = run_child([sys.executable, "-m", "squant", "quantize", str(source),
                                      str(out), "--quiet", *options], cwd)
            print(f"{NAME} {run} ({size / 1e6:.0f} MB, {args.rows} x {COLUMNS}): read alone "
                  f"{alone / 1e6:.0f} MB peak RSS; squant quantize {rss / 1e6:.0f} MB peak RSS "
                  f"in {seconds:.1f} s, output {out.stat().st_size / 1e6:.0f} MB  [target: <= "
                  f"{TARGET_MB} MB {'ok' if rss <= TARGET_MB * 1e6 else 'MISSED'}]")
            out.unlink()


if __name__ == "__main__":
    main()
