"""Where grouped SQuant loses or wins against RTN, layer kind by layer kind, on real inputs.

For each kind of block Linear (q/k/v, o_proj, gate/up, down_proj of SmolLM2; query/key/value,
attention.output.dense, intermediate.dense, output.dense of MiniLM) and each method's weights
``Wq``, on the FP32 model's real inputs ``x`` of that layer (Jane Austen text):

- ``out_err``: ``sum ||(Wq - W) x||**2 / sum ||W x||**2`` (relative output error);
- ``mean_share``: the part of that error due to the inputs' mean ``mu`` (``||(Wq - W) mu||**2``
  per token over the total), the only part that CQ's zero error sum per group can remove;
- ``input_mean_energy``: ``||mu||**2 / E ||x||**2``, how much of the inputs is a shared mean.

    python bench/transformers_layers.py --bits 4 --group 64   # both models, 2 threads
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import requirements  # noqa: E402
import transformers_data as data  # noqa: E402
import transformers_methods as tm  # noqa: E402
import transformers_proto as proto  # noqa: E402


def kind(name: str) -> str:
    """A layer's kind: its name without the block prefix and index."""
    return re.sub(r"^(model\.layers|encoder\.layer)\.\d+\.", "", name)


@torch.no_grad()
def layer_stats(model: torch.nn.Module, forward, weights: dict[str, tm.Weights]) -> dict:
    """``{kind: {method: {out_err, mean_share}, "input_mean_energy": float}}`` over one
    ``forward()`` of ``model`` (FP32), each hook comparing every method's weight error."""
    sums: dict[str, dict[str, float]] = {}
    modules = dict(model.named_modules())
    hooks = []

    def hook(name: str):
        def run(module, inputs, _output):
            x = inputs[0].reshape(-1, module.in_features).float()
            mu = x.mean(0)
            s = sums.setdefault(kind(name), {})
            s["ref"] = s.get("ref", 0.0) + float((x @ module.weight.T).square().sum())
            s["x2"] = s.get("x2", 0.0) + float(x.square().sum())
            s["mu2"] = s.get("mu2", 0.0) + float(mu.square().sum()) * x.shape[0]
            for label, w in weights.items():
                d = w[name] - module.weight
                s[label] = s.get(label, 0.0) + float((x @ d.T).square().sum())
                s[label + "/mean"] = (s.get(label + "/mean", 0.0)
                                      + float((d @ mu).square().sum()) * x.shape[0])
        return run

    for name in next(iter(weights.values())):
        hooks.append(modules[name].register_forward_hook(hook(name)))
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for k, s in sums.items():
        out[k] = {"input_mean_energy": s["mu2"] / s["x2"]}
        for label in weights:
            out[k][label] = {"out_err": s[label] / s["ref"],
                             "mean_share": s[label + "/mean"] / max(s[label], 1e-30)}
    return out


def model_and_forward(key: str, novels: dict):
    """The FP32 model and a function running it on real text: 2 windows of 512 tokens
    (SmolLM2) or 128 sentences (MiniLM)."""
    if key == "smollm2":
        model, tokenizer = data.load_smollm2()
        ids = data.token_windows(tokenizer, novels, 1024)
        return model, lambda: [model(input_ids=ids[i:i + 1]) for i in range(ids.shape[0])]
    model, tokenizer = data.load_minilm()
    texts = data.sentences(novels, 128)
    return model, lambda: data.embed(model, tokenizer, texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    args = parser.parse_args(argv)
    requirements.exit_if_missing("transformers_layers.py", data.missing_requirements())
    torch.set_num_threads(2)
    novels = data.austen_novels()
    g, b = args.group, args.bits
    for key in args.models:
        model, forward = model_and_forward(key, novels)
        names = tm.block_linears(model)
        norms = proto.feeding_norms(model)
        weights = {f"RTN g{g}": tm.rtn(g)(model, names, b),
                   f"SQuant g{g}": tm.squant_model(g)(copy.deepcopy(model), names, b),
                   f"proto γ² g{g}": proto.proto_method(g, norms, True)(model, names, b)}
        stats = layer_stats(model, forward, weights)
        print(f"\n{key}, {b} bits: relative output error on real inputs (mean share of it); "
              "input mean energy")
        labels = list(weights)
        print("| layer kind | input mean energy | " + " | ".join(labels) + " |")
        print("|" + " --- |" * (len(labels) + 2))
        for k, s in stats.items():
            cells = [f"{s[m]['out_err']:.4f} ({s[m]['mean_share']:.2f})" for m in labels]
            print(f"| {k} | {s['input_mean_energy']:.3f} | " + " | ".join(cells) + " |")
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
