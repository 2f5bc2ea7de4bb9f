"""The rows of ``bench_cli_files.py``: a child process running ``python -m squant`` (its exit
code, output and peak RSS), a case holding its runs and named checks, and one function per
case that builds its input, runs the CLI and checks what the user gets."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from bench_cli import poll_peak_rss
from cli_files_inputs import (
    GptLike,
    Payload,
    corrupt_copy,
    embedding_model,
    expected_state,
    small_state,
    understate_record,
    write_sharded,
    write_zip_bomb,
)
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import squant

TIMEOUT_S = 300
COMPILE_NOTICE = "squant: compiling the numba kernels"
FILE_SIZE_LIMIT = 4096  # bytes a "full disk" child may write to one file


class Run:
    """One finished child: exit code, stdout, stderr, peak RSS in bytes (polled)."""

    def __init__(self, argv: list[str], cwd: Path, limit_file_size: bool = False,
                 on_start=None) -> None:
        self.argv = argv
        preexec = None
        if limit_file_size:
            def preexec() -> None:  # Python ignores SIGXFSZ, so writes fail with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            child = subprocess.Popen([sys.executable, "-m", "squant", *argv], cwd=cwd,
                                     stdout=out, stderr=err, preexec_fn=preexec)
            timer, done, peak = threading.Timer(TIMEOUT_S, child.kill), threading.Event(), [0]
            poller = threading.Thread(target=poll_peak_rss, args=(child.pid, done, peak))
            timer.start()
            poller.start()
            self.note = on_start(child) if on_start else ""
            _, status, _ = os.wait4(child.pid, 0)
            done.set()
            poller.join()
            timer.cancel()
            child.returncode = self.code = os.waitstatus_to_exitcode(status)
            self.rss = peak[0]
            out.seek(0)
            err.seek(0)
            self.stdout, self.stderr = out.read().decode(), err.read().decode()


class Case:
    """A row: runs its commands (each a list of CLI arguments) and records named checks."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name, self.folder, self.runs, self.checks = name, folder, [], []
        folder.mkdir()

    def run(self, *argv: str, **options) -> Run:
        run = Run(list(argv), self.folder, **options)
        self.runs.append(run)
        return run

    def check(self, what: str, test) -> None:
        """Record ``what``, ok if ``test()`` is true (an exception is a failure, noted)."""
        try:
            ok, why = bool(test()), ""
        except Exception as error:  # a check that raises has failed: say why
            ok, why = False, f" ({type(error).__name__}: {str(error)[:60]})"
        self.checks.append((what + why, ok))

    # Common checks.
    def accepted(self, run: Run, out: str, quiet_stderr: bool = True) -> None:
        self.check("exit 0", lambda: run.code == 0)
        if quiet_stderr:  # the first run after install may say it compiles the kernels
            self.check("stderr empty", lambda: all(
                line.startswith(COMPILE_NOTICE) for line in run.stderr.splitlines()))
        self.check("output written", lambda: (self.folder / out).is_file())
        self.no_temporary()

    def refused(self, run: Run, out: str | None, message: str, code: int = 1) -> None:
        lines = run.stderr.splitlines()
        self.check(f"exit {code}", lambda: run.code == code)
        self.check(f"one stderr line with {message!r}, no temp file named",
                   lambda: len(lines) == 1 and message in lines[0] and ".tmp" not in lines[0])
        if out:
            self.check("no output", lambda: not (self.folder / out).exists())
        self.no_temporary()

    def no_temporary(self) -> None:
        self.check("no temp file", lambda: not list(self.folder.glob(".*.tmp")))

    def round_trip(self, out: str, state: dict[str, torch.Tensor]) -> None:
        self.check("squant.load == quantize_weight's", lambda: _same(
            squant.load(self.folder / out), expected_state(state)))

    def refused_by_load(self, path: str, message: str) -> None:
        def refuses() -> bool:
            try:
                squant.load(self.folder / path)
            except squant.QuantizationError as error:
                return message in str(error)
            return False
        self.check("squant.load refuses it", refuses)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(ok for _, ok in self.checks)


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return sorted(got) == sorted(want) and all(
        got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]) for n in want)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}


def _stored_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as file:
        return list(file.keys())


# ---------------------------------------------------------------------------------------------
# Layouts to accept.


def sharded(case: Case, kind: str, index: bool) -> None:
    source = write_sharded(case.folder / "hub", kind, index)
    run = case.run("quantize", str(source.relative_to(case.folder)), "q.safetensors")
    case.accepted(run, "q.safetensors")
    case.round_trip("q.safetensors", small_state())
    if kind == "safetensors":
        case.check("shards' metadata kept",
                   lambda: _metadata(case.folder / "q.safetensors").get("shard") == "2")


def trainer(case: Case, name: str, key: str, content: dict) -> None:
    torch.save(content, case.folder / name)
    run = case.run("quantize", name, "q.safetensors")
    case.accepted(run, "q.safetensors", quiet_stderr=False)
    case.check(f"stderr says key {key!r}", lambda: f"under key {key!r}" in run.stderr)
    case.round_trip("q.safetensors", small_state())


