"""Evaluation: multiple choice by log-likelihood (``multiple_choice``), generation tasks by greedy decoding
(``generation``) scored by the metrics of ``metrics``; ``evaluate`` runs either kind without Lightning."""

from .generation import generate_batch, score_generations
from .metrics import METRICS, extract_final_number
from .multiple_choice import (
    HEADLINE,
    SCORINGS,
    answer_logits,
    evaluate,
    extract_choice,
    forward_parameters,
    score_batch,
    supports_prompt_sharing,
)

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
