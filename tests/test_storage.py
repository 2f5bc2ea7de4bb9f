"""squant.save / squant.load and the file format: packing, exact round trips, the documented
layout (read back by the README's numpy reader), file size, and refusal of bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import squant
from squant.io import packing

README = Path(__file__).resolve().parent.parent / "README.md"


def _layers() -> dict[str, nn.Module]:
    """One layer of each kind; odd element counts where the kind allows it (a grouped
    ConvTranspose has an even input count, so 54 codes: a partial group of 8)."""
    return {
        "linear": nn.Linear(7, 3),                                   # 21 codes
        "conv": nn.Conv2d(3, 5, 3),                                  # 135 codes
        "depthwise": nn.Conv2d(5, 5, 3, groups=5, bias=False),       # 45 codes
        "deconv_groups2": nn.ConvTranspose2d(2, 6, 3, groups=2),     # 54 codes
    }


def _example_input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(4, layer.in_features)
    return torch.randn(2, layer.in_channels, 6, 6)


def _bitstream_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """The packing as the README states it, written independently: unsigned codes, LSB first,
    through numpy's little-endian packbits."""
    unsigned = codes.astype(np.int64) + 2 ** (bits - 1)
    stream = (unsigned[:, None] >> np.arange(bits)) & 1
    return np.packbits(stream.astype(np.uint8).ravel(), bitorder="little")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [1, 2, 7, 8, 9, 15, 16, 17, 1001])
def test_packing_matches_the_documented_bit_stream(bits: int, count: int) -> None:
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), count).astype(np.int8)
    packed = packing.pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(packed, _bitstream_reference(codes, bits))
    np.testing.assert_array_equal(packing.unpack_codes(packed, bits, count), codes)


def test_four_bit_codes_are_nibbles_low_first() -> None:
    packed = packing.pack_codes(np.array([-8, 7, 0], np.int8), 4)
    assert packed.tolist() == [0x0 | (0xF << 4), 0x8]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("kind", list(_layers()))
def test_round_trip_is_exact(tmp_path: Path, kind: str, bits: int) -> None:
    torch.manual_seed(bits)
    model = nn.Sequential(_layers()[kind]).eval()
    qmodel = squant.quantize(model, bits=bits)
    path = tmp_path / "q.safetensors"
    squant.save(qmodel, path)

    state = squant.load(path)
    expected = squant.dequantize(qmodel).state_dict()
    assert list(state) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(state["0.weight"], qmodel[0].weight)

    loaded = squant.load(path, model)
    assert type(loaded[0]) is type(qmodel[0])
    for buffer in ("codes", "scale", "zero_point"):
        assert torch.equal(getattr(loaded[0], buffer), getattr(qmodel[0], buffer))
    x = _example_input(model[0])
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