def tied(case: Case) -> None:
    torch.manual_seed(0)
    model = GptLike()
    torch.save(model.state_dict(), case.folder / "gpt.bin")
    run = case.run("quantize", "gpt.bin", "q.safetensors")
    case.accepted(run, "q.safetensors")
    out = case.folder / "q.safetensors"
    unique = {t.untyped_storage().data_ptr(): t.nbytes for t in model.state_dict().values()}
    case.check("input size counted once", lambda: _printed_size_is(run.stdout,
                                                                 sum(unique.values())))
    case.check("lm_head stored once",
               lambda: not any(n.startswith("lm_head.") for n in _stored_names(out)))
    case.check("tie kept by squant.load",
               lambda: (lambda s: s["lm_head.weight"] is s["wte.weight"])(squant.load(out)))
    case.round_trip("q.safetensors", model.state_dict())

    def into_model() -> bool:
        qmodel, reference = squant.load(out, GptLike()), GptLike()
        reference.load_state_dict(squant.load(out))
        tokens = torch.tensor([[1, 5, 9]])
        return (isinstance(qmodel.wte, squant.nn.QuantizedEmbedding)
                and qmodel.lm_head.codes is qmodel.wte.codes
                and torch.equal(qmodel(tokens), reference(tokens)))
    case.check("squant.load(out, model): codes shared, same logits", into_model)


def _printed_size_is(stdout: str, size: int) -> bool:
    """The input size the summary line prints (``..., 4.9 kB -> ...``) is ``size`` bytes, to
    the printed digits."""
    value, unit = re.search(r", ([\d.]+) (B|kB|MB|GB) ->", stdout).groups()
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    return abs(float(value) * scale - size) <= (0.5 if unit == "B" else 0.05 * scale)


def embeddings(case: Case) -> None:
    model = embedding_model()
    torch.save(model.state_dict(), case.folder / "model.pt")
    case.accepted(case.run("quantize", "model.pt", "q.safetensors"), "q.safetensors")
    case.round_trip("q.safetensors", model.state_dict())

    def into_model() -> bool:
        qmodel = squant.load(case.folder / "q.safetensors", embedding_model())
        state = squant.load(case.folder / "q.safetensors")
        tokens = torch.tensor([[0, 3, 9, 3]])
        return all(isinstance(getattr(qmodel, n), squant.nn.QuantizedEmbedding)
                   and torch.equal(getattr(qmodel, n)(tokens),
                                   nn.functional.embedding(tokens, state[f"{n}.weight"]))
                   for n in ("embed_tokens", "table"))
    case.check("squant.load(out, model): QuantizedEmbedding, same lookups", into_model)


def user_metadata(case: Case) -> None:
    save_file(small_state(), str(case.folder / "model.safetensors"),
              metadata={"format": "pt", "author": "me", "license": "mit"})
    case.accepted(case.run("quantize", "model.safetensors", "q.safetensors"), "q.safetensors")
    metadata = lambda: _metadata(case.folder / "q.safetensors")  # noqa: E731
    case.check("user keys kept", lambda: metadata()["author"] == "me"
               and metadata()["license"] == "mit")
    case.check("squant's key beside them",
               lambda: json.loads(metadata()["squant"])["format_version"] == 1)


