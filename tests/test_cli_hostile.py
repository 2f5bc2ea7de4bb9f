"""Files that fight back, and unlucky runs: names no safetensors file can hold, deeply nested
JSON, corrupt scales, zip bombs, full disks, signals while writing, reports that cannot be
written. Each: exit code 1 (or 128 + the signal), one line on stderr, no output left behind."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli import _assert_refused, _quantize_safetensors, _run, _state_dict

import squant
from squant.io import file_io


@pytest.fixture
def quantized(capsys, tmp_path: Path) -> Path:
    return _quantize_safetensors(capsys, tmp_path / "model.safetensors",
                                 tmp_path / "q.safetensors")


def _rewrite(path: Path, out: Path, tensors: dict | None = None, squant_header=None) -> Path:
    """A copy of squant file ``path`` with some tensors or its squant header replaced."""
    with safe_open(str(path), framework="pt") as file:
        state = {name: file.get_tensor(name) for name in file.keys()}
        metadata = file.metadata()
    state.update(tensors or {})
    if squant_header is not None:
        metadata["squant"] = squant_header
    save_file(state, str(out), metadata=metadata)
    return out


def _assert_every_reader_refuses(capsys, path: Path, message: str) -> None:
    out = path.parent / "float.pt"
    _assert_refused(_run(capsys, "inspect", path), None, message)
    _assert_refused(_run(capsys, "dequantize", path, out), out, message)
    with pytest.raises(squant.QuantizationError, match=re.escape(message)):
        squant.load(path)


@pytest.mark.parametrize("name, message", [
    ("__metadata__", "a tensor is named '__metadata__', which safetensors reserves"),
    ("fc\udc80.weight", "tensor name 'fc\\udc80.weight' is not valid UTF-8"),
])
def test_names_no_safetensors_file_can_hold(capsys, tmp_path: Path, name: str,
                                            message: str) -> None:
    source, out = tmp_path / "model.pt", tmp_path / "q.safetensors"
    torch.save({**_state_dict(), name: torch.randn(4, 4)}, source)
    _assert_refused(_run(capsys, "quantize", source, out), out, message)


def test_deeply_nested_json(capsys, tmp_path: Path, quantized: Path) -> None:
    bad = _rewrite(quantized, tmp_path / "nested.safetensors",
                   squant_header="[" * 100_000 + "]" * 100_000)
    _assert_every_reader_refuses(capsys, bad, "corrupt squant header (JSON nested too deeply)")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{" + '"a":{' * 100_000 + "}" * 100_001)
    out = tmp_path / "out.safetensors"
    _assert_refused(_run(capsys, "quantize", index, out), out, "JSON nested too deeply")


@pytest.mark.parametrize("part, value", [("scale", 0.0), ("scale", -1.0),
                                         ("scale", float("nan")), ("scale", float("inf")),
                                         ("zero_point", float("nan")),
                                         ("zero_point", float("-inf"))])
def test_corrupt_scales_and_zero_points(capsys, tmp_path: Path, quantized: Path, part: str,
                                        value: float) -> None:
    with safe_open(str(quantized), framework="pt") as file:
        tensor = file.get_tensor(f"fc.weight.{part}")
    tensor[3] = value
    bad = _rewrite(quantized, tmp_path / "bad.safetensors", {f"fc.weight.{part}": tensor})
    what = "a scale that is zero, negative" if part == "scale" else "a zero point that is NaN"
    _assert_every_reader_refuses(capsys, bad, f"tensor 'fc.weight' has {what}")


def test_zip_bomb_is_refused_before_loading(capsys, tmp_path: Path) -> None:
    """A 100 kB .pt whose tensor record inflates to 128 MB (torch would allocate it all)."""
    buffer = io.BytesIO()
    torch.save({"fc.weight": torch.zeros(4, 4)}, buffer)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(buffer) as small, zipfile.ZipFile(bomb, "w") as big:
        for info in small.infolist():
            if info.filename.endswith("/data/0"):
                record_info = zipfile.ZipInfo(info.filename)
                record_info.compress_type = zipfile.ZIP_DEFLATED
                with big.open(record_info, "w", force_zip64=True) as record:
                    zeros = bytes(1 << 20)
                    for _ in range(128):
                        record.write(zeros)
            else:
                big.writestr(info, small.read(info))
    assert bomb.stat().st_size < 1 << 20
    out = tmp_path / "out.safetensors"
    _assert_refused(_run(capsys, "quantize", bomb, out), out,
                    "its zip entries expand to 134 MB")


def test_full_disk_says_how_much_room_it_needs(capsys, monkeypatch, tmp_path: Path,
                                               quantized: Path) -> None:
    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_io, "_pwrite_all", full)
    out = tmp_path / "float.safetensors"
    _assert_refused(_run(capsys, "dequantize", quantized, out), out,
                    "cannot write the output (No space left on device); writing it needs about")


_LIMITED = """
import json, resource, signal, sys
from squant import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
print(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_dequantize_to_pt_on_a_full_disk(tmp_path: Path, quantized: Path) -> None:
    """A file-size limit makes writes fail as a full disk does: torch's own writer would raise
    a many-line RuntimeError."""
    out = tmp_path / "float.pt"
    result = subprocess.run([sys.executable, "-c", _LIMITED, "dequantize", str(quantized),
                             str(out)], capture_output=True, text=True, timeout=120)
    assert result.stdout == "1\n", result.stderr
    _assert_refused((1, "", result.stderr), out, "cannot write the output (File too large); "
                    "nothing was written")


_SLOW_COMMIT = """
import sys, time
from squant import cli
from squant.io import file_io
real = file_io.SafetensorsWriter._header
def slow(self):
    print("writing", flush=True)
    time.sleep(60)
    return real(self)
file_io.SafetensorsWriter._header = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_while_writing_removes_the_partial_output(tmp_path: Path) -> None:
    source, out = tmp_path / "model.safetensors", tmp_path / "out" / "q.safetensors"
    save_file(_state_dict(), str(source))
    out.parent.mkdir()
    child = subprocess.Popen([sys.executable, "-c", _SLOW_COMMIT, "quantize", str(source),
                              str(out), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n"
    assert len(list(out.parent.glob(".q.safetensors.*.tmp"))) == 1
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM
    assert err == "squant: stopped by SIGTERM; no output left behind\n"
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_while_writing_in_process(capsys, monkeypatch, tmp_path: Path,
                                          signum: signal.Signals) -> None:
    """The signal arrives while the output's temporary file is being written. The test's own
    handler (a no-op) is what runs if squant installs none."""
    source, out = tmp_path / "model.safetensors", tmp_path / "out" / "q.safetensors"
    save_file(_state_dict(), str(source))
    out.parent.mkdir()
    real = file_io.SafetensorsWriter._header

    def header(self):
        assert len(list(out.parent.glob(".q.safetensors.*.tmp"))) == 1
        os.kill(os.getpid(), signum)
        return real(self)

    monkeypatch.setattr(file_io.SafetensorsWriter, "_header", header)
    previous = signal.signal(signum, lambda *_: None)
    try:
        code, _, err = _run(capsys, "quantize", source, out, "--quiet")
    finally:
        signal.signal(signum, previous)
    assert (code, err) == (128 + signum, f"squant: stopped by {signum.name}; no output left "
                                         "behind\n")
    assert list(out.parent.iterdir()) == []
    assert signal.getsignal(signum) is previous


def test_an_existing_report_is_replaced(capsys, tmp_path: Path) -> None:
    source, out, report = (tmp_path / n for n in ("m.pt", "q.safetensors", "r.json"))
    torch.save(_state_dict(), source)
    report.write_text("old")
    assert _run(capsys, "quantize", source, out, "--report", report, "--quiet")[0] == 0
    assert out.exists() and "fc.weight" in json.loads(report.read_text())["tensors"]


def test_a_report_that_cannot_be_written_fails_before_the_output(capsys, monkeypatch,
                                                                   tmp_path: Path) -> None:
    source, out, report = (tmp_path / n for n in ("m.pt", "q.safetensors", "r.json"))
    torch.save(_state_dict(), source)
    report.mkdir()
    _assert_refused(_run(capsys, "quantize", source, out, "--report", report), out,
                    "r.json: is a folder; choose a file path for the report")
    report.rmdir()

    def unwritable(self, *_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", unwritable)
    _assert_refused(_run(capsys, "quantize", source, out, "--report", report), out,
                    "Read-only file system")
    assert not report.exists()


def test_a_report_folder_that_refuses_new_files_names_the_report(capsys, monkeypatch,
                                                                  tmp_path: Path) -> None:
    """The report's temporary file cannot be created (a read-only folder, which root's tests
    cannot make): the line names the report the user gave, not the hidden temporary."""
    source, out, report = (tmp_path / n for n in ("m.pt", "q.safetensors", "r.json"))
    torch.save(_state_dict(), source)
    real_open = os.open

    def refuse_temporaries(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_temporaries)
    code, stdout, err = _run(capsys, "quantize", source, out, "--report", report)
    _assert_refused((code, stdout, err), out, f"Permission denied: '{report}'")
    assert ".tmp" not in err and not report.exists()
