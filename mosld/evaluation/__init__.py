"""Evaluation, one pipeline for ``validate`` / ``test`` and ``mosld.evaluate``: the step per batch and the
``evaluate`` loop (``run``), multiple choice by log-likelihood (``multiple_choice``), generation batches decoded by
the one decoder (``decoding``) and scored (``generation_scoring``) by the metrics of ``metrics``, and the per-task
sums and figures both paths report (``sums``)."""

from .decoding import forward_parameters
from .generation_scoring import generate_batch, score_generations
from .metrics import METRICS, extract_final_number
from .multiple_choice import (
    answer_logits,
    extract_choice,
    score_batch,
    supports_prompt_sharing,
)
from .run import evaluate
from .sums import HEADLINE, SCORINGS

__all__ = [
    "HEADLINE",
    "METRICS",
    "SCORINGS",
    "answer_logits",
    "evaluate",
    "extract_choice",
    "extract_final_number",
    "forward_parameters",
    "generate_batch",
    "score_batch",
    "score_generations",
    "supports_prompt_sharing",
]
