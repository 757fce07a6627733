"""What a record's task results are read as, for multiple-choice and generation tasks alike.

A multiple-choice task's headline is its accuracy (``acc``); a generation task's is its metric (exact match,
token F1, ...). Per item, ``correct`` is 0/1 for multiple choice and the item's score in [0, 1] for generation
(where ``score`` holds it too), so the paired statistics take either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..evaluation.sums import HEADLINE, MC_SCORINGS

# Generation metrics in the order a task's headline is looked for (mosld.evaluation.metrics.METRICS's names).
GENERATION_METRICS = ("exact_match", "set_match", "final_number", "token_f1", "squad_exact_match", "rouge_l")
# A record's averaged multiple-choice accuracies, under their logged names: the headline scoring (per character,
# logged as ``acc``), then the sum of log-likelihoods and per token (the headline's own ``acc_norm`` repeats ``acc``).
RECORD_SCORINGS = ("acc", *(s.logged for s in MC_SCORINGS if s.result != HEADLINE))


def headline_metric(task_metrics: Mapping[str, object]) -> str:
    """The name of a task's headline metric among its results: ``acc`` for a multiple-choice task, else the
    first of ``GENERATION_METRICS`` present."""
    if "acc" in task_metrics:
        return "acc"
    for name in GENERATION_METRICS:
        if name in task_metrics:
            return name
    raise ValueError(f"no headline metric (acc or one of {', '.join(GENERATION_METRICS)}) in {sorted(task_metrics)}")


def headline(task_metrics: Mapping[str, object]) -> float:
    """A task's headline value (accuracy or its generation metric), in [0, 1]."""
    return float(task_metrics[headline_metric(task_metrics)])


def is_generation(task_metrics: Mapping[str, object]) -> bool:
    return headline_metric(task_metrics) != "acc"


def item_score(row: Mapping[str, object]) -> float:
    """An item's result from its prediction row: the generation score, else 1.0 / 0.0 for right / wrong."""
    return float(row.get("score", row["correct"]))


def is_binary(arrays: Iterable[np.ndarray]) -> bool:
    """Whether every per-item result is 0 or 1 (McNemar's test applies only then)."""
    return all(np.isin(np.asarray(a), (0.0, 1.0)).all() for a in arrays)


def record_average(tasks: Mapping[str, Mapping[str, float]], in_domain: Sequence[str]) -> dict[str, float]:
    """A record's ``average`` over its in-domain tasks: each multiple-choice scoring when every task is multiple
    choice (``acc``, ``acc_sum``, ``acc_token_norm``), else ``score``, the mean of the tasks' headlines."""
    if all("acc" in tasks[t] for t in in_domain):
        return {s: sum(tasks[t][s] for t in in_domain) / len(in_domain) for s in RECORD_SCORINGS}
    return {"score": sum(headline(tasks[t]) for t in in_domain) / len(in_domain)}
