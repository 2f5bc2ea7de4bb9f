"""The markdown table and the PNG of ``bench/bench_transformers.py`` (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

METRICS = {"SmolLM2-135M": (("perplexity", "ppl", ".1f"),),
           "all-MiniLM-L6-v2": (("cosine", "cos", ".3f"), ("nn_agreement", "NN", ".3f"))}
SHORT = {"SmolLM2-135M": "SmolLM2", "all-MiniLM-L6-v2": "MiniLM"}


def _cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return ""
    if "skipped" in row:
        return "—"
    return format(row[key], fmt)


def markdown_table(rows: list[dict], bits: list[int]) -> str:
    """One line per method; per model its metric(s) at each bit width and the quantization time
    (seconds, wall) at each. '—': skipped or failed (the reason is printed and in the JSON)."""
    present = {r["model"] for r in rows}
    models = [m for m in METRICS if m in present]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    index = {(r["model"], r["method"], r["bits"]): r for r in rows}
    header = ["method"]
    for model in models:
        short = SHORT[model]
        header += [f"{short} {label} {b}b" for _, label, _ in METRICS[model] for b in bits]
        header += [f"{short} s {b}b" for b in bits]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method in methods:
        cells = [method]
        for model in models:
            for key, _, fmt in METRICS[model]:
                for b in bits:
                    row = index.get((model, method, 32 if method == "FP32" else b))
                    cells.append(_cell(row, key, fmt))
            for b in bits:
                row = index.get((model, method, b))
                cells.append("" if row is None or method == "FP32"
                             else _cell(row, "seconds", ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Metric vs bits per method, one panel per model and metric; FP32 as a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(model, key) for model in dict.fromkeys(r["model"] for r in rows)
              for key, _, _ in METRICS[model]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, (model, key) in zip(axes[0], panels):
        done = [r for r in rows if r["model"] == model and "skipped" not in r]
        labels = list(dict.fromkeys(r["method"] for r in done if r["method"] != "FP32"))
        for colour, method in enumerate(labels):
            points = sorted((r["bits"], r[key]) for r in done if r["method"] == method)
            style = {"RTN": "--", "SQuant": "-", "HQQ": ":", "quanto": "-.", "proto": "-"}
            family = next(r["family"] for r in done if r["method"] == method)
            ax.plot(*zip(*points), style.get(family, "-"), marker="o", label=method,
                    color=plt.cm.tab20(colour % 20))
        fp32 = [r[key] for r in done if r["method"] == "FP32"]
        if fp32:
            ax.axhline(fp32[0], color="grey", lw=1, label="FP32")
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_title(f"{model}: {key}")
        ax.set_xlabel("weight bits")
        ax.set_xticks(sorted({r["bits"] for r in done if r["bits"] < 32}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.png")
    fig.savefig(partial, dpi=90)
    plt.close(fig)
    partial.replace(path)
