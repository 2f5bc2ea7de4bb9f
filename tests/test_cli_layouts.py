"""``squant quantize`` on checkpoints as people have them: sharded (index or folder, safetensors
or ``.bin``), trainers' checkpoints, tied weights, embedding tables, user metadata, float8, and
tensors larger than a chunk (quantized in blocks of rows, codes identical)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli import _assert_refused, _quantize_safetensors, _quantized, _run, _state_dict
from torch import nn

import squant
from squant import cli
from squant.io import checkpoint as checkpoints
from squant.io.file_io import SquantReader


def _shards(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    names = list(state)
    return [{n: state[n] for n in names[:3]}, {n: state[n] for n in names[3:]}]


def _write_sharded(folder: Path, kind: str, index: bool = True) -> Path:
    """``_state_dict()`` in two shards as the hub writes them; returns the index (or folder)."""
    folder.mkdir()
    prefix, suffix = ("model", ".safetensors") if kind == "safetensors" else ("pytorch_model",
                                                                              ".bin")
    weight_map = {}
    for i, shard in enumerate(_shards(_state_dict()), 1):
        name = f"{prefix}-{i:05d}-of-00002{suffix}"
        if kind == "safetensors":
            save_file(shard, str(folder / name), metadata={"format": "pt", "shard": str(i)})
        else:
            torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    if not index:
        return folder
    path = folder / f"{prefix}{suffix}.index.json"
    path.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return path


@pytest.fixture
def single(capsys, tmp_path: Path) -> Path:
    """The squant file of ``_state_dict()`` quantized from one safetensors file."""
    return _quantize_safetensors(capsys, tmp_path / "single.safetensors",
                                 tmp_path / "single-q.safetensors")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as file:
        return {name: file.get_tensor(name) for name in file.keys()}


def _assert_same_tensors(got: Path, want: Path) -> None:
    a, b = _tensors(got), _tensors(want)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind, index", [("safetensors", True), ("safetensors", False),
                                         ("bin", True), ("bin", False)])
def test_sharded_checkpoints_give_one_squant_file(capsys, tmp_path: Path, single: Path,
                                                  kind: str, index: bool) -> None:
    source, out = _write_sharded(tmp_path / "hub", kind, index), tmp_path / "q.safetensors"
    code, stdout, err = _run(capsys, "quantize", source, out)
    assert (code, err) == (0, ""), err
    assert "4 of 8 tensors quantized" in stdout
    _assert_same_tensors(out, single)
    if kind == "safetensors":  # the shards' user metadata is kept
        with safe_open(str(out), framework="pt") as file:
            assert file.metadata()["shard"] == "2"


def test_sharded_checkpoint_with_a_missing_or_misplaced_shard(capsys, tmp_path: Path) -> None:
    index = _write_sharded(tmp_path / "hub", "safetensors")
    out = tmp_path / "q.safetensors"
    content = json.loads(index.read_text())
    content["weight_map"]["conv.weight"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(content))
    _assert_refused(_run(capsys, "quantize", index, out), out,
                    "the index puts tensor 'conv.weight' in model-00002-of-00002.safetensors, "
                    "but it is in model-00001-of-00002.safetensors")
    (index.parent / "model-00001-of-00002.safetensors").unlink()
    _assert_refused(_run(capsys, "quantize", index, out), out,
                    "shard model-00001-of-00002.safetensors is missing")
    index.unlink()
    _assert_refused(_run(capsys, "quantize", index.parent, out), out,
                    "shards of 2 are missing or extra")


@pytest.mark.parametrize("name, content, key", [
    ("lightning.ckpt", lambda sd: {"state_dict": sd, "epoch": 3, "global_step": 10,
                                   "optimizer_states": [{"lr": 0.1}]}, "state_dict"),
    ("trainer.pt", lambda sd: {"model": sd, "epoch": 7}, "model"),
])
def test_trainer_checkpoints(capsys, tmp_path: Path, single: Path, name: str, content,
                             key: str) -> None:
    source, out = tmp_path / name, tmp_path / "q.safetensors"
    torch.save(content(_state_dict()), source)
    code, _, err = _run(capsys, "quantize", source, out)
    assert code == 0
    assert err == (f"squant: {source}: a trainer's checkpoint; quantizing the state_dict under "
                   f"key {key!r} (it also holds: "
                   f"{', '.join(k for k in content({}) if k != key)})\n")
    _assert_same_tensors(out, single)


class _Tied(nn.Module):
    """A GPT's tied head (``wte`` Embedding and ``lm_head`` Linear share a weight) and two
    tied Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(12, 8)
        self.enc = nn.Linear(8, 6)
        self.dec = nn.Linear(8, 6)
        self.lm_head = nn.Linear(8, 12, bias=False)
        self.lm_head.weight = self.wte.weight
        self.dec.weight = self.enc.weight


