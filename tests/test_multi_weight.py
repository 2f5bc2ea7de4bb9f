"""Layers with several weight matrices: ``nn.MultiheadAttention`` (and the Transformer layers
built on it) and ``nn.LSTM``/``nn.GRU``/``nn.RNN``.

Each quantized weight's codes are compared with ``squant.quantize_weight`` of the same matrix
(rows on axis 0), and each output with the float layer holding ``squant.dequantize``'s weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from zoo import MULTI_ZOO, ZooModel

import squant
from squant import nn as qnn


def _quietly_quantized(model: nn.Module, bits: int = 8, **options) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing may be left in float
        warnings.filterwarnings("ignore", "LSTM with projections")
        return squant.quantize(model, bits, **options)


def _assert_codes_are_quantize_weight(model: nn.Module, qlayer: nn.Module, bits: int) -> None:
    names = type(qlayer).weight_names(model)
    assert set(names) == set(qlayer.quantized_names)
    for name in names:
        expected = squant.quantize_weight(getattr(model, name).detach(), bits)
        child = qlayer.quantized_weights()[name]
        assert torch.equal(child.codes, expected.codes), name
        assert torch.equal(child.scale, expected.scale), name
        assert torch.equal(child.zero_point, expected.zero_point), name
        assert torch.equal(getattr(qlayer, name), expected.dequantize()), name


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


ATTENTION = {
    "plain": dict(embed_dim=16, num_heads=4),
    "kdim_vdim": dict(embed_dim=16, num_heads=2, kdim=8, vdim=6),
    "bias_kv_zero_attn": dict(embed_dim=12, num_heads=3, add_bias_kv=True, add_zero_attn=True),
    "no_bias_batch_first": dict(embed_dim=8, num_heads=2, bias=False, batch_first=True),
}


@pytest.mark.parametrize("config", ATTENTION.values(), ids=ATTENTION.keys())
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "causal", "padding", "is_causal"])
@pytest.mark.parametrize("grad", [False, True])
def test_attention_matches_the_float_layer_with_dequantized_weights(
        config: dict, need_weights: bool, masks: str, grad: bool) -> None:
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(**config).eval()
    qlayer = _quietly_quantized(layer, 4)
    assert isinstance(qlayer, qnn.QuantizedMultiheadAttention)
    assert isinstance(qlayer.out_proj, qnn.QuantizedLinear)
    _assert_codes_are_quantize_weight(layer, qlayer, 4)
    plain = squant.dequantize(qlayer)
    assert type(plain) is nn.MultiheadAttention and type(plain.out_proj) is type(layer.out_proj)
    batch, length, source = 3, 5, 5
    embed = config["embed_dim"]
    shape = (batch, length) if config.get("batch_first") else (length, batch)
    query = torch.randn(*shape, embed)
    key = torch.randn(*shape, config.get("kdim", embed))
    value = torch.randn(*shape, config.get("vdim", embed))
    kwargs: dict = {"need_weights": need_weights}
    if masks in ("causal", "is_causal"):
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
        kwargs["is_causal"] = masks == "is_causal"
    if masks == "padding":
        padding = torch.zeros(batch, source, dtype=torch.bool)
        padding[0, -2:] = True
        kwargs["key_padding_mask"] = padding
        kwargs["average_attn_weights"] = False
    with torch.set_grad_enabled(grad):
        out, weights = qlayer(query, key, value, **kwargs)
        want, want_weights = plain(query, key, value, **kwargs)
    assert _close(out, want) and _close(weights, want_weights)


def test_transformer_layers_have_every_attention_weight_quantized() -> None:
    torch.manual_seed(1)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0,
                                                               batch_first=True), 2,
                                    enable_nested_tensor=False).eval()
    decoder = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    model = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    qmodel = _quietly_quantized(model, 8, report=True)
    assert qmodel.squant_report.left_float == []
    attention = [m for m in qmodel.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attention) == 4
    assert all(isinstance(m, qnn.QuantizedMultiheadAttention) for m in attention)
    plain = squant.dequantize(qmodel)
    assert not any(squant.nn.base.is_quantized(m) for m in plain.modules())
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    for grad in (False, True):  # no_grad takes torch's fast paths, with grad the plain ones
        with torch.set_grad_enabled(grad):
            got = qmodel["decoder"](qmodel["encoder"](x, mask=mask, is_causal=True), memory)
            want = plain["decoder"](plain["encoder"](x, mask=mask, is_causal=True), memory)
            ref = model["decoder"](model["encoder"](x, mask=mask, is_causal=True), memory)
        assert _close(got, want)
        assert (got - ref).abs().max() <= 0.03 * ref.abs().max()


RECURRENT = {
    "lstm_2_layers_bidirectional_proj": lambda: nn.LSTM(6, 8, 2, bidirectional=True,
                                                        proj_size=3),
    "lstm_batch_first_no_bias": lambda: nn.LSTM(6, 5, batch_first=True, bias=False),
    "gru_bidirectional": lambda: nn.GRU(6, 7, 2, bidirectional=True),
    "rnn_relu": lambda: nn.RNN(6, 4, 3, nonlinearity="relu"),
}


def _outputs(result) -> list[torch.Tensor]:
    output, hidden = result
    output = output.data if hasattr(output, "batch_sizes") else output
    return [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]


@pytest.mark.parametrize("factory", RECURRENT.values(), ids=RECURRENT.keys())
@pytest.mark.parametrize("cache_weights", [True, False])
def test_recurrent_layers_match_the_float_layer_with_dequantized_weights(
        factory, cache_weights: bool) -> None:
    torch.manual_seed(2)
    layer = factory().eval()
    qlayer = _quietly_quantized(layer, 4, cache_weights=cache_weights)
    assert type(qlayer).__name__ == f"Quantized{type(layer).__name__}"
    _assert_codes_are_quantize_weight(layer, qlayer, 4)
    names = [n for n, _ in layer.named_parameters() if n.startswith("weight_")]
    assert sorted(names) == sorted(qlayer.quantized_names)
    plain = squant.dequantize(qlayer)
    assert type(plain) is type(layer)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in layer.named_parameters()]
    x = torch.randn(4, 3, 6)
    lengths = torch.tensor([4, 3, 2])
    packed = pack_padded_sequence(x.transpose(0, 1) if layer.batch_first else x, lengths,
                                  batch_first=layer.batch_first)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LSTM with projections")
        for inputs in (x, packed):
            got, want = _outputs(qlayer(inputs)), _outputs(plain(inputs))
            assert all(_close(a, b) for a, b in zip(got, want))
            ref = _outputs(layer(inputs))[0]
            assert (got[0] - ref).abs().max() <= 0.2 * ref.abs().max()


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["LSTM", "GRU", "RNN"]), inputs=st.integers(1, 9),
       hidden=st.integers(1, 9), layers=st.integers(1, 2), bidirectional=st.booleans(),
       bits=st.integers(2, 8), mode=st.sampled_from(["E", "K", "C", "KC"]),
       seed=st.integers(0, 2**16))
def test_every_recurrent_matrix_is_quantize_weight_of_it(kind: str, inputs: int, hidden: int,
                                                         layers: int, bidirectional: bool,
                                                         bits: int, mode: str,
                                                         seed: int) -> None:
    torch.manual_seed(seed)
    layer = getattr(nn, kind)(inputs, hidden, layers, bidirectional=bidirectional)
    qlayer = _quietly_quantized(layer, bits, mode=mode)
    for name in qlayer.quantized_names:
        expected = squant.quantize_weight(getattr(layer, name).detach(), bits, mode)
        assert torch.equal(qlayer.quantized_weights()[name].codes, expected.codes), name
        low = -(2 ** (bits - 1))
        codes = qlayer.quantized_weights()[name].codes
        assert low <= int(codes.min()) and int(codes.max()) <= -low - 1


class Seq2Seq(nn.Module):
    """An LSTM encoder, a self-attention block and a GRU decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(8, 8, 2, bidirectional=True, proj_size=4, batch_first=True)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.decoder = nn.GRU(8, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.encoder(x)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        out, _ = self.decoder(h)
        return self.head(out)


def test_state_dict_save_load_and_meta_skeleton_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model, x = Seq2Seq().eval(), torch.randn(2, 5, 8)
    qmodel = _quietly_quantized(model, 4)
    with torch.no_grad():
        want = qmodel(x)
    fresh = _quietly_quantized(Seq2Seq().eval(), 4)
    fresh.load_state_dict(qmodel.state_dict())
    path = tmp_path / "seq2seq.safetensors"
    squant.save(qmodel, path)
    state = squant.load(path)
    assert torch.equal(state["attention.in_proj_weight"], qmodel.attention.in_proj_weight)
    assert torch.equal(state["encoder.weight_hr_l1_reverse"],
                       qmodel.encoder.weight_hr_l1_reverse)
    with torch.device("meta"):
        skeleton = Seq2Seq()
    loaded = [fresh, squant.load(path, Seq2Seq()), squant.load(path, skeleton)]
    for other in loaded:
        other.eval()
        state, other_state = qmodel.state_dict(), other.state_dict()
        assert list(state) == list(other_state)
        for name, tensor in state.items():
            assert torch.equal(tensor, other_state[name]), name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LSTM with projections")
            assert torch.equal(other(x), want)


def test_a_file_missing_one_of_a_layers_weights_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.GRU(4, 4))
    path = tmp_path / "gru.safetensors"
    qmodel = _quietly_quantized(model, 4)
    squant.save(qmodel, path)
    other = nn.Sequential(nn.GRU(4, 4, 2))  # two layers: the file has only layer 0's weights
    with pytest.raises(squant.QuantizationError, match="not weight_ih_l1, weight_hh_l1"):
        squant.load(path, other)


