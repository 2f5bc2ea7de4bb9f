"""What bench/accuracy.py and the search benches share: tasks, result rows, scoring, table lines.

Kept apart so that the scripts and the plots (``accuracy_plots.py``) import it, never each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Task:
    """A float model, its evaluation inputs, and its labels when they are known."""

    name: str
    model: nn.Module
    inputs: torch.Tensor
    labels: torch.Tensor | None
    bits: tuple[int, ...]
    ablations: dict[str, dict[str, int]]
    batchnorms: bool = False  # the model has its BatchNorms: bias correction can run


@dataclass(frozen=True)
class Row:
    """How one quantized model does against its FP32 reference."""

    model: str
    bits: int
    method: str
    accuracy: float | None
    agreement: float
    kl: float
    seconds: float


@dataclass(frozen=True)
class ActTask:
    """A task whose model also gets its activations quantized, with the calibration set-up."""

    task: Task
    variant: str
    input_shape: tuple[int, ...]
    calibration_batch: int
    calibration: torch.Tensor | None = None  # real images apart from task.inputs, in order


@dataclass(frozen=True)
class ActRow:
    """How one model with quantized weights and activations does against FP32."""

    model: str
    variant: str
    weight_bits: int
    act_bits: int
    act_range: str
    calibration_batch: int
    accuracy: float | None
    agreement: float
    kl: float
    seconds: float
    real_data: bool = False  # calibration_batch counts real images (else random inputs)


WEIGHTS_ONLY = "none"  # act_range of the reference rows that quantize the weights only


def logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The model's logits on all inputs, batched, channels-last, in inference mode."""
    model = model.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return torch.cat([
            model(batch.contiguous(memory_format=torch.channels_last))
            for batch in inputs.split(batch_size)
        ])


def compare(task: Task, reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Accuracy (when labelled), top-1 agreement with FP32, mean KL(FP32 || candidate)."""
    top1 = candidate.argmax(1)
    kl = F.kl_div(F.log_softmax(candidate, 1), F.log_softmax(reference, 1),
                  reduction="batchmean", log_target=True)
    accuracy = None if task.labels is None else (top1 == task.labels).double().mean().item()
    return {"accuracy": accuracy,
            "agreement": (top1 == reference.argmax(1)).double().mean().item(),
            "kl": float(kl)}


HEADER = (f"{'model':<22} {'bits':>4}  {'method':<28} {'accuracy':>8} {'agree':>8} "
          f"{'KL':>9} {'time':>9}")


def format_row(row: Row) -> str:
    """One aligned table line."""
    accuracy = "-" if row.accuracy is None else f"{row.accuracy:.2%}"
    bits = "fp32" if row.bits == 32 else str(row.bits)
    return (f"{row.model:<22} {bits:>4}  {row.method:<28} {accuracy:>8} {row.agreement:>8.2%} "
            f"{row.kl:>9.5f} {row.seconds * 1e3:>7.1f}ms")


ACT_HEADER = (f"{'model':<22} {'BN':<10} {'W/A':<5} {'range':<10} {'calib':>8} "
              f"{'accuracy':>8} {'agree':>8} {'KL':>9} {'time':>9}")


def format_act_row(row: ActRow) -> str:
    """One aligned line of the activation table (calib: random inputs or real images)."""
    accuracy = "-" if row.accuracy is None else f"{row.accuracy:.2%}"
    setting = (f"W{row.weight_bits}" if row.act_range == WEIGHTS_ONLY
               else f"W{row.weight_bits}A{row.act_bits}")
    calib = ("-" if row.act_range == WEIGHTS_ONLY
             else f"{row.calibration_batch} {'real' if row.real_data else 'rand'}")
    return (f"{row.model:<22} {row.variant:<10} {setting:<5} {row.act_range:<10} {calib:>8} "
            f"{accuracy:>8} {row.agreement:>8.2%} {row.kl:>9.5f} {row.seconds * 1e3:>7.0f}ms")


def check_calibration(rows: list[ActRow], count: int, settings: tuple[tuple[int, int], ...]
                      ) -> list[str]:
    """Per model and W/A pair: does the best data method with ``count`` images beat ``"bn"``
    (or ``"paper"`` where there is no ``"bn"`` row) in score, and which is it?"""
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        model_rows = [r for r in rows if r.model == model]
        for weight_bits, act_bits in settings:
            same = [r for r in model_rows
                    if (r.weight_bits, r.act_bits) == (weight_bits, act_bits)]
            rival = next((r for r in same if r.act_range == "bn"),
                         next((r for r in same if r.act_range == "paper"), None))
            ours = [r for r in same if r.real_data and r.calibration_batch == count]
            if rival is None or not ours:
                continue
            best = max(ours, key=lambda r: (act_score(r), -r.kl))
            verdict = "holds" if act_score(best) > act_score(rival) else "FAILS"
            lines.append(f"{model}, W{weight_bits}A{act_bits}: best with {count} images "
                         f"{best.act_range} {act_score(best):.2%} (KL {best.kl:.4f}) vs "
                         f"{rival.act_range} {act_score(rival):.2%} (KL {rival.kl:.4f}): "
                         f"{verdict}")
    return lines


def act_score(row: ActRow) -> float:
    """Accuracy where labels exist, else top-1 agreement with FP32."""
    return row.agreement if row.accuracy is None else row.accuracy
