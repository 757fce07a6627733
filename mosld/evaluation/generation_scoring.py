"""Scoring a generation batch: its prompts decoded by the one decoder (``mosld.evaluation.decoding``), then the
task's metric (``mosld.evaluation.metrics``) per item. (Generation items, their spec and batches are built on the
data floor, ``mosld.data.generation``.)

``generate_batch`` decodes a generation eval batch (prompts left-padded, so that every row's next token is
predicted in the last column) greedily with the task's ``max_new_tokens`` and stop strings, on the prompt's
KV cache: ``decode_steps`` with the same options for every row. What each model call receives, and why,
is described there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from .decoding import cut_at_stop, decode_options, decode_steps, eos_token_ids, left_pad
from .metrics import METRICS

__all__ = [
    "cut_at_stop",
    "eos_token_ids",
    "generate_batch",
    "generate_items",
    "left_pad",
    "score_generation_batch",
    "score_generations",
]


def generate_batch(model: torch.nn.Module, batch: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Greedy continuations of a batch of left-padded prompts.

    Args:
        model: Causal LM (see ``decode_steps``). Its train/eval mode is left as it is (callers put it in eval mode).
        batch: ``input_ids`` and ``attention_mask`` (batch, prompt length), the prompts left-padded; and
            ``generation``, the task's spec (read: ``max_new_tokens``, ``stop``).
        tokenizer: Decodes the tokens; its ``eos_token_id`` (and ``pad_token_id``, fed to stopped rows).

    Returns:
        Per row, the decoded continuation (special tokens skipped) cut before the first stop string, stripped.
    """
    spec = batch["generation"]
    options = decode_options(spec)
    texts = [""] * batch["input_ids"].shape[0]
    for updates in decode_steps(model, tokenizer, batch["input_ids"], batch["attention_mask"], [options] * len(texts)):
        for update in updates:
            if update.text is not None:
                texts[update.row] = update.text
    return [text.strip() for text in texts]


def get_metric(metric: str | Callable[[str, Sequence[str]], float]) -> Callable[[str, Sequence[str]], float]:
    """A metric function from its name in ``METRICS`` (a callable is returned as is)."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown generation metric {metric!r}; expected one of {', '.join(METRICS)}")
    return METRICS[metric]


def score_generations(
    texts: Sequence[str], references: Sequence[Sequence[str]], metric: str | Callable[[str, Sequence[str]], float]
) -> list[float]:
    """Each generated text's score against its references (``METRICS[metric]``, in [0, 1])."""
    if len(texts) != len(references):
        raise ValueError(f"score_generations: {len(texts)} texts but {len(references)} reference lists")
    score = get_metric(metric)
    return [float(score(text, refs)) for text, refs in zip(texts, references, strict=True)]


def score_generation_batch(
    model: torch.nn.Module, batch: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[str], Tensor]:
    """A generation eval batch's continuations (``generate_batch``) and their scores under its spec's metric
    (float64, one per row)."""
    texts = generate_batch(model, batch, tokenizer)
    scores = score_generations(texts, batch["references"], batch["generation"].metric)
    return texts, torch.tensor(scores, dtype=torch.float64)


def generate_items(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, items: Sequence[Any], spec: Any, batch_size: int
) -> list[str]:
    """Greedy continuations of encoded generation items (``.prompt`` token ids), in the items' order.

    Items go in batches of similar prompt length (longest first: less padding, and an out-of-memory
    error shows on the first batch).
    """
    order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt))
    texts: list[str] = [""] * len(items)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = {**left_pad([items[i].prompt for i in chunk], pad_id), "generation": spec}
        for i, text in zip(chunk, generate_batch(model, batch, tokenizer), strict=True):
            texts[i] = text
    return texts