def test_dtype_device_and_inference_mode() -> None:
    torch.manual_seed(5)
    model, x = Seq2Seq().eval(), torch.randn(2, 5, 8)
    qmodel = _quietly_quantized(model, 8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LSTM with projections")
        with torch.inference_mode():
            first = qmodel(x)
        again = qmodel(x)  # autograd-recorded, after weights cached in inference mode
        # Not bit for bit: MultiheadAttention takes torch's fused fast path in inference mode.
        torch.testing.assert_close(again.detach(), first, rtol=1e-6, atol=1e-6)
        double = qmodel.to(torch.float64)
        assert double.encoder.weight_ih_l0.dtype == torch.float64
        assert double.encoder.quantized_weights()["weight_ih_l0"].scale.dtype == torch.float32
        assert torch.allclose(double(x.double()).float(), first, atol=1e-5)
        if torch.cuda.is_available():
            on_cuda = qmodel.float().cuda()
            assert torch.allclose(on_cuda(x.cuda()).cpu(), first, atol=1e-4)


def test_report_names_each_weight_and_skip_matches_by_layer_name() -> None:
    torch.manual_seed(6)
    qmodel = _quietly_quantized(Seq2Seq().eval(), 4, report=True)
    names = {row.name for row in qmodel.squant_report.layers}
    assert {"attention.in_proj_weight", "attention.out_proj", "encoder.weight_ih_l0",
            "encoder.weight_hr_l1_reverse", "decoder.weight_hh_l0", "head"} <= names
    assert len(names) == 12 + 2 + 2 + 1  # LSTM 12 matrices, attention 2, GRU 2, head
    skipped = squant.quantize(Seq2Seq().eval(), 4, skip=["encoder", "attention"], report=True)
    assert type(skipped.encoder) is nn.LSTM and type(skipped.attention) is nn.MultiheadAttention
    left = dict(skipped.squant_report.left_float)
    assert left["encoder.weight_ih_l0"] == "skipped"
    assert left["attention.in_proj_weight"] == "skipped"


multi_zoo = pytest.mark.parametrize("entry", MULTI_ZOO, ids=lambda entry: entry.name)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LSTM with projections")
        return model(x)


def _float_matrices(model: nn.Module) -> set[str]:
    return {name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and tensor.dim() >= 2}


@multi_zoo
def test_zoo_every_matrix_quantized_output_close_and_input_untouched(entry: ZooModel) -> None:
    model, x = entry.build(), entry.example()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    qmodel = _quietly_quantized(model, 8, report=True)
    assert qmodel.squant_report.left_float == []
    assert _float_matrices(qmodel) == set()  # every float matrix became codes
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    want = _run(model, x)
    assert (_run(qmodel, x) - want).abs().max() <= 0.03 * want.abs().max()
    plain = squant.dequantize(qmodel)
    assert not any(squant.nn.base.is_quantized(m) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == types
    assert list(plain.state_dict()) == list(before)
    assert _close(_run(plain, x), _run(qmodel, x))


@multi_zoo
def test_zoo_state_dict_save_and_load_round_trips_are_bit_exact(entry: ZooModel,
                                                                tmp_path: Path) -> None:
    model, x = entry.build(), entry.example()
    qmodel = _quietly_quantized(model, 4)
    want = _run(qmodel, x)
    path = tmp_path / f"{entry.name}.safetensors"
    squant.save(qmodel, path)
    fresh = _quietly_quantized(entry.build(seed=9), 4)
    fresh.load_state_dict(qmodel.state_dict())
    with torch.device("meta"):
        skeleton = entry.factory()
    for other in (fresh, squant.load(path, entry.build(seed=9)), squant.load(path, skeleton)):
        other.eval()
        state, other_state = qmodel.state_dict(), other.state_dict()
        assert list(state) == list(other_state)
        assert all(torch.equal(state[k], other_state[k]) for k in state)
        assert torch.equal(_run(other, x), want)
        if hasattr(other, "lm_head"):  # tied stays tied: one set of codes
            assert other.lm_head.codes is other.wte.codes


def test_a_checkpoint_quantized_by_the_command_line_loads_into_attention_layers(
        capsys, tmp_path: Path) -> None:
    """``squant quantize`` quantizes every ``*weight`` matrix (``in_proj_weight``,
    ``q_proj_weight``, ...; the LSTM's ``weight_ih_l0`` does not end in ``weight`` and stays
    float): ``squant.load`` gives the same attention layers as ``squant.quantize``."""
    from squant import cli

    def build() -> nn.Module:
        return nn.ModuleDict({"block": nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0),
                              "cross": nn.MultiheadAttention(8, 2, kdim=4, vdim=4),
                              "lstm": nn.LSTM(8, 8)}).eval()

    torch.manual_seed(7)
    model = build()
    source, out = tmp_path / "model.pt", tmp_path / "q.safetensors"
    torch.save(model.state_dict(), source)
    assert cli.main(["quantize", str(source), str(out), "--quiet"]) == 0
    capsys.readouterr()
    loaded = squant.load(out, build())
    assert isinstance(loaded["block"].self_attn, qnn.QuantizedMultiheadAttention)
    assert isinstance(loaded["cross"], qnn.QuantizedMultiheadAttention)
    assert type(loaded["lstm"]) is nn.LSTM
    qmodel = squant.quantize(model, 4, skip="lstm")
    x, kv = torch.randn(3, 2, 8), torch.randn(3, 2, 4)
    with torch.no_grad():
        assert torch.equal(loaded["block"](x), qmodel["block"](x))
        assert torch.equal(loaded["cross"](x, kv, kv)[0], qmodel["cross"](x, kv, kv)[0])
