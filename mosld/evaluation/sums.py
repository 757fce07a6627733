"""Per-task sums of an evaluation epoch and the metrics made of them, for multiple-choice and generation tasks.

Each sum is a float64 tensor with one entry per task (the evaluation dataloader index), so one reduction
across ranks covers every task of either kind. A multiple-choice task fills the accuracy and answer-loss sums;
a generation task fills ``score`` and ``score_sq`` (the per-item metric in [0, 1] and its square), from which
its mean and 95% interval follow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class Scoring(NamedTuple):
    """One way of picking a multiple-choice item's answer, under each of its names."""

    key: str  # score_batch's per-item 0/1 and the sum it adds to
    result: str  # its name in mosld.evaluate's result
    logged: str  # its name in the logged metrics: {stage}/{task}/{logged}


# The multiple-choice scorings (``mosld.evaluation.multiple_choice.score_batch``): summed log-likelihood, per
# character of the answer (the headline, also summed as ``correct`` and logged as ``acc``), per answer token.
MC_SCORINGS = (
    Scoring("correct_sum", "accuracy_sum", "acc_sum"),
    Scoring("correct_norm", "accuracy_norm", "acc_norm"),
    Scoring("correct_token_norm", "accuracy_token_norm", "acc_token_norm"),
)
HEADLINE = "accuracy_norm"  # mosld.evaluate's headline multiple-choice scoring
SCORINGS = {s.result: s.key for s in MC_SCORINGS}  # mosld.evaluate's name -> per-item key
GENERATE_HEADLINE = "accuracy_generate"  # mosld.evaluate(method="generate"): the generated text names the choice
MC_SUMS = ("correct", *(s.key for s in MC_SCORINGS), "gold_loss_sum", "gold_tokens")
SUMS = ("items", *MC_SUMS, "score", "score_sq")
Z95 = 1.96


def new_sums(num_tasks: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Zeroed sums for ``num_tasks`` tasks."""
    return {k: torch.zeros(num_tasks, dtype=torch.float64, device=device) for k in SUMS}


def add_multiple_choice(sums: dict[str, Tensor], task: int, scores: Mapping[str, Tensor]) -> None:
    """Add one multiple-choice batch (``mosld.evaluation.score_batch``'s per-item results) to task ``task``."""
    sums["items"][task] += scores["correct"].numel()
    for key in MC_SUMS:
        sums[key][task] += scores[key].sum().double()


def add_generation(sums: dict[str, Tensor], task: int, scores: Tensor) -> None:
    """Add one generation batch's per-item scores (in [0, 1]) to task ``task``."""
    scores = scores.double()
    sums["items"][task] += scores.numel()
    sums["score"][task] += scores.sum()
    sums["score_sq"][task] += (scores * scores).sum()


def interval95(total: float, total_sq: float, n: float) -> float:
    """Half-width of the normal 95% interval of a mean of ``n`` scores, from their sum and sum of squares:
    ``1.96 sqrt(var / n)`` with the plug-in variance ``mean(x^2) - mean(x)^2``, which for 0/1 scores is
    ``p (1 - p)``: the same binomial interval as multiple-choice accuracy."""
    mean = total / n
    variance = max(total_sq / n - mean * mean, 1e-12)
    return Z95 * math.sqrt(variance / n)


def eval_metrics(stage: str, tasks: Sequence[str], sums: Mapping[str, Tensor],
                 metric_names: Mapping[int, str]) -> dict[str, float]:  # fmt: skip
    """The logged metrics of an evaluation epoch from its (rank-reduced) sums.

    Args:
        stage: ``val`` or ``test``.
        tasks: Task names, by task index.
        sums: ``new_sums``' tensors, reduced over ranks.
        metric_names: Task index -> metric name for the generation tasks; every other task is multiple choice.

    Multiple-choice tasks give ``{stage}/{task}/acc`` (+ ``_ci95``, ``acc_sum``, ``acc_norm``, ``acc_token_norm``,
    ``items``, ``answer_loss``) and, over them, ``{stage}/acc_avg`` (+ ``_ci95``) and ``{stage}/answer_loss``;
    generation tasks ``{stage}/{task}/{metric}`` (+ ``_ci95``, ``items``). With any generation task,
    ``{stage}/score_avg`` (+ ``_ci95``) is the macro average of every task's headline (accuracy or metric).
    A run of multiple-choice tasks only logs exactly the keys it always did.
    """
    metrics: dict[str, float] = {}
    headline: list[tuple[float, float]] = []  # (value, ci95) per task
    mc: list[tuple[float, float]] = []
    for i, task in enumerate(tasks):
        n = float(sums["items"][i])
        if n == 0:
            raise RuntimeError(f"{stage}: task {task!r} has no evaluation items")
        metric = metric_names.get(i)
        if metric is not None:
            value = float(sums["score"][i]) / n
            ci = interval95(float(sums["score"][i]), float(sums["score_sq"][i]), n)
            metrics[f"{stage}/{task}/{metric}"] = value
            metrics[f"{stage}/{task}/{metric}_ci95"] = ci
            metrics[f"{stage}/{task}/items"] = n
            headline.append((value, ci))
            continue
        acc = float(sums["correct"][i]) / n
        ci = Z95 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)
        metrics[f"{stage}/{task}/acc"] = acc
        metrics[f"{stage}/{task}/acc_ci95"] = ci
        for scoring in MC_SCORINGS:
            metrics[f"{stage}/{task}/{scoring.logged}"] = float(sums[scoring.key][i]) / n
        metrics[f"{stage}/{task}/items"] = n
        metrics[f"{stage}/{task}/answer_loss"] = float(sums["gold_loss_sum"][i]) / max(
            float(sums["gold_tokens"][i]), 1.0
        )
        headline.append((acc, ci))
        mc.append((acc, ci))
    if mc:
        metrics[f"{stage}/acc_avg"], metrics[f"{stage}/acc_avg_ci95"] = macro_average(mc)
    if len(mc) < len(headline):
        metrics[f"{stage}/score_avg"], metrics[f"{stage}/score_avg_ci95"] = macro_average(headline)
    if mc:  # generation tasks hold zeros here
        metrics[f"{stage}/answer_loss"] = float(sums["gold_loss_sum"].sum()) / max(
            float(sums["gold_tokens"].sum()), 1.0
        )
    return metrics


def macro_average(values: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Mean of per-task values and its 95% half-width (tasks are independent samples)."""
    mean = sum(v for v, _ in values) / len(values)
    return mean, math.sqrt(sum(ci**2 for _, ci in values)) / len(values)


def headline_key(stage: str, metrics: Mapping[str, float]) -> str:
    """The key a run's headline average is logged under: ``{stage}/acc_avg`` when the run has multiple-choice
    tasks only, else ``{stage}/score_avg``."""
    return f"{stage}/score_avg" if f"{stage}/score_avg" in metrics else f"{stage}/acc_avg"