def test_tied_weights_are_quantized_once_and_stored_once(capsys, tmp_path: Path) -> None:
    """A GPT-style tie across kinds (``lm_head`` a Linear, ``wte`` an Embedding) and one between
    Linears: each quantized once, stored once, and tied again by ``squant.load``."""
    torch.manual_seed(0)
    model = _Tied()
    source, out = tmp_path / "model.bin", tmp_path / "q.safetensors"
    torch.save(model.state_dict(), source)
    code, stdout, err = _run(capsys, "quantize", source, out)
    assert (code, err) == (0, "")
    assert "2 of 4 tensors quantized (2 tied tensors stored once), 624 B" in stdout
    # 12x8 + 6x8 + 6 + 6 floats, each tie counted once
    stored = _tensors(out)
    assert "enc.weight.codes" in stored and "wte.weight.codes" in stored
    assert not any(n.startswith(("dec.weight", "lm_head.weight")) for n in stored)
    state = squant.load(out)
    assert state["dec.weight"] is state["enc.weight"]
    assert state["lm_head.weight"] is state["wte.weight"]
    for name in ("wte", "enc"):
        expected = squant.quantize_weight(getattr(model, name).weight.detach())
        assert torch.equal(state[f"{name}.weight"], expected.dequantize())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qmodel = squant.load(out, _Tied())
    assert isinstance(qmodel.wte, squant.nn.QuantizedEmbedding)
    assert qmodel.enc.codes is qmodel.dec.codes
    assert qmodel.lm_head.codes is qmodel.wte.codes
    assert torch.equal(qmodel.lm_head.weight, state["wte.weight"])
    code, table, _ = _run(capsys, "inspect", out)
    assert code == 0 and "tied: enc.weight" in table and "tied: wte.weight" in table


