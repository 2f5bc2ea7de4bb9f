"""The inputs of ``bench_cli_files.py``: small checkpoints in the layouts people have, and
hostile files (corrupt squant files, a zip bomb, a pickle that would run code)."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import squant
from squant import cli


def small_state() -> dict[str, torch.Tensor]:
    """A state_dict without architecture: conv, linear and embedding-shaped weights (float32
    and bfloat16), biases, a 1-D norm weight and an integer buffer."""
    torch.manual_seed(0)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3),
        "conv.bias": torch.randn(16),
        "fc.weight": torch.randn(10, 33).to(torch.bfloat16),
        "fc.bias": torch.randn(10),
        "emb.weight": torch.randn(7, 5),
        "norm.weight": torch.rand(10),
        "norm.num_batches_tracked": torch.tensor(5),
    }


def expected_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``squant.load`` of the CLI's output should give: every floating tensor named
    ``*weight`` with >= 2 dims quantized per channel (4-bit KC, float8 from its float value)
    and dequantized to its dtype; every other tensor as it was."""
    expected = {}
    for name, tensor in state.items():
        if name.endswith("weight") and tensor.ndim >= 2 and tensor.is_floating_point():
            source = tensor.float() if tensor.element_size() == 1 else tensor
            tensor = squant.quantize_weight(source.detach()).dequantize().to(tensor.dtype)
        expected[name] = tensor.detach()
    return expected


def write_sharded(folder: Path, kind: str, index: bool) -> Path:
    """``small_state()`` in two shards as a model hub writes them (safetensors shards carry
    user metadata); the index's path, or the folder's without an index."""
    folder.mkdir()
    prefix, suffix = (("model", ".safetensors") if kind == "safetensors"
                      else ("pytorch_model", ".bin"))
    state, weight_map = small_state(), {}
    names = list(state)
    for i, part in enumerate((names[:3], names[3:]), 1):
        shard, file = {n: state[n] for n in part}, f"{prefix}-{i:05d}-of-00002{suffix}"
        if kind == "safetensors":
            save_file(shard, str(folder / file), metadata={"format": "pt", "shard": str(i)})
        else:
            torch.save(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    if not index:
        return folder
    path = folder / f"{prefix}{suffix}.index.json"
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


class GptLike(nn.Module):
    """A GPT's shape in miniature: token and position embeddings, a block, a norm, and an
    ``lm_head`` tied to ``wte`` (one tensor saved under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(50, 16), nn.Embedding(8, 16)
        self.h = nn.Linear(16, 16)
        self.ln_f = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[-1]))
        return self.lm_head(self.ln_f(nn.functional.gelu(self.h(x))))


def embedding_model() -> nn.Sequential:
    """Two embedding tables (one with a padding index) and a Linear."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed_tokens", nn.Embedding(10, 8))
    model.add_module("table", nn.Embedding(10, 8, padding_idx=0))
    model.add_module("fc", nn.Linear(8, 4))
    return model


class Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def quantize_here(source: Path, out: Path) -> Path:
    """``squant quantize SOURCE OUT --quiet`` in this process (to build inputs, not measured)."""
    if cli.main(["quantize", str(source), str(out), "--quiet"]) != 0:
        raise RuntimeError(f"could not quantize {source}")
    return out


def corrupt_copy(path: Path, out: Path, header: str | None = None, part: str | None = None,
                 value: float = 0.0) -> Path:
    """A copy of squant file ``path`` with its squant metadata replaced by ``header``, or with
    element 3 of ``fc.weight``'s ``part`` (scale or zero_point) set to ``value``."""
    with safe_open(str(path), framework="pt") as file:
        state = {name: file.get_tensor(name) for name in file.keys()}
        metadata = file.metadata()
    if header is not None:
        metadata["squant"] = header
    if part is not None:
        state[f"fc.weight.{part}"][3] = value
    save_file(state, str(out), metadata=metadata)
    return out


_MIB = bytes(1 << 20)


class _DeflatedZeros:
    """Stands in for zipfile's compressor, fed 1 MiB of zeros at a time: after a full flush
    deflate's history is empty, so each MiB deflates to the same ~1 kB block (deflating 2 GB
    for real takes half a minute here)."""

    def __init__(self) -> None:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        self.block = compressor.compress(_MIB) + compressor.flush(zlib.Z_FULL_FLUSH)
        self.end = compressor.flush()

    def compress(self, data: bytes) -> bytes:
        assert data is _MIB
        return self.block

    def flush(self) -> bytes:
        return self.end


def write_zip_bomb(path: Path, mebibytes: int) -> int:
    """A ``torch.save`` file of one 4x4 tensor whose data record is ``mebibytes`` MiB of zeros
    deflated (sizes and CRC true): a zip bomb. Returns the bytes its entries declare."""
    buffer = io.BytesIO()
    torch.save({"fc.weight": torch.zeros(4, 4)}, buffer)
    with zipfile.ZipFile(buffer) as small, zipfile.ZipFile(path, "w") as big:
        for info in small.infolist():
            if not info.filename.endswith("/data/0"):
                big.writestr(info, small.read(info))
                continue
            record_info = zipfile.ZipInfo(info.filename)
            record_info.compress_type = zipfile.ZIP_DEFLATED
            with big.open(record_info, "w", force_zip64=True) as record:
                record._compressor = _DeflatedZeros()  # zipfile's private: see the class
                for _ in range(mebibytes):
                    record.write(_MIB)
    with zipfile.ZipFile(path) as archive:  # a real bomb: it inflates to zeros
        name = next(n for n in archive.namelist() if n.endswith("/data/0"))
        with archive.open(name) as record:
            assert record.read(1 << 22) == bytes(1 << 22)
        return sum(info.file_size for info in archive.infolist())


def understate_record(path: Path, size: int) -> None:
    """Make zip bomb ``path``'s data record declare ``size`` bytes (its local header's zip64
    field and its central directory entry), hiding what it inflates to from the size check."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    local = info.header_offset
    name_length = struct.unpack_from("<H", data, local + 26)[0]
    extra = local + 30 + name_length
    assert struct.unpack_from("<HH", data, extra) == (1, 16)  # zip64: sizes, 8 bytes each
    struct.pack_into("<Q", data, extra + 4, size)
    central = data.find(b"PK\x01\x02")
    while data[central + 46:central + 46 + len(info.filename)] != info.filename.encode():
        central = data.find(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, central + 24, size)
    path.write_bytes(data)
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo(info.filename).file_size == size