def float8(case: Case, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    state = {"fc.weight": torch.randn(6, 16).to(dtype), "norm.weight": torch.rand(6).to(dtype)}
    save_file(state, str(case.folder / "model.safetensors"))
    case.accepted(case.run("quantize", "model.safetensors", "q.safetensors"), "q.safetensors")
    run = case.run("dequantize", "q.safetensors", "f.pt")
    case.accepted(run, "f.pt")
    case.round_trip("q.safetensors", state)
    case.check("dequantize's .pt == squant.load", lambda: _same(
        torch.load(case.folder / "f.pt", weights_only=True),
        squant.load(case.folder / "q.safetensors")))


# ---------------------------------------------------------------------------------------------
# Hostile and unlucky files.


def bad_name(case: Case, name: str, message: str) -> None:
    torch.save({**small_state(), name: torch.randn(4, 4)}, case.folder / "model.pt")
    case.refused(case.run("quantize", "model.pt", "q.safetensors"), "q.safetensors", message)


def nested_json(case: Case, base: Path) -> None:
    corrupt_copy(base, case.folder / "nested.safetensors",
                 header="[" * 100_000 + "]" * 100_000)
    message = "JSON nested too deeply"
    case.refused(case.run("inspect", "nested.safetensors"), None, message)
    case.refused(case.run("dequantize", "nested.safetensors", "f.pt"), "f.pt", message)
    case.refused_by_load("nested.safetensors", message)


def nested_index(case: Case) -> None:
    (case.folder / "model.safetensors.index.json").write_text(
        "{" + '"a":{' * 100_000 + "}" * 100_001)
    case.refused(case.run("quantize", "model.safetensors.index.json", "q.safetensors"),
                 "q.safetensors", "JSON nested too deeply")


def corrupt(case: Case, base: Path, part: str, value: float) -> None:
    corrupt_copy(base, case.folder / "bad.safetensors", part=part, value=value)
    message = ("tensor 'fc.weight' has a scale that is zero, negative" if part == "scale"
               else "tensor 'fc.weight' has a zero point that is NaN")
    case.refused(case.run("dequantize", "bad.safetensors", "f.pt"), "f.pt", message)
    case.refused_by_load("bad.safetensors", message)


def zip_bomb(case: Case, results: dict) -> None:
    declared = write_zip_bomb(case.folder / "bomb.pt", 2048)
    size = (case.folder / "bomb.pt").stat().st_size
    run = case.run("quantize", "bomb.pt", "q.safetensors")
    case.refused(run, "q.safetensors", "its zip entries expand to")
    case.check(f"peak RSS {run.rss / 1e6:.0f} MB < 1/4 of the {declared / 1e9:.1f} GB",
               lambda: 0 < run.rss < declared / 4)
    results["bomb"] = (size, declared, run.rss)


def lying_zip_bomb(case: Case) -> None:
    """The bomb's record declares the 64 bytes of its 4x4 tensor: the size check sees nothing;
    torch must then read no more than declared (accepted, the tensor of zeros) or refuse."""
    inflates = write_zip_bomb(case.folder / "liar.pt", 2048)
    understate_record(case.folder / "liar.pt", 64)
    run = case.run("quantize", "liar.pt", "q.safetensors")
    lines = run.stderr.splitlines()
    case.check("exit 0, or 1 with one line", lambda: run.code == 0 or (
        run.code == 1 and len(lines) == 1 and lines[0].startswith("squant: error: ")))
    if run.code == 0:
        case.round_trip("q.safetensors", {"fc.weight": torch.zeros(4, 4)})
    case.no_temporary()
    case.check(f"peak RSS {run.rss / 1e6:.0f} MB < 1/4 of the {inflates / 1e9:.1f} GB",
               lambda: 0 < run.rss < inflates / 4)


def pickle_with_code(case: Case, results: dict) -> None:
    marker = case.folder / "pwned"
    torch.save({"w": Payload(marker)}, case.folder / "evil.pt")
    run = case.run("quantize", "evil.pt", "q.safetensors")
    case.refused(run, "q.safetensors", "holds objects other than tensors")
    case.check("code not run", lambda: not marker.exists())
    case.check("no weights_only advice", lambda: "weights_only" not in run.stderr)
    results["pickle"] = run.rss


def full_disk(case: Case, wide: Path, command: str, out: str) -> None:
    """``wide``: a squant file of ``small_state()`` and a 256x256 weight, so that every output
    (quantized or float) is larger than the file size limit."""
    source = "q.safetensors" if command == "dequantize" else "model.safetensors"
    if command == "dequantize":
        os.link(wide, case.folder / source)
    else:
        save_file(squant.load(wide), str(case.folder / source))
    run = case.run(command, source, out, limit_file_size=True)
    case.refused(run, out, "cannot write the output (File too large)")


def _signal_once_writing(child: subprocess.Popen, folder: Path, signum: int) -> str:
    """Wait for the output's temporary file, then send ``signum``."""
    while child.poll() is None:
        if list(folder.glob(".q.safetensors.*.tmp")):
            child.send_signal(signum)
            return "sent while writing"
        time.sleep(0.002)
    return "child ended before its temporary file appeared"


def stopped(case: Case, big: Path, signum: signal.Signals) -> None:
    source = os.path.relpath(big, case.folder)
    run = case.run("quantize", source, "q.safetensors", "--quiet",
                   on_start=lambda c: _signal_once_writing(c, case.folder, signum))
    case.check(f"{signum.name} {run.note}", lambda: run.note == "sent while writing")
    case.check(f"exit {128 + signum}", lambda: run.code == 128 + signum)
    case.check("one line: stopped, no output left",
               lambda: run.stderr == f"squant: stopped by {signum.name}; no output left "
                                     "behind\n")
    case.check("folder left empty", lambda: list(case.folder.iterdir()) == [])


def report_exists(case: Case) -> None:
    torch.save(small_state(), case.folder / "m.pt")
    (case.folder / "r.json").write_text("old")
    case.accepted(case.run("quantize", "m.pt", "q.safetensors", "--report", "r.json"),
                  "q.safetensors")
    case.check("r.json replaced by the report", lambda: "fc.weight" in json.loads(
        (case.folder / "r.json").read_text())["tensors"])


def report_unwritable(case: Case, report: str, message: str) -> None:
    torch.save(small_state(), case.folder / "m.pt")
    if report == "r.json":
        (case.folder / report).mkdir()
    case.refused(case.run("quantize", "m.pt", "q.safetensors", "--report", report),
                 "q.safetensors", message)
