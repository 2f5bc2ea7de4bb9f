"""Quantized embeddings (``squant.nn.QuantizedEmbedding``, ``QuantizedEmbeddingBag``) and a
weight tied across kinds (a GPT's ``wte`` Embedding and ``lm_head`` Linear).

Every output is compared with the float layer holding ``squant.dequantize``'s table, and every
table's codes with ``squant.quantize_weight`` of the same matrix (channels on axis 0).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import squant
from squant import nn as qnn


def _quantized(layer: nn.Module, bits: int = 4, mode: str = "KC") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left in float
        return squant.quantize(nn.Sequential(layer), bits, mode)[0]


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(1, 40), dim=st.integers(1, 12), bits=st.integers(2, 8),
       mode=st.sampled_from(["E", "K", "C", "KC"]), seed=st.integers(0, 2**16),
       padding=st.booleans(), int32=st.booleans())
def test_embedding_codes_are_quantize_weight_and_lookup_matches_the_float_table(
        vocab: int, dim: int, bits: int, mode: str, seed: int, padding: bool,
        int32: bool) -> None:
    torch.manual_seed(seed)
    layer = nn.Embedding(vocab, dim, padding_idx=vocab - 1 if padding else None)
    qlayer = _quantized(layer, bits, mode)
    expected = squant.quantize_weight(layer.weight.detach(), bits, mode, axis=0)
    assert isinstance(qlayer, qnn.QuantizedEmbedding)
    assert torch.equal(qlayer.codes, expected.codes)
    assert torch.equal(qlayer.scale, expected.scale)
    assert torch.equal(qlayer.zero_point, expected.zero_point)
    low = -(2 ** (bits - 1))
    assert low <= int(qlayer.codes.min()) and int(qlayer.codes.max()) <= -low - 1
    tokens = torch.randint(0, vocab, (3, 5), dtype=torch.int32 if int32 else torch.int64)
    table = expected.dequantize()
    assert torch.equal(qlayer(tokens), F.embedding(tokens.long(), table))
    assert torch.equal(squant.dequantize(qlayer)(tokens), qlayer(tokens))
    assert qlayer._cached_weight is None  # a lookup dequantizes rows, never the whole table


@pytest.mark.parametrize("max_norm, norm_type", [(0.5, 2.0), (1.0, 1.0), (0.2, 3.0)])
def test_embedding_max_norm_renormalizes_the_looked_up_rows_as_the_float_layer(
        max_norm: float, norm_type: float) -> None:
    torch.manual_seed(0)
    qlayer = _quantized(nn.Embedding(12, 6, max_norm=max_norm, norm_type=norm_type), 8)
    plain = squant.dequantize(qlayer)
    codes = qlayer.codes.clone()
    tokens = torch.tensor([[0, 3, 3, 11], [5, 0, 7, 2]])
    with torch.no_grad():
        out = qlayer(tokens)
        want = plain(tokens)  # renormalizes plain's table in place, as torch's layer does
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-7)
    norms = out.norm(p=norm_type, dim=-1)
    assert bool((norms <= max_norm * (1 + 1e-5)).all())
    assert torch.equal(qlayer.codes, codes)  # the codes are never renormalized
    assert torch.equal(qlayer(tokens), out)


@pytest.mark.parametrize("mode, layout", [
    (mode, layout) for mode in ("sum", "mean", "max")
    for layout in ("2d", "offsets", "last_offset", "weighted")
    if layout != "weighted" or mode == "sum"])  # per_sample_weights: mode="sum" only
@pytest.mark.parametrize("padding_idx", [None, 0, 4])
def test_embedding_bag_matches_the_float_bag(mode: str, padding_idx: int | None,
                                             layout: str) -> None:
    torch.manual_seed(1)
    layer = nn.EmbeddingBag(9, 5, mode=mode, padding_idx=padding_idx,
                            include_last_offset=layout == "last_offset")
    qlayer = _quantized(layer, 4)
    assert isinstance(qlayer, qnn.QuantizedEmbeddingBag) and qlayer.bag_mode == mode
    plain = squant.dequantize(qlayer)
    assert type(plain) is nn.EmbeddingBag and plain.mode == mode
    tokens = torch.tensor([4, 1, 0, 4, 4, 8, 2, 2, 0, 7])
    if layout == "2d":
        args = (tokens.view(2, 5),)
    elif layout == "offsets":
        args = (tokens, torch.tensor([0, 3, 3, 7]))  # an empty bag too
    elif layout == "last_offset":
        args = (tokens, torch.tensor([0, 2, 6, 10]))
    else:
        args = (tokens, torch.tensor([0, 4]), torch.rand(10))
    with torch.no_grad():
        assert torch.allclose(qlayer(*args), plain(*args), rtol=1e-6, atol=1e-6)
    assert qlayer._cached_weight is None


def test_tokens_out_of_range_raise_an_index_error() -> None:
    qlayer = _quantized(nn.Embedding(5, 3))
    with pytest.raises(IndexError, match="token ids must lie in 0..4"):
        qlayer(torch.tensor([1, 5]))
    with pytest.raises(IndexError, match="token ids must lie in 0..4"):
        qlayer(torch.tensor([-1, 2]))


class TinyGPT(nn.Module):
    """Token and learned position embeddings, one block, a head tied to the token table."""

    def __init__(self, vocab: int = 40, dim: int = 16, context: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        return self.lm_head(self.ln(x + self.mlp(x)))


def _gpt() -> TinyGPT:
    torch.manual_seed(3)
    return TinyGPT().eval()


def test_tied_embedding_and_head_share_one_set_of_codes() -> None:
    model = _gpt()
    tokens = torch.randint(0, 40, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qmodel = squant.quantize(model, 8, report=True)
    assert isinstance(qmodel.wte, qnn.QuantizedEmbedding)
    assert isinstance(qmodel.lm_head, qnn.QuantizedLinear)
    assert qmodel.wte.codes is qmodel.lm_head.codes
    assert qmodel.wte.scale is qmodel.lm_head.scale
    expected = squant.quantize_weight(model.wte.weight.detach(), 8)
    assert torch.equal(qmodel.wte.codes, expected.codes)
    report = qmodel.squant_report
    assert report.left_float == []
    assert [row.name for row in report.layers].count("wte, lm_head") == 1
    assert model.lm_head.weight is model.wte.weight  # the input model is untouched
    plain = squant.dequantize(qmodel)
    assert plain.lm_head.weight is plain.wte.weight  # still tied
    with torch.no_grad():
        out, want, ref = qmodel(tokens), plain(tokens), model(tokens)
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)
    assert (out - ref).abs().max() <= 0.03 * ref.abs().max()


def test_tied_weights_of_different_layouts_are_refused() -> None:
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.ConvTranspose1d(4, 4, 1))
    model[1].weight = model[0].weight
    with pytest.raises(squant.QuantizationError, match="read its output channels differently"):
        squant.quantize(model)


def test_gpt_save_load_and_state_dict_round_trips(tmp_path: Path) -> None:
    model, tokens = _gpt(), torch.randint(0, 40, (2, 8))
    qmodel = squant.quantize(model, 4)
    path = tmp_path / "gpt.safetensors"
    squant.save(qmodel, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        names = list(file.keys())
    assert "wte.weight.codes" in names and not any(n.startswith("lm_head") for n in names)
    for skeleton in (TinyGPT(), None):
        if skeleton is None:
            with torch.device("meta"):
                skeleton = TinyGPT()
        loaded = squant.load(path, skeleton)
        assert loaded.wte.codes is loaded.lm_head.codes  # tied again
        for (name, a), (_, b) in zip(qmodel.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        assert torch.equal(loaded(tokens), qmodel(tokens))
    fresh = squant.quantize(TinyGPT(), 4)
    fresh.load_state_dict(qmodel.state_dict())
    assert torch.equal(fresh(tokens), qmodel(tokens))
    state = squant.load(path)
    assert state["lm_head.weight"] is state["wte.weight"]
    assert torch.equal(state["wte.weight"], qmodel.wte.weight)


def test_embedding_bag_in_a_model_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(30, 8, mode="mean", padding_idx=2), nn.Linear(8, 3))
    tokens = torch.randint(0, 30, (4, 6))
    qmodel = squant.quantize(model, 8)
    path = tmp_path / "bag.safetensors"
    squant.save(qmodel, path)
    loaded = squant.load(path, model)
    assert isinstance(loaded[0], qnn.QuantizedEmbeddingBag) and loaded[0].bag_mode == "mean"
    assert torch.equal(loaded(tokens), qmodel(tokens))
    want = model(tokens).detach()
    assert (qmodel(tokens) - want).abs().max() <= 0.03 * want.abs().max()


def test_embedding_follows_dtype_and_device() -> None:
    qlayer = _quantized(nn.Embedding(10, 4), 4)
    tokens = torch.tensor([1, 9, 1])
    half = qlayer.to(torch.float64)
    assert half(tokens).dtype == torch.float64 and half.scale.dtype == torch.float32
    assert torch.equal(half(tokens), qlayer(tokens).double())
    if torch.cuda.is_available():
        on_cuda = qlayer.to("cuda")
        assert on_cuda(tokens.cuda()).is_cuda
        assert torch.equal(on_cuda(tokens.cuda()).cpu(), half(tokens).float())


def test_skip_matches_embeddings_by_name() -> None:
    model = _gpt()
    qmodel = squant.quantize(model, 4, skip="wpe", report=True)
    assert type(qmodel.wpe) is nn.Embedding and isinstance(qmodel.wte, qnn.QuantizedEmbedding)
    assert qmodel.squant_report.left_float == [("wpe.weight", "skipped")]


def test_tied_codes_stay_shared_after_to_and_save_once(tmp_path: Path) -> None:
    """``.to()``/``.half()``/``.cuda()`` move buffers in place, so tied layers keep one set of
    codes (and scales): ``squant.save`` still stores it once and ``dequantize`` keeps the tie."""
    qmodel = squant.quantize(_gpt(), 4).to(torch.float64)
    assert qmodel.wte.codes is qmodel.lm_head.codes
    assert qmodel.wte.scale is qmodel.lm_head.scale and qmodel.wte.scale.dtype == torch.float32
    assert qmodel.lm_head.weight.dtype == torch.float64
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        moved = qmodel.to(device)
        assert moved.wte.codes is moved.lm_head.codes and moved.wte.codes.device.type == device
        plain = squant.dequantize(moved)
        assert plain.wte.weight is plain.lm_head.weight
    path = tmp_path / "gpt.safetensors"
    squant.save(qmodel.cpu(), path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        assert not any(name.startswith("lm_head") for name in file.keys())
