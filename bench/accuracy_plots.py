"""The PNG plots of ``bench/accuracy.py`` (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from accuracy_rows import ActRow, Row

# RTN wide and dashed: SQuant E gives the same values and is drawn over it.
RTN_STYLE = {"color": "black", "linewidth": 4, "linestyle": "--", "alpha": 0.35}


def plot(rows: list[Row], path: Path) -> None:
    """Metric vs bits per method: one row of panels per model (score, then KL, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for (score_ax, kl_ax), model in zip(axes, models):
        model_rows = [r for r in rows if r.model == model]
        labelled = model_rows[0].accuracy is not None
        for method in dict.fromkeys(r.method for r in model_rows if r.method != "FP32"):
            points = sorted((r.bits, r) for r in model_rows if r.method == method)
            bits = [b for b, _ in points]
            scores = [100 * (r.accuracy if labelled else r.agreement) for _, r in points]
            style = RTN_STYLE if method == "RTN" else {"marker": "o"}
            score_ax.plot(bits, scores, label=method, **style)
            kl_ax.plot(bits, [max(r.kl, 1e-6) for _, r in points], label=method, **style)
        fp32 = model_rows[0]
        if labelled:
            score_ax.axhline(100 * fp32.accuracy, color="grey", ls="--", label="FP32")
        score_ax.set_ylabel("test accuracy (%)" if labelled else "top-1 agreement with FP32 (%)")
        kl_ax.set_ylabel("mean KL(FP32 || quantized)")
        kl_ax.set_yscale("log")
        for ax in (score_ax, kl_ax):
            ax.set_title(model)
            ax.set_xlabel("weight bits")
            ax.set_xticks(sorted({r.bits for r in model_rows if r.bits < 32}))
            ax.grid(alpha=0.3)
        score_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_act(rows: list[ActRow], path: Path) -> None:
    """Score per W/A setting, one bar per range rule, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    ranges = list(dict.fromkeys(r.act_range for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        model_rows = [r for r in rows if r.model == model]
        labelled = model_rows[0].accuracy is not None
        settings = list(dict.fromkeys((r.weight_bits, r.act_bits) for r in model_rows))
        width = 0.8 / len(ranges)
        for i, act_range in enumerate(ranges):
            found = {(r.weight_bits, r.act_bits): r for r in model_rows
                     if r.act_range == act_range}
            scores = [100 * (found[s].accuracy if labelled else found[s].agreement)
                      for s in settings]
            ax.bar(np.arange(len(settings)) + (i - (len(ranges) - 1) / 2) * width, scores,
                   width, label=f'act_range="{act_range}"')
        ax.set_xticks(range(len(settings)), [f"W{w}A{a}" for w, a in settings])
        ax.set_ylabel("test accuracy (%)" if labelled else "top-1 agreement with FP32 (%)")
        ax.set_title(f"{model} ({model_rows[0].variant}), KC weights")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
