"""The ``squant`` command line: quantize / dequantize / inspect on state_dicts without
architecture, its options, streaming in chunks, and every bad input (one line on stderr, exit
code 1, no output left behind)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import squant
from squant import cli
from squant.core.report import layer_report
from squant.io import checkpoint as checkpoints
from squant.io import checkpoint_stats
from squant.io.file_io import SquantReader

QUANTIZABLE = ("conv.weight", "deconv.weight", "fc.weight", "emb.weight")


def _state_dict() -> dict[str, torch.Tensor]:
    """A checkpoint without architecture: weights of several kinds and dtypes, a 1-D
    ``norm.weight`` and non-float buffers (which must be copied, not quantized)."""
    torch.manual_seed(0)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3),
        "conv.bias": torch.randn(16),
        "deconv.weight": torch.randn(16, 6, 3, 3),  # ConvTranspose: (in, out, k, k)
        "fc.weight": torch.randn(10, 33).to(torch.bfloat16),
        "fc.bias": torch.randn(10),
        "emb.weight": torch.randn(7, 5, dtype=torch.float64),
        "norm.weight": torch.rand(10),
        "norm.num_batches_tracked": torch.tensor(5),
    }


@pytest.fixture(params=[".pt", ".safetensors"])
def checkpoint(request, tmp_path: Path) -> Path:
    path = tmp_path / f"model{request.param}"
    if request.param == ".pt":
        torch.save(_state_dict(), path)
    else:
        save_file(_state_dict(), str(path))
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _quantize_safetensors(capsys, source: Path, out: Path) -> Path:
    """``out``: ``_state_dict()`` saved as safetensors at ``source`` and quantized quietly."""
    save_file(_state_dict(), str(source))
    assert _run(capsys, "quantize", source, out, "--quiet")[0] == 0
    return out


def _quantized(path: Path) -> dict[str, squant.QuantizedTensor]:
    with SquantReader(path) as reader:
        return {name: reader.read_quantized(name) for name in reader.entries}


def _assert_same_quantization(got: squant.QuantizedTensor, want: squant.QuantizedTensor) -> None:
    assert torch.equal(got.codes, want.codes)
    assert torch.equal(got.scale, want.scale)
    assert torch.equal(got.zero_point, want.zero_point)
    assert (got.bits, got.mode, got.axis) == (want.bits, want.mode, want.axis)


def test_quantize_gives_the_codes_of_quantize_weights(capsys, checkpoint: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    code, stdout, err = _run(capsys, "quantize", checkpoint, out, "--bits", "3")
    assert (code, err) == (0, "") and "4 of 8 tensors quantized" in stdout
    state = _state_dict()
    expected = squant.quantize_weights([state[n] for n in QUANTIZABLE], bits=3)
    got = _quantized(out)
    assert sorted(got) == sorted(QUANTIZABLE)
    for name, want in zip(QUANTIZABLE, expected):
        _assert_same_quantization(got[name], want)
    loaded = squant.load(out)
    for name in ("conv.bias", "fc.bias", "norm.weight", "norm.num_batches_tracked"):
        assert torch.equal(loaded[name], state[name]), name
    assert loaded["fc.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["fc.weight"], expected[2].dequantize().to(torch.bfloat16))


def test_options(capsys, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    code, _, err = _run(capsys, "quantize", checkpoint, out, "--skip", "emb",
                        "--layer-bits", "fc=8", "conv*=6", "--transposed", "deconv.weight",
                        "--scheme", "symmetric", "--mode", "K", "--quiet")
    assert (code, err) == (0, "")
    state = _state_dict()
    got = _quantized(out)
    assert sorted(got) == ["conv.weight", "deconv.weight", "fc.weight"]
    expected = {
        "conv.weight": squant.quantize_weight(state["conv.weight"], 6, "K", scheme="symmetric"),
        "deconv.weight": squant.quantize_weight(state["deconv.weight"], 4, "K", axis=1,
                                                scheme="symmetric"),
        "fc.weight": squant.quantize_weight(state["fc.weight"], 8, "K", scheme="symmetric"),
    }
    for name, want in expected.items():
        _assert_same_quantization(got[name], want)
        assert not got[name].zero_point.any(), name
    assert torch.equal(squant.load(out)["emb.weight"], state["emb.weight"])


def test_granularity_tensor(capsys, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    assert _run(capsys, "quantize", checkpoint, out, "--granularity", "tensor")[0] == 0
    for name, qweight in _quantized(out).items():
        assert qweight.granularity == "tensor"
        assert torch.all(qweight.scale == qweight.scale[0]), name


def test_streaming_in_small_chunks_writes_the_same_file(capsys, monkeypatch, tmp_path: Path
                                                         ) -> None:
    source = tmp_path / "model.safetensors"
    save_file(_state_dict(), str(source))
    whole, chunked = tmp_path / "whole.safetensors", tmp_path / "chunked.safetensors"
    assert _run(capsys, "quantize", source, whole)[0] == 0
    monkeypatch.setattr(cli, "CHUNK_BYTES", 1000)
    calls = []
    real = checkpoints.quantize_with_options
    monkeypatch.setattr(checkpoints, "quantize_with_options",
                        lambda weights, *args: calls.append(len(weights)) or real(weights, *args))
    assert _run(capsys, "quantize", source, chunked)[0] == 0
    assert len(calls) > 1
    assert chunked.read_bytes() == whole.read_bytes()


def test_report_json_metadata_and_inspect(capsys, checkpoint: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "q.safetensors", tmp_path / "report.json"
    assert _run(capsys, "quantize", checkpoint, out, "--report", report, "--quiet")[0] == 0
    tensors = json.loads(report.read_text())["tensors"]
    assert sorted(tensors) == sorted(QUANTIZABLE)
    with SquantReader(out) as reader:
        stored = reader.report
    state = _state_dict()
    for name, qweight in _quantized(out).items():
        assert tensors[name]["bits"] == 4 and tensors[name]["shape"] == list(state[name].shape)
        assert stored[name] == {k: tensors[name][k] for k in cli.STAT_FIELDS}
        direct = layer_report(name, "", state[name].shape, [state[name]], [qweight], 0.0)
        for field in cli.STAT_FIELDS:
            assert stored[name][field] == pytest.approx(getattr(direct, field), rel=1e-9), field
        assert stored[name]["channel_sum_squant_mean"] < stored[name]["channel_sum_eq_mean"]

    code, table, err = _run(capsys, "inspect", out)
    assert (code, err) == (0, "")
    row = next(line for line in table.splitlines() if line.startswith("conv.weight"))
    assert row.split()[1:5] == ["float32", "4", "KC", "16x3x3x3"]
    assert f"{stored['conv.weight']['max_abs_weight_error']:.3g}" in row
    assert "4 quantized and 4 float tensors" in table


def test_report_statistics_are_merged_over_channel_blocks(monkeypatch) -> None:
    torch.manual_seed(3)
    weight = torch.randn(40, 7, 3)
    qweight = squant.quantize_weight(weight, bits=3)
    whole = checkpoint_stats.tensor_stats("w", weight, qweight)
    monkeypatch.setattr(checkpoint_stats, "_STATS_ELEMENTS", 50)  # blocks of 2 channels
    blocks = checkpoint_stats.tensor_stats("w", weight, qweight)
    assert blocks == pytest.approx(whole, rel=1e-9)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_dequantize(capsys, tmp_path: Path, suffix: str) -> None:
    source, quantized = tmp_path / "model.pt", tmp_path / "q.safetensors"
    torch.save(_state_dict(), source)
    assert _run(capsys, "quantize", source, quantized, "--quiet")[0] == 0
    out = tmp_path / f"float{suffix}"
    assert _run(capsys, "dequantize", quantized, out, "--quiet") == (0, "", "")
    state = squant.load(quantized)
    if suffix == ".pt":
        got = torch.load(out, weights_only=True)
    else:
        got = load_file(str(out))
    assert sorted(got) == sorted(_state_dict())
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name


def test_progress_bar_only_on_a_terminal(capsys) -> None:
    assert cli._progress(10, quiet=False, what="x").disable  # stderr is captured, not a tty
    assert cli._progress(10, quiet=True, what="x").disable


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 1, one line on stderr, no traceback, nothing written.


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _assert_refused(result: tuple[int, str, str], out: Path | None, message: str) -> None:
    """``result`` (exit code, stdout, stderr) is exit code 1 with one ``squant: error:`` line
    saying ``message``; ``out`` (if given) and any temporary file beside it do not exist."""
    code, _, err = result
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("squant: error: "), err
    assert message in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not out.parent.is_dir() or not list(out.parent.glob(".*.tmp"))


def test_malicious_pickle_is_refused_without_running_it(capsys, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    raw = pickle.dumps({"w": _Payload(marker)})
    pickle.loads(raw)  # the payload is live: plain unpickling runs it ...
    assert marker.exists()
    marker.unlink()
    for name, write, message in [
            ("raw.pt", lambda p: p.write_bytes(raw), "not a readable torch checkpoint"),
            ("saved.pt", lambda p: torch.save({"w": _Payload(marker)}, p),
             "holds objects other than tensors and plain containers (Unsupported global: "
             "GLOBAL io.open); squant loads tensors only and will not run")]:
        evil, out = tmp_path / name, tmp_path / f"{name}.safetensors"
        write(evil)
        _assert_refused(_run(capsys, "quantize", evil, out), out, message)
        assert not marker.exists()  # ... squant does not


def test_malicious_pickle_in_a_subprocess(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil, out = tmp_path / "evil.pth", tmp_path / "out.safetensors"
    torch.save({"w": _Payload(marker)}, evil)
    result = subprocess.run([sys.executable, "-m", "squant", "quantize", str(evil), str(out)],
                            capture_output=True, text=True, timeout=120)
    _assert_refused((result.returncode, result.stdout, result.stderr), out,
                    "holds objects other than tensors")
    assert "weights_only" not in result.stderr
    assert not marker.exists()


def test_subprocess_quantize(tmp_path: Path) -> None:
    source, out = tmp_path / "model.bin", tmp_path / "q.safetensors"
    torch.save(_state_dict(), source)
    result = subprocess.run([sys.executable, "-m", "squant", "quantize", str(source), str(out),
                             "--bits", "2"], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (0, "")
    assert "4 of 8 tensors quantized" in result.stdout
    with SquantReader(out) as reader:
        assert {e.bits for e in reader.entries.values()} == {2}


def _write_bad(kind: str, directory: Path) -> Path:
    """A bad input file of the given kind."""
    good_pt, good_st = directory / "good.pt", directory / "good.safetensors"
    torch.save(_state_dict(), good_pt)
    save_file(_state_dict(), str(good_st))
    files = {
        "truncated.pt": good_pt.read_bytes()[:-300],
        "truncated.safetensors": good_st.read_bytes()[:-300],
        "random.pt": np.random.default_rng(0).bytes(4096),
        "random.safetensors": np.random.default_rng(1).bytes(4096),
        "empty.pt": b"",
        "model.txt": good_pt.read_bytes(),
    }
    if kind in files:
        path = directory / kind
        path.write_bytes(files[kind])
        return path
    if kind == "list.pt":
        torch.save([torch.zeros(2, 2)], directory / kind)
    elif kind == "trainer.pt":
        torch.save({"epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}, directory / kind)
    elif kind == "nan.safetensors":
        save_file({"w.weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])},
                  str(directory / kind))
    elif kind == "no_weights.safetensors":
        save_file({"bias": torch.zeros(3)}, str(directory / kind))
    return directory / kind


@pytest.mark.parametrize("kind, message", [
    ("truncated.pt", "not a readable torch checkpoint"),
    ("truncated.safetensors", "not a readable safetensors file"),
    ("random.pt", "not a readable torch checkpoint"),
    ("random.safetensors", "not a readable safetensors file"),
    ("empty.pt", "the file is empty"),
    ("model.txt", "unknown extension '.txt'"),
    ("missing.pt", "no such file"),
    ("list.pt", "holds a list, not a state_dict"),
    ("trainer.pt", "entry 'epoch' is a int, not a tensor, and no entry among state_dict, "
                   "model_state_dict, model, module holds a state_dict of tensors"),
    ("nan.safetensors", "NaN or Inf"),
    ("no_weights.safetensors", "nothing to quantize"),
])
def test_bad_inputs(capsys, tmp_path: Path, kind: str, message: str) -> None:
    source = _write_bad(kind, tmp_path)
    out = tmp_path / "out.safetensors"
    _assert_refused(_run(capsys, "quantize", source, out), out, message)


@pytest.mark.parametrize("option, pattern", [("--skip", "convv"), ("--transposed", "dekonv*"),
                                             ("--layer-bits", "fc.wieght=8")])
def test_pattern_that_matches_nothing_is_an_error(capsys, checkpoint: Path, tmp_path: Path,
                                                  option: str, pattern: str) -> None:
    out = tmp_path / "out.safetensors"
    _assert_refused(_run(capsys, "quantize", checkpoint, out, option, pattern), out,
                    "matches no quantizable tensor")


def test_bad_outputs(capsys, checkpoint: Path, tmp_path: Path) -> None:
    before = checkpoint.read_bytes()
    out = tmp_path / "out.safetensors"
    if checkpoint.suffix == ".safetensors":
        _assert_refused(_run(capsys, "quantize", checkpoint, checkpoint), None, "same file")
        link = tmp_path / "link.safetensors"
        os.symlink(checkpoint, link)
        _assert_refused(_run(capsys, "quantize", checkpoint, link), None, "same file")
        link.unlink()
    else:
        _assert_refused(_run(capsys, "quantize", checkpoint, checkpoint), None,
                        "unknown output extension '.pt'")
    assert checkpoint.read_bytes() == before
    missing = tmp_path / "no" / "out.safetensors"
    _assert_refused(_run(capsys, "quantize", checkpoint, missing), missing, "does not exist")
    _assert_refused(_run(capsys, "quantize", checkpoint, out, "--bits", "9"), out,
                    "bits must be in 2..8")
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.name]


def test_dequantize_and_inspect_refuse_foreign_files(capsys, tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file(_state_dict(), str(plain))
    out = tmp_path / "out.safetensors"
    _assert_refused(_run(capsys, "dequantize", plain, out), out, "not a squant file")
    _assert_refused(_run(capsys, "inspect", plain), None, "not a squant file")
    random = _write_bad("random.safetensors", tmp_path)
    _assert_refused(_run(capsys, "inspect", random), None, "not a readable safetensors file")
    quantized = tmp_path / "q.safetensors"
    assert _run(capsys, "quantize", plain, quantized, "--quiet")[0] == 0
    _assert_refused(_run(capsys, "quantize", quantized, out), out, "already a squant file")
    _assert_refused(_run(capsys, "dequantize", quantized, quantized), None, "same file")
    assert squant.load(quantized)


def test_usage_errors_exit_with_2(capsys, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", str(checkpoint), str(tmp_path / "o.safetensors"),
                  "--layer-bits", "fc=eight"])
    assert exit_info.value.code == 2
    assert "expected PATTERN=BITS" in capsys.readouterr().err


def test_python_m_squant_runs_from_the_checkout_root() -> None:
    """From the repository's root ``python -m squant`` imports the source folder, not the
    installed package: its kernels (``kernels/`` beside it) must still be ``squant.kernels``.
    (Nothing is quantized: that would compile the source folder's kernels a second time.)"""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", "import squant, squant.kernels.passes as p; "
         "print(squant.__file__, p.__file__, p.__name__, p.quantize_blocks.__module__)"],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    package, kernels, name, module = result.stdout.split()
    assert Path(package) == root / "squant" / "__init__.py"
    assert Path(kernels) == root / "kernels" / "passes.py"
    assert name == module == "squant.kernels.passes"
