"""Issue 16's evidence table: every checkpoint layout and hostile file, through the real CLI.

In a temporary folder (deleted at the end) this builds each input the issue lists (sharded
checkpoints with and without an index, ``.bin`` shards, trainers' checkpoints, a GPT's tied
head, embedding tables, user metadata, float8, reserved and invalid tensor names, nested JSON,
corrupt scales and zero points, a 2 MB zip bomb declaring 2 GB and one whose record understates
its size, a pickle that would run code),
runs ``python -m squant ...`` on it in a child process as a user would (each case in its own
folder, as the child's working directory), and checks what the user gets: the exit code, one
line on stderr, whether the output exists, that no temporary file is left, and for accepted
inputs what ``squant.load`` gives back (against ``squant.quantize_weight`` of the same tensors,
in this process). Unlucky runs too: a full disk (``RLIMIT_FSIZE`` set in the child, whose
writes then fail with EFBIG as they would with ENOSPC), SIGTERM, SIGHUP and SIGINT sent once the
output's temporary file appears (a 256 MB float tensor copied through makes the write last),
and ``--report`` paths that exist or cannot be written.

Prints a markdown table (case | command | exit code | stderr's first line | what is checked |
ok/FAIL) and the zip bomb child's peak RSS (its VmHWM, polled: see ``_peak_rss``). Cases
run 4 at a time (each child mostly waits on its imports). Exits 1 if a row fails.

Run: ``python bench/bench_cli_files.py`` (3-5 minutes on 2 cores shared with other jobs: most
of it is 37 children importing torch).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from cli_files_cases import (  # noqa: E402
    Case,
    bad_name,
    corrupt,
    embeddings,
    float8,
    full_disk,
    lying_zip_bomb,
    nested_index,
    nested_json,
    pickle_with_code,
    report_exists,
    report_unwritable,
    sharded,
    stopped,
    tied,
    trainer,
    user_metadata,
    zip_bomb,
)
from cli_files_inputs import quantize_here, small_state  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

WORKERS = 4  # cases at a time: each child mostly waits on its imports


# ---------------------------------------------------------------------------------------------
# The table.


def cases(base: Path, wide: Path, big: Path, results: dict) -> list[tuple]:
    """(row name, function, arguments after the case) for every row, in the issue's order."""
    lightning = {"state_dict": small_state(), "epoch": 3, "global_step": 10,
                 "optimizer_states": [{"lr": 0.1}]}
    nan, inf = float("nan"), float("inf")
    return [
        ("sharded safetensors + index", sharded, "safetensors", True),
        ("folder of safetensors shards, no index", sharded, "safetensors", False),
        ("pytorch_model.bin.index.json + .bin shards", sharded, "bin", True),
        ("folder of .bin shards, no index", sharded, "bin", False),
        ("Lightning .ckpt", trainer, "model.ckpt", "state_dict", lightning),
        ('.pt holding {"model": ...}', trainer, "trainer.pt", "model",
         {"model": small_state(), "epoch": 7}),
        ("GPT-like .bin, lm_head tied to wte", tied),
        ("nn.Embedding tables", embeddings),
        ("safetensors with user __metadata__", user_metadata),
        ("float8 E4M3", float8, torch.float8_e4m3fn),
        ("float8 E5M2", float8, torch.float8_e5m2),
        (".pt with a tensor named __metadata__", bad_name, "__metadata__",
         "a tensor is named '__metadata__'"),
        ("tensor name with a lone surrogate", bad_name, "fc\udc80.weight",
         "tensor name 'fc\\udc80.weight' is not valid UTF-8"),
        ("squant file, deeply nested JSON metadata", nested_json, base),
        ("index.json, deeply nested JSON", nested_index),
        *[(f"squant file, {part} {value}", corrupt, base, part, value)
          for part, value in [("scale", 0.0), ("scale", -1.0), ("scale", nan), ("scale", inf),
                              ("zero_point", nan), ("zero_point", -inf)]],
        ("zip bomb .pt (2 MB, declares 2 GB)", zip_bomb, results),
        ("zip bomb whose record understates its size", lying_zip_bomb),
        (".pt pickle that would run code", pickle_with_code, results),
        ("dequantize to .pt, full disk", full_disk, wide, "dequantize", "f.pt"),
        ("dequantize to .safetensors, full disk", full_disk, wide, "dequantize",
         "f.safetensors"),
        ("quantize, full disk", full_disk, wide, "quantize", "out.safetensors"),
        *[(f"{signum.name} while writing", stopped, big, signum)
          for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)],
        ("--report r.json, r.json exists", report_exists),
        ("--report path is a folder", report_unwritable, "r.json",
         "r.json: is a folder; choose a file path for the report"),
        ("--report in a folder it cannot write (/sys)", report_unwritable,
         "/sys/squant-r.json", "Permission denied: '/sys/squant-r.json'"),
    ]


def _cell(text: str, width: int = 72) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= width else text[:width - 1] + "…"
    return text.replace("|", "\\|") or "-"


def row(case: Case) -> str:
    command = "; ".join("squant " + " ".join(run.argv) for run in case.runs)
    codes = ", ".join(str(run.code) for run in case.runs)
    stderr = next((run.stderr.splitlines()[0] for run in case.runs if run.stderr.strip()), "")
    checks = "; ".join(what if ok else f"**{what}: FAIL**" for what, ok in case.checks)
    return (f"| {_cell(case.name)} | `{_cell(command, 90)}` | {codes} | {_cell(stderr)} | "
            f"{checks} | {'ok' if case.ok else 'FAIL'} |")


def run_case(root: Path, number: int, spec: tuple) -> Case:
    name, function, *arguments = spec
    case = Case(name, root / f"case{number:02d}")
    try:
        function(case, *arguments)
    except Exception as error:  # the row fails, saying why; the others still run
        case.checks.append((f"the case raised {type(error).__name__}: {error}", False))
    return case


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="squant-cli-files-") as folder:
        root = Path(folder)
        save_file(small_state(), str(root / "model.safetensors"))
        base = quantize_here(root / "model.safetensors", root / "base.safetensors")
        big = root / "big.safetensors"  # a 256 MB buffer copied through: a write that lasts
        save_file({**small_state(), "buffer": torch.zeros(64 << 20)}, str(big))
        results: dict = {}
        save_file({**small_state(), "wide.weight": torch.randn(256, 256)},
                  str(root / "wide.safetensors"))
        wide = quantize_here(root / "wide.safetensors", root / "wide-q.safetensors")
        specs = cases(base, wide, big, results)
        with ThreadPoolExecutor(WORKERS) as pool:
            done = list(pool.map(run_case, [root] * len(specs), range(1, len(specs) + 1), specs))
        print("| case | command (`python -m squant ...`, in the case's folder) | exit | "
              "stderr, first line | what is checked | result |")
        print("| --- | --- | --- | --- | --- | --- |")
        for case in done:
            print(row(case))
        failed = [case.name for case in done if not case.ok]
        print(f"\n{len(done) - len(failed)} of {len(done)} rows ok"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        if "bomb" in results:
            size, declared, rss = results["bomb"]
            print(f"zip bomb: a {size / 1e6:.1f} MB .pt whose entries declare "
                  f"{declared / 1e9:.2f} GB; the refusing child's peak RSS {rss / 1e6:.0f} MB "
                  f"(the child refusing the small pickle: {results.get('pickle', 0) / 1e6:.0f} MB)")
        print(f"{time.perf_counter() - start:.0f} s in all, cases {WORKERS} at a time, "
              f"{os.cpu_count()} cores, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
