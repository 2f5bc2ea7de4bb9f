"""Benchmark: how much of a model's weights ``squant.quantize`` quantizes, and how fast.

For each model (random weights, eval mode, 4-bit, mode KC) prints:
- the float weight matrices (distinct floating Parameters of 2+ dims, tied ones once), in
  millions of elements;
- the fraction of them quantized *before* (the layer kinds squant 0.x quantized: Linear, Conv,
  ConvTranspose and their subclasses such as attention's ``out_proj``) and *after* (every
  weight ``squant.quantize`` quantizes now: also Embedding(Bag), MultiheadAttention's input
  projections, LSTM/GRU/RNN matrices);
- the warm median time of ``squant.quantize`` and of numpy per-channel round-to-nearest of
  the same weights (``bench_kernels.numpy_rtn``), and their ratio.

Run: ``python bench/bench_coverage.py [--repeats 3] [--zoo]`` (``--zoo``: also the tiny models
of tests/zoo.py); the thread count is numba's.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see PERFORMANCE_NOTES.md

import sys
import warnings
from pathlib import Path

import numba
import torch
from torch import nn

import squant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import median_times, numpy_rtn  # noqa: E402

BITS = 4
_BEFORE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d)


class GPT(nn.Module):
    """GPT-2's layout: token and position tables, pre-norm causal blocks, a tied head."""

    def __init__(self, vocab: int, dim: int, layers: int, context: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, dim // 64, 4 * dim, dropout=0.0, batch_first=True,
                                       norm_first=True, activation="gelu")
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight


class LSTMLanguageModel(nn.Module):
    """An embedding, a 2-layer LSTM and an (untied) output layer."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, 2)
        self.out = nn.Linear(dim, vocab)


class Seq2SeqTransformer(nn.Module):
    """``nn.Transformer`` (encoder and decoder) with source and target embeddings."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.src = nn.Embedding(vocab, dim)
        self.tgt = nn.Embedding(vocab, dim)
        self.transformer = nn.Transformer(dim, 4, 2, 2, 2 * dim, dropout=0.0)
        self.out = nn.Linear(dim, vocab)


class BiGRUTagger(nn.Module):
    """A bag-of-words feature (EmbeddingBag), token embeddings, a bidirectional GRU, a head."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.embed = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, 2, bidirectional=True)
        self.tags = nn.Linear(2 * dim, 20)


MODELS = {
    "GPT (6x384, vocab 8k)": lambda: GPT(8192, 384, 6, 256),
    "LSTM LM (2x512, vocab 10k)": lambda: LSTMLanguageModel(10000, 512),
    "nn.Transformer (2+2 x 256, vocab 8k)": lambda: Seq2SeqTransformer(8192, 256),
    "BiGRU tagger (2x256, vocab 20k)": lambda: BiGRUTagger(20000, 256),
}


def matrices(model: nn.Module) -> dict[int, nn.Parameter]:
    """The distinct floating Parameters of 2+ dims."""
    return {id(p): p for p in model.parameters() if p.is_floating_point() and p.dim() >= 2}


def before(model: nn.Module) -> set[int]:
    """The Parameters the layer kinds squant quantized before quantize (Linear, Conv, ...)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, _BEFORE)}


def after(model: nn.Module) -> int:
    """Elements ``squant.quantize`` quantizes now: its distinct codes tensors."""
    qmodel = squant.quantize(model, BITS)
    codes = {id(m.codes): m.codes for m in qmodel.modules()
             if isinstance(m, (squant.nn.QuantizedModule, squant.nn.QuantizedWeight))}
    return sum(c.numel() for c in codes.values())


def zoo_models() -> dict:
    """The test zoo's models (tests/zoo.py), by name."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from zoo import MULTI_ZOO, ZOO

    return {f"zoo: {entry.name}": entry.build for entry in (*ZOO, *MULTI_ZOO)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zoo", action="store_true", help="also the test zoo's tiny models")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    models = {**MODELS, **(zoo_models() if args.zoo else {})}
    print(f"{BITS}-bit KC, {numba.get_num_threads()} numba threads, torch "
          f"{torch.get_num_threads()} threads; times: warm median of {args.repeats}")
    header = ("model", "matrices (M)", "before", "after", "quantize s", "RTN s", "ratio")
    rows = [header]
    for name, factory in models.items():
        torch.manual_seed(0)
        model = factory().eval()
        found = matrices(model)
        total = sum(p.numel() for p in found.values())
        old = sum(found[k].numel() for k in before(model) if k in found)
        new = after(model)
        weights = [p.detach().numpy() for p in found.values()]
        times = median_times({"squant": lambda m=model: squant.quantize(m, BITS),
                              "rtn": lambda w=weights: numpy_rtn(w, BITS)}, args.repeats)
        rows.append((name, f"{total / 1e6:.2f}", f"{old / total:.0%}", f"{new / total:.0%}",
                     f"{times['squant']:.3f}", f"{times['rtn']:.3f}",
                     f"{times['squant'] / times['rtn']:.1f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
