"""``range="search"``: per channel, the shrunk range whose SQuant codes reconstruct the weight
best. Never worse than minmax, deterministic, plumbed through the API, the model, the CLI and
the file header; the default stays minmax."""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from strategies import cases

import squant
from squant import cli
from squant.core.errors import QuantizationError
from squant.core.options import QuantOptions
from squant.demo_model import load_demo_model
from squant.io.file_format import QuantizedEntry
from squant.io.file_io import SquantReader
from squant.nn import QuantizedModule


def _channel_errors(weight: np.ndarray, q: squant.QuantizedTensor) -> np.ndarray:
    """Per output channel (axis 0): ``sum((W - (q + Z) / S)**2)`` in float64."""
    o = weight.shape[0]
    codes = q.codes.numpy().reshape(o, -1).astype(np.float64)
    scale = q.scale.numpy().astype(np.float64)[:, None]
    zero = q.zero_point.numpy().astype(np.float64)[:, None]
    diff = weight.reshape(o, -1).astype(np.float64) - (codes + zero) / scale
    return (diff * diff).sum(axis=1)


@settings(max_examples=80, deadline=None)
@given(cases(granularity=st.just("channel")))
def test_search_is_never_worse_than_minmax_per_channel(case) -> None:
    minmax = squant.quantize_weight(case.weight, case.bits, case.mode, scheme=case.scheme)
    search = squant.quantize_weight(case.weight, case.bits, case.mode, scheme=case.scheme,
                                    range="search")
    before = _channel_errors(case.weight, minmax)
    after = _channel_errors(case.weight, search)
    assert (after <= before * (1 + 1e-9)).all()
    n = 2 ** (case.bits - 1)
    low = -n if case.scheme == "asymmetric" else 1 - n
    assert int(search.codes.min()) >= low and int(search.codes.max()) <= n - 1
    same = (search.scale == minmax.scale).numpy()  # f = 1 kept: exactly minmax's result
    assert torch.equal(search.codes[same], minmax.codes[same])
    assert (search.range, minmax.range) == ("search", "minmax")


@pytest.mark.parametrize("mode", ["E", "KC"])
def test_search_codes_do_not_depend_on_the_thread_count(mode: str) -> None:
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((128, 64, 3, 3)).astype(np.float32),  # 74k elements
               rng.standard_t(3, size=(96, 512)).astype(np.float32)]  # 49k elements
    threads = numba.get_num_threads()
    try:
        results = []
        for count in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(count)
            results.append(squant.quantize_weights(weights, 4, mode, range="search"))
    finally:
        numba.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one.codes, two.codes)
        assert torch.equal(one.scale, two.scale)
        assert torch.equal(one.zero_point, two.zero_point)


def test_default_is_minmax() -> None:
    weight = np.random.default_rng(2).standard_normal((8, 4, 3, 3)).astype(np.float32)
    default = squant.quantize_weight(weight)
    explicit = squant.quantize_weight(weight, range="minmax")
    assert default.range == "minmax" and QuantOptions().range == "minmax"
    assert torch.equal(default.codes, explicit.codes)
    assert torch.equal(default.scale, explicit.scale)


def _model_error(qmodel: torch.nn.Module, model: torch.nn.Module) -> float:
    """Total squared error of the quantized weights against the float model's."""
    floats = dict(model.named_modules())
    total = 0.0
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantizedModule):
            diff = module.dequantize_weight().double() - floats[name].weight.detach().double()
            total += float((diff * diff).sum())
    return total


def test_search_lowers_the_demo_models_weight_error() -> None:
    model = load_demo_model()
    minmax = squant.quantize(model, 4)
    with pytest.warns(UserWarning, match="weight error alone"):  # the demo model is folded
        search = squant.quantize(model, 4, range="search")
    assert all(m.range == "search" for m in search.modules() if isinstance(m, QuantizedModule))
    assert _model_error(search, model) < _model_error(minmax, model)


def test_layer_options_can_ask_for_search() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    with pytest.warns(UserWarning, match="weight error alone"):
        qmodel = squant.quantize(model, 4, layer_options={"1": {"range": "search"}})
    assert (qmodel[0].range, qmodel[1].range) == ("minmax", "search")


def test_cli_range_search_is_recorded_in_the_header(capsys, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(16, 3, 3, 3), "fc.weight": torch.randn(10, 33)}
    source, out = tmp_path / "model.safetensors", tmp_path / "q.safetensors"
    save_file(state, str(source))
    assert cli.main(["quantize", str(source), str(out), "--range", "search", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    with SquantReader(out) as reader:
        assert {e.range for e in reader.entries.values()} == {"search"}
        for name, weight in state.items():
            got = reader.read_quantized(name)
            want = squant.quantize_weight(weight, 4, range="search")
            assert got.range == "search"
            assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)


def test_header_without_range_reads_as_minmax() -> None:
    entry = QuantizedEntry("w", 4, "KC", 0, (4, 3), torch.float32, range="search")
    raw = entry.to_json()
    assert raw["range"] == "search"
    assert QuantizedEntry.from_json("w", raw).range == "search"
    del raw["range"]
    assert QuantizedEntry.from_json("w", raw).range == "minmax"


def test_bad_ranges_are_refused() -> None:
    weight = np.ones((2, 3), np.float32)
    with pytest.raises(QuantizationError, match="unknown range 'mse'"):
        squant.quantize_weight(weight, range="mse")
    with pytest.raises(QuantizationError, match="granularity 'channel'"):
        squant.quantize_weight(weight, granularity="tensor", range="search")