def test_embedding_tables_are_quantized_and_load_as_quantized_embeddings(
        capsys, tmp_path: Path) -> None:
    """Tables are quantized per row whatever their name, and ``squant.load`` makes them
    ``QuantizedEmbedding`` modules holding the file's codes (no warning: nothing dequantized)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed_tokens", nn.Embedding(10, 8))
    model.add_module("table", nn.Embedding(10, 8, padding_idx=0))
    model.add_module("fc", nn.Linear(8, 4))
    source, out = tmp_path / "model.pt", tmp_path / "q.safetensors"
    torch.save(model.state_dict(), source)
    assert _run(capsys, "quantize", source, out, "--quiet")[0] == 0
    assert sorted(_quantized(out)) == ["embed_tokens.weight", "fc.weight", "table.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qmodel = squant.load(out, model)
        state = squant.load(out)
    tokens = torch.tensor([[0, 3, 9, 3]])
    for name in ("embed_tokens", "table"):
        layer = getattr(qmodel, name)
        assert isinstance(layer, squant.nn.QuantizedEmbedding)
        expected = squant.quantize_weight(getattr(model, name).weight.detach())
        assert torch.equal(layer.codes, expected.codes)
        assert torch.equal(layer(tokens), F.embedding(tokens, state[f"{name}.weight"]))
    assert isinstance(qmodel.fc, squant.nn.QuantizedLinear)
    # --skip keeps a table float in the file too
    assert _run(capsys, "quantize", source, out, "--quiet", "--skip", "embed_tokens")[0] == 0
    assert sorted(_quantized(out)) == ["fc.weight", "table.weight"]
    assert torch.equal(squant.load(out, model).embed_tokens.weight, model.embed_tokens.weight)


def test_input_metadata_is_kept(capsys, tmp_path: Path) -> None:
    source, out = tmp_path / "model.safetensors", tmp_path / "q.safetensors"
    save_file(_state_dict(), str(source), metadata={"format": "pt", "author": "me"})
    assert _run(capsys, "quantize", source, out, "--quiet")[0] == 0
    with safe_open(str(out), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["author"] == "me" and metadata["format"] == "pt"
    assert json.loads(metadata["squant"])["format_version"] == 1


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_round_trips(capsys, tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    state = {"fc.weight": torch.randn(6, 16).to(dtype), "norm.weight": torch.rand(6).to(dtype)}
    source, out = tmp_path / "model.safetensors", tmp_path / "q.safetensors"
    save_file(state, str(source))
    assert _run(capsys, "quantize", source, out, "--quiet")[0] == 0
    assert _run(capsys, "inspect", out)[0] == 0
    for suffix in (".safetensors", ".pt"):
        assert _run(capsys, "dequantize", out, tmp_path / f"f{suffix}", "--quiet")[0] == 0
    loaded = squant.load(out)
    assert loaded["fc.weight"].dtype == dtype and torch.equal(loaded["norm.weight"],
                                                              state["norm.weight"])
    want = squant.quantize_weight(state["fc.weight"].float()).dequantize().to(dtype)
    assert torch.equal(loaded["fc.weight"].float(), want.float())


@pytest.mark.parametrize("bits", [3, 4])
def test_tensors_larger_than_a_chunk_go_in_row_blocks(capsys, monkeypatch, tmp_path: Path,
                                                      bits: int) -> None:
    torch.manual_seed(1)
    state = {"big.weight": torch.randn(61, 7, 3), "wte.weight": torch.randn(50, 9),
             "small.weight": torch.randn(3, 5)}
    source, whole, blocks = (tmp_path / n for n in ("m.safetensors", "w.safetensors",
                                                    "b.safetensors"))
    save_file(state, str(source))
    assert _run(capsys, "quantize", source, whole, "--bits", bits, "--quiet")[0] == 0
    monkeypatch.setattr(cli, "CHUNK_BYTES", 800)  # a few rows of big.weight per block
    reads = []
    real = checkpoints.open_source
    monkeypatch.setattr(cli, "open_source", lambda path: _record_rows(real(path), reads))
    assert _run(capsys, "quantize", source, blocks, "--bits", bits, "--report",
                tmp_path / "r.json", "--quiet")[0] == 0
    assert {name for name, *_ in reads} == {"big.weight", "wte.weight"}
    assert len([r for r in reads if r[0] == "big.weight"]) > 3
    got, want = _quantized(blocks)["big.weight"], squant.quantize_weight(state["big.weight"],
                                                                         bits)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    _assert_same_tensors(blocks, whole)
    report = json.loads((tmp_path / "r.json").read_text())["tensors"]["big.weight"]
    direct = checkpoints.tensor_stats("big.weight", state["big.weight"], want)
    for field in checkpoints.STAT_FIELDS:
        assert report[field] == pytest.approx(direct[field], rel=1e-9), field


def _record_rows(source: checkpoints.Source, reads: list) -> checkpoints.Source:
    """``source``, recording each ``read_rows`` call."""
    read_rows = type(source).read_rows

    def recorded(name: str, start: int, stop: int) -> torch.Tensor:
        reads.append((name, start, stop))
        return read_rows(source, name, start, stop)

    source.read_rows = recorded
    return source


def test_reader_of_tied_files_refuses_bad_ties(tmp_path: Path, single: Path) -> None:
    tensors = _tensors(single)
    with safe_open(str(single), framework="pt") as file:
        metadata = file.metadata()
    header = json.loads(metadata["squant"])
    header["ties"] = {"x.weight": "nowhere"}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, "squant": json.dumps(header)})
    with pytest.raises(squant.QuantizationError, match="tie 'x.weight' -> 'nowhere'"):
        SquantReader(bad)


def test_readme_reader_reads_what_the_cli_writes(capsys, tmp_path: Path) -> None:
    """Unsigned tensors (copied through), bfloat16 ones and ties: the README's numpy reader
    gives what ``squant.load`` gives."""
    from test_storage import _readme_reader

    torch.manual_seed(0)
    shared = torch.randn(6, 4)
    state = {"a.weight": shared, "b.weight": shared, "fc.weight": torch.randn(5, 7),
             "norm.weight": torch.randn(5).to(torch.bfloat16),
             "ids16": torch.tensor([0, 7, 65535]).to(torch.uint16),
             "ids32": torch.tensor([0, 7, 2**32 - 1]).to(torch.uint32),
             "ids64": torch.tensor([0, 7, 2**40]).to(torch.uint64)}
    source, out = tmp_path / "model.pt", tmp_path / "q.safetensors"
    torch.save(state, source)
    assert _run(capsys, "quantize", source, out, "--quiet")[0] == 0
    arrays = _readme_reader()(out)
    loaded = squant.load(out)
    assert sorted(arrays) == sorted(loaded) == sorted(state)
    for name, tensor in loaded.items():
        want = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        assert arrays[name].dtype == want.numpy().dtype, name
        assert (arrays[name] == want.numpy()).all(), name


def test_an_error_on_a_trainer_checkpoint_is_still_one_line(capsys, tmp_path: Path) -> None:
    source, out = tmp_path / "model.ckpt", tmp_path / "q.safetensors"
    torch.save({"state_dict": _state_dict(), "epoch": 1}, source)
    _assert_refused(_run(capsys, "quantize", source, out, "--skip", "nothing"), out,
                    "--skip pattern 'nothing' matches no quantizable tensor")
