"""Evaluation by generation: batched greedy decoding with the KV cache, then a metric per item.

``generate_batch`` decodes a generation eval batch (prompts left-padded, so that every row's next token is
predicted in the last column) one token per step on the prompt's KV cache. It is a short loop rather than
``model.generate``, so that what each model call receives is explicit and the same for every adapter method:

- ``position_ids`` count each row's real tokens (left padding does not shift them), as in an unpadded run;
- every call passes the ``attention_mask``, in which padding and the steps of rows that already stopped are
  0, so the adapters' routing statistics (``mosld.adapters.inject._track_padding``) count only real tokens;
- ``use_cache=True`` whatever the model's config says (the training module turns it off for training);
- the vocabulary projection runs on the last position only (``logits_to_keep=1``).

A row stops at an EOS id (the tokenizer's, and the model's ``generation_config`` ones) or once its decoded
text contains a stop string; the loop ends when every row has stopped or after ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from .metrics import METRICS
from .multiple_choice import forward_parameters


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The token ids that end a generation: the tokenizer's EOS and the model's ``generation_config`` ones."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    return ids


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` (batch, longest prompt) with the prompts left-padded."""
    width = max((len(p) for p in prompts), default=0)
    return {
        "input_ids": torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long),
        "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long),
    }


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, batch: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Greedy continuations of a batch of left-padded prompts.

    Args:
        model: Causal LM taking ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values``
            (or ``cache``) and ``use_cache`` (Hugging Face causal LMs, with or without adapters). Its
            train/eval mode is left as it is (callers put it in eval mode).
        batch: ``input_ids`` and ``attention_mask`` (batch, prompt length), the prompts left-padded; and
            ``generation``, the task's spec (read: ``max_new_tokens``, ``stop``).
        tokenizer: Decodes the tokens; its ``eos_token_id`` (and ``pad_token_id``, fed to stopped rows).

    Returns:
        Per row, the decoded continuation (special tokens skipped) cut before the first stop string, stripped.
    """
    spec = batch["generation"]
    max_new_tokens, stop = int(spec.max_new_tokens), tuple(s for s in (spec.stop or ()) if s)
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).long()
    rows = ids.shape[0]
    if rows == 0 or max_new_tokens <= 0:
        return [""] * rows
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    params = forward_parameters(model)
    cache_arg = "cache" if "cache" in params else "past_key_values"
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    next_position = mask.sum(1, keepdim=True)  # (rows, 1): each row's number of real tokens so far
    generated: list[list[int]] = [[] for _ in range(rows)]
    running = [True] * rows
    for step in range(max_new_tokens):
        tokens = out.logits[:, -1].argmax(-1)
        for row, token in enumerate(tokens.tolist()):
            if not running[row]:
                continue
            if token in eos:
                running[row] = False
                continue
            generated[row].append(token)
            if stop and any(s in tokenizer.decode(generated[row], skip_special_tokens=True) for s in stop):
                running[row] = False
        if step == max_new_tokens - 1 or not any(running):
            break
        alive = torch.tensor(running, device=device)
        feed = torch.where(alive, tokens, torch.full_like(tokens, pad_id))[:, None]
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)  # a stopped row's steps are padding
        cache = getattr(out, "cache", None) or out.past_key_values
        out = model(
            input_ids=feed, attention_mask=mask, position_ids=next_position, use_cache=True,
            **{cache_arg: cache}, **last_only,
        )  # fmt: skip
        next_position = next_position + 1
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [cut_at_stop(text, stop).strip() for text in texts]


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


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    examples: Sequence[Any],
    overrides: dict[str, Any] | None,
    batch_size: int,
    max_length: int,
) -> tuple[dict[str, float], int]:
    """One generation task of ``mosld.evaluate``: ``({metric: mean score}, number of items)``.

    The examples (``GenerationExample``: ``references``) are encoded with
    ``mosld.data.generation.encode_generation_examples`` under the task's ``GenerationSpec`` (its fields
    replaced by ``overrides``), decoded with ``generate_batch`` and scored with the spec's metric.
    """
    from mosld.data import generation as data_generation  # the data floor; imported when a task needs it
    from mosld.data.tasks import generation_defaults

    spec = generation_defaults(task)  # the registry's (bAbI qa8: set_match, gsm8k: final_number) or a user task's
    if spec.template == "chat" and not data_generation.has_chat_template(tokenizer):
        spec = spec.replace({"template": "plain"})  # chat rows' default, as the data module does
    spec = spec.replace(overrides or {}, option="generation")
    items = data_generation.encode_generation_examples(examples, tokenizer, spec, max_length)
    texts = generate_items(model, tokenizer, items, spec, batch_size)
    scores = score_generations(texts, [item.references for item in items], spec.metric)
    return {spec.metric: sum(scores) / max(1, len(scores))}, len(items)