class _Net(nn.Module):
    """Layers of every kind, BatchNorm buffers, a skipped layer and a layer reachable twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.deconv = nn.ConvTranspose2d(8, 4, 3, groups=2)
        self.head = nn.Linear(4 * 6 * 6, 10)
        self.same_head = self.head
        self.skipped = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.deconv(torch.relu(self.bn(self.conv(x))))
        return self.skipped(self.same_head(x.flatten(1)))


def _trained_net() -> _Net:
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("scheme, granularity", [("asymmetric", "channel"),
                                                 ("symmetric", "tensor")])
def test_model_round_trip(tmp_path: Path, scheme: str, granularity: str) -> None:
    net = _trained_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    qnet = squant.quantize(net, bits=4, skip=["skipped"], layer_bits={"conv": 6},
                           scheme=scheme, granularity=granularity)
    path = tmp_path / "net.safetensors"
    squant.save(qnet, path)

    loaded = squant.load(path, net)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), qnet(x))
    assert loaded.head is loaded.same_head
    assert isinstance(loaded.skipped, nn.Linear) and not isinstance(loaded.skipped,
                                                                     squant.nn.QuantizedModule)
    assert loaded.conv.bits == 6 and loaded.deconv.groups == 2
    assert loaded.conv.scheme == scheme and loaded.conv.granularity == granularity
    for name, tensor in net.state_dict().items():  # the model given is left untouched
        assert torch.equal(tensor, before[name]), name

    state = squant.load(path)
    expected = squant.dequantize(qnet).state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_original_dtype_is_kept(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(9, 5)).to(dtype)
    qmodel = squant.quantize(model, bits=3)
    squant.save(qmodel, tmp_path / "q.safetensors")
    state = squant.load(tmp_path / "q.safetensors")
    assert state["0.weight"].dtype == dtype and state["0.bias"].dtype == dtype
    assert torch.equal(state["0.weight"], qmodel[0].weight)
    assert squant.load(tmp_path / "q.safetensors", model)[0].weight_dtype == dtype


def _readme_reader():
    """The numpy reader of the README's "File format" section, executed as written."""
    section = README.read_text().split("## File format", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(code) == 1, "the File format section should hold one python snippet"
    namespace: dict = {}
    exec(code[0], namespace)
    return namespace["read_squant"]


def test_readme_numpy_reader_reads_the_file_exactly(tmp_path: Path) -> None:
    qnet = squant.quantize(_trained_net(), bits=3, skip=["skipped"])
    path = tmp_path / "net.safetensors"
    squant.save(qnet, path)
    arrays = _readme_reader()(path)
    state = squant.load(path)
    assert set(arrays) == set(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(arrays[name], tensor.numpy(), err_msg=name)


def test_header_and_layout(tmp_path: Path) -> None:
    qnet = squant.quantize(_trained_net(), bits=5)
    path = tmp_path / "net.safetensors"
    squant.save(qnet, path)
    with safe_open(str(path), framework="pt") as file:
        header = json.loads(file.metadata()["squant"])
        names = set(file.keys())
        codes = file.get_tensor("deconv.weight.codes")
        scale = file.get_tensor("deconv.weight.scale")
    assert header["format_version"] == 1  # no group-wise grid: older readers read it
    assert header["squant_version"] == squant.__version__
    assert header["tensors"]["deconv.weight"] == {
        "bits": 5, "mode": "KC", "axis": 1, "shape": [8, 2, 3, 3], "dtype": "float32",
        "scheme": "asymmetric", "granularity": "channel", "groups": 2,
        "range": "minmax"}
    assert {"conv.weight.codes", "conv.weight.scale", "conv.weight.zero_point", "conv.bias",
            "bn.running_var", "bn.num_batches_tracked"} <= names
    assert "conv.weight" not in names
    assert codes.dtype == torch.uint8 and codes.numel() == -(-8 * 2 * 9 * 5 // 8)
    assert scale.shape == (4,)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    offsets = {name: info["data_offsets"] for name, info in json.loads(raw[8 : 8 + size]).items()
               if name != "__metadata__"}
    data_start = 8 + size
    assert data_start % 8 == 0
    assert all((data_start + start) % 4 == 0 for name, (start, _) in offsets.items()
               if not name.endswith(".codes"))


def test_int4_file_is_small(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256))
    fp32 = tmp_path / "fp32.safetensors"
    save_file(model.state_dict(), str(fp32))
    int4 = tmp_path / "int4.safetensors"
    squant.save(squant.quantize(model, bits=4), int4)
    assert int4.stat().st_size <= 0.15 * fp32.stat().st_size


# ---------------------------------------------------------------------------------------------
# Refusals.


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "net.safetensors"
    squant.save(squant.quantize(_trained_net(), bits=4), path)
    return path


def _rewrite(source: Path, target: Path, edit) -> Path:
    """A copy of a squant file whose tensors and parsed squant header went through ``edit``."""
    with safe_open(str(source), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        metadata = file.metadata()
    header = json.loads(metadata["squant"])
    edit(tensors, header)
    save_file(tensors, str(target), metadata={**metadata, "squant": json.dumps(header)})
    return target


@pytest.mark.parametrize("corruption", ["truncated", "random", "empty", "header_only"])
def test_corrupt_files_are_refused(saved: Path, tmp_path: Path, corruption: str) -> None:
    raw = saved.read_bytes()
    content = {"truncated": raw[: len(raw) - 100], "random": np.random.bytes(5000),
               "empty": b"", "header_only": raw[:20]}[corruption]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(squant.QuantizationError, match="not a readable safetensors file"):
        squant.load(bad)


def test_plain_safetensors_is_not_a_squant_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(nn.Linear(3, 2).state_dict(), str(path))
    with pytest.raises(squant.QuantizationError, match="not a squant file"):
        squant.load(path)


def test_unknown_format_version_is_refused(saved: Path, tmp_path: Path) -> None:
    path = _rewrite(saved, tmp_path / "v3.safetensors",
                    lambda tensors, header: header.update(format_version=3))
    with pytest.raises(squant.QuantizationError, match="format version 3 is not supported"):
        squant.load(path)


@pytest.mark.parametrize("edit, message", [
    (lambda t, h: h["tensors"]["conv.weight"].update(bits=9), "bits must be in 2..8"),
    (lambda t, h: h["tensors"]["conv.weight"].update(shape=[8, 3, 3, 4]), "should be U8"),
    (lambda t, h: h["tensors"]["conv.weight"].pop("axis"), "missing key 'axis'"),
    (lambda t, h: h["tensors"]["conv.weight"].update(dtype="int8"), "dtype 'int8'"),
    (lambda t, h: h["tensors"]["deconv.weight"].update(groups=3), "groups 3 does not divide"),
    (lambda t, h: t.pop("conv.weight.scale"), "it is missing"),
])
def test_inconsistent_headers_are_refused(saved: Path, tmp_path: Path, edit, message) -> None:
    path = _rewrite(saved, tmp_path / "bad.safetensors", edit)
    with pytest.raises(squant.QuantizationError, match=message):
        squant.load(path)


def test_model_that_does_not_match_is_refused(saved: Path) -> None:
    other = _trained_net()
    other.head = nn.Linear(4 * 6 * 6, 7)
    other.same_head = other.head
    with pytest.raises(squant.QuantizationError, match="does not fit layer 'head'"):
        squant.load(saved, other)
    renamed = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(squant.QuantizationError, match="has no quantizable layer"):
        squant.load(saved, renamed)


def test_save_refuses_a_float_model_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(squant.QuantizationError, match="no quantized layer"):
        squant.save(nn.Linear(3, 2), tmp_path / "x.safetensors")
    qmodel = squant.quantize(nn.Sequential(nn.Linear(3, 2)), bits=4)
    qmodel.register_buffer("phase", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(squant.QuantizationError, match="cannot be stored"):
        squant.save(qmodel, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file(saved: Path) -> None:
    before = saved.read_bytes()
    qmodel = squant.quantize(nn.Sequential(nn.Linear(3, 2)), bits=4)
    qmodel.register_buffer("phase", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(squant.QuantizationError):
        squant.save(qmodel, saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 5))


def test_load_into_a_meta_skeleton_gives_a_working_model(tmp_path: Path) -> None:
    """``with torch.device("meta"): model = Net()`` allocates nothing; load fills it all."""
    torch.manual_seed(0)
    source = _small_net().eval()
    path = tmp_path / "q.safetensors"
    squant.save(squant.quantize(source, 4), path)
    with torch.device("meta"):
        skeleton = _small_net()
    loaded = squant.load(path, skeleton).eval()
    reference = squant.load(path, _small_net()).eval()
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert all(t.is_meta for t in skeleton.parameters())  # the skeleton itself is untouched
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(loaded(x), reference(x))


class _Masked(nn.Module):
    """A layer with a buffer no state_dict holds (not persistent)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("mask", torch.ones(3), persistent=False)


def test_a_meta_skeleton_the_file_does_not_fill_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.safetensors"
    squant.save(squant.quantize(_Masked(), 4), path)
    with torch.device("meta"):
        skeleton = _Masked()
    with pytest.raises(squant.QuantizationError, match=r"meta device .* does not hold mask"):
        squant.load(path, skeleton)
    squant.load(path, _Masked())  # built for real, the same file loads
