"""Group-wise grids through the model API, the quantized modules, the file format (version 2,
and version-1 files written before it existed) and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_storage import _readme_reader
from torch import nn

import squant
from squant import cli
from squant.core.report import layer_report
from squant.io import checkpoint_stats

V1 = Path(__file__).resolve().parent / "data" / "format_v1"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.deconv = nn.ConvTranspose2d(6, 4, 2, groups=2)
        self.fc1 = nn.Linear(4 * 6 * 6, 37)
        self.fc2 = nn.Linear(37, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.deconv(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net().eval()


OPTIONS = {"conv": {"group_size": 18}, "deconv": {"group_size": 8}}


def test_quantize_groups_every_layer_as_quantize_weight_does() -> None:
    """Each layer's codes, scale ``(O, n_groups)`` and zero point are ``quantize_weight``'s with
    its group size (per layer through ``layer_options``; ConvTranspose groups block by block);
    the model runs, ``dequantize`` gives the modules' weights, the input is untouched."""
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    qnet = squant.quantize(net, 4, group_size=16, layer_options=OPTIONS)
    for name in ("conv", "fc1", "fc2"):
        module, weight = getattr(qnet, name), getattr(net, name).weight
        size = OPTIONS.get(name, {}).get("group_size", 16)
        want = squant.quantize_weight(weight, 4, group_size=size)
        assert module.group_size == size and module.scale.shape == want.scale.shape
        assert torch.equal(module.codes, want.codes) and torch.equal(module.scale, want.scale)
        assert torch.equal(module.weight, want.dequantize())
    blocks = [squant.quantize_weight(b, 4, axis=1, group_size=8)
              for b in net.deconv.weight.detach().chunk(2, dim=0)]
    assert torch.equal(qnet.deconv.codes, torch.cat([b.codes for b in blocks]))
    assert torch.equal(qnet.deconv.scale, torch.cat([b.scale for b in blocks]))
    assert torch.equal(qnet.deconv.weight, torch.cat([b.dequantize() for b in blocks]))
    float_net = squant.dequantize(qnet)
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(float_net(x), qnet(x))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert "group_size=16" in repr(qnet.fc1)


def test_group_size_of_a_conv_that_is_not_whole_kernels_is_a_clear_error() -> None:
    with pytest.raises(squant.QuantizationError, match=r"layer 'conv' \(Conv2d\) weight: "
                       "group_size 16 is not a multiple of its kernel size 9"):
        squant.quantize(_net(), 4, group_size=16)


def test_state_dict_round_trip_refuses_out_of_range_codes() -> None:
    qnet = squant.quantize(_net(), 3, group_size=16, layer_options=OPTIONS)
    state = qnet.state_dict()
    assert state["fc1.scale"].shape == (37, 9)  # 144 inputs in 9 groups of 16
    fresh = squant.quantize(_net(), 3, group_size=16, layer_options=OPTIONS, mode="E")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.fc1.weight, qnet.fc1.weight)
    state["fc1.codes"] = state["fc1.codes"].clone().fill_(5)
    with pytest.raises(RuntimeError, match="fc1.codes hold values in 5..5"):
        fresh.load_state_dict(state)


def test_save_load_round_trip_of_grouped_layers(tmp_path: Path) -> None:
    """Format 2 stores ``group_size`` and ``(channels, n_groups)`` scales; loading into the
    model, loading as a float state_dict and the README's numpy reader give the same values."""
    net = _net()
    qnet = squant.quantize(net, 3, group_size=10, layer_options={
        **OPTIONS, "fc2": {"group_size": None, "bits": 5}})
    path = tmp_path / "g.safetensors"
    squant.save(qnet, path)
    with safe_open(str(path), framework="pt") as file:
        header = json.loads(file.metadata()["squant"])
        assert file.get_tensor("fc1.weight.scale").shape == (37, 15)
    assert header["format_version"] == 2
    assert header["tensors"]["fc1.weight"]["group_size"] == 10
    assert "group_size" not in header["tensors"]["fc2.weight"]
    loaded = squant.load(path, net)
    for key, value in qnet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.fc1.group_size == 10 and loaded.fc2.group_size is None
    state = squant.load(path)
    arrays = _readme_reader()(path)
    for name in ("conv", "deconv", "fc1", "fc2"):
        weight = getattr(qnet, name).weight
        assert torch.equal(state[f"{name}.weight"], weight)
        np.testing.assert_array_equal(arrays[f"{name}.weight"], weight.numpy())


def test_version_1_files_written_before_group_size_still_load() -> None:
    """``model_v1.safetensors`` was written by squant before format 2 (commit b3486a4) from
    ``float_model.pt``; it loads, as a model and as arrays, to what quantizing the float model
    per channel now gives, bit for bit."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5),
                        nn.ConvTranspose2d(5, 4, 2))
    net.load_state_dict(torch.load(V1 / "float_model.pt", weights_only=True))
    path = V1 / "model_v1.safetensors"
    with safe_open(str(path), framework="pt") as file:
        assert json.loads(file.metadata()["squant"])["format_version"] == 1
    now = squant.quantize(net, 3, layer_bits={"3": 5})
    loaded = squant.load(path, net)
    for key, value in now.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    old_state = load_file(str(V1 / "state_dict.safetensors"))
    fresh = squant.quantize(net, 3, layer_bits={"3": 5}, mode="E")
    fresh.load_state_dict(old_state)
    arrays = _readme_reader()(path)
    for name in ("0", "3", "4"):
        assert torch.equal(squant.load(path)[f"{name}.weight"], now.get_submodule(name).weight)
        assert torch.equal(fresh.get_submodule(name).weight, now.get_submodule(name).weight)
        np.testing.assert_array_equal(arrays[f"{name}.weight"],
                                      now.get_submodule(name).weight.numpy())


def test_report_counts_each_group_as_a_channel() -> None:
    """The statistics of a grouped weight are those of its groups as channels; the command
    line's streaming statistics agree with ``layer_report``'s."""
    torch.manual_seed(5)
    weight = torch.randn(6, 7, 3)
    q = squant.quantize_weight(weight, 3, mode="C", range="minmax", group_size=9)
    report = layer_report("w", "", weight.shape, [weight], [q], 0.0)
    whole = weight.reshape(6, 21)
    parts = [whole[:, :18].reshape(12, 3, 3), whole[:, 18:].reshape(6, 1, 3)]
    singles = [squant.quantize_weight(p, 3, mode="C", range=q.range) for p in parts]
    direct = layer_report("w", "", weight.shape, parts, singles, 0.0)
    assert report == direct
    assert report.channel_sum_squant_max <= 0.5 + 1e-6
    stats = checkpoint_stats.tensor_stats("w", weight, q)
    for field, value in stats.items():
        assert value == pytest.approx(getattr(report, field), rel=1e-9), field


def test_cli_group_size(capsys, tmp_path: Path) -> None:
    torch.manual_seed(2)
    state = {"fc.weight": torch.randn(24, 50), "fc.bias": torch.randn(24),
             "conv.weight": torch.randn(8, 4, 3, 3)}
    source, out, report = (tmp_path / "m.safetensors", tmp_path / "q.safetensors",
                           tmp_path / "r.json")
    save_file(state, str(source))
    assert cli.main(["quantize", str(source), str(out), "--group-size", "36",
                     "--report", str(report), "--quiet"]) == 0
    loaded = squant.load(out)
    for name in ("fc.weight", "conv.weight"):
        want = squant.quantize_weight(state[name], 4, group_size=36)
        assert torch.equal(loaded[name], want.dequantize())
    assert json.loads(report.read_text())["tensors"]["fc.weight"]["group_size"] == 36
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    assert "squant format 2" in capsys.readouterr().out
    assert cli.main(["quantize", str(source), str(tmp_path / "b.safetensors"),
                     "--group-size", "8"]) == 1
    assert "group_size 8 is not a multiple of its kernel size 9" in capsys.readouterr().err


def test_cli_streams_grouped_tensors_in_blocks_of_rows(capsys, monkeypatch, tmp_path: Path
                                                       ) -> None:
    """A grouped tensor larger than a chunk is quantized in blocks of rows: the file is the
    same byte for byte (its scales and zero points land at the rows' places)."""
    torch.manual_seed(4)
    source = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.randn(40, 30), "b.weight": torch.randn(16, 45)}, str(source))
    whole, chunked = tmp_path / "whole.safetensors", tmp_path / "chunked.safetensors"
    argv = ["--group-size", "8", "--bits", "3", "--quiet"]
    assert cli.main(["quantize", str(source), str(whole), *argv]) == 0
    monkeypatch.setattr(cli, "CHUNK_BYTES", 1000)
    assert cli.main(["quantize", str(source), str(chunked), *argv]) == 0
    assert chunked.read_bytes() == whole.read_bytes()
    state = squant.load(whole)
    want = squant.quantize_weight(load_file(str(source))["a.weight"], 3, group_size=8)
    assert torch.equal(state["a.weight"], want.dequantize())


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["tensors"]["fc1.weight"].update(group_size=1), "group_size must be >= 2"),
    (lambda h: h["tensors"]["fc1.weight"].update(group_size=12), "should be F32 of shape"),
    (lambda h: h["tensors"]["conv.weight"].update(group_size=20), "not a multiple of the kernel"),
    (lambda h: h.update(format_version=1), "group_size needs format version 2"),
])
def test_bad_group_sizes_in_a_file_are_refused(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "g.safetensors"
    squant.save(squant.quantize(_net(), 4, group_size=16, layer_options=OPTIONS), path)
    with safe_open(str(path), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        metadata = file.metadata()
    header = json.loads(metadata["squant"])
    edit(header)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, "squant": json.dumps(header)})
    with pytest.raises(squant.QuantizationError, match=message):
        squant.load(bad)
