"""Multiple-choice scoring: the log-likelihood of each choice (``score_batch``), or greedy generation and answer
extraction (``generate_choices``).

Headline metric: ``accuracy_norm``, the choice with the highest log-likelihood divided by the character
length of its answer text (without the leading space: lm-evaluation-harness's ``acc_norm``, docs/harness.md),
scored cloze-style after the task's prompt. ``accuracy_sum`` (unnormalised) and ``accuracy_token_norm``
(mean per answer token) are reported beside it (the names: ``mosld.evaluation.sums.MC_SCORINGS``). Measurements
behind the choice: docs/zero_shot.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mosld.data.prompts import EncodedItem
from mosld.data.tasks import LETTERS

from .decoding import DecodeOptions, forward_parameters
from .generation_scoring import generate_items


def _argmax_per_item(scores: Tensor, item_index: Tensor, choice_index: Tensor, num_items: int) -> Tensor:
    table = scores.new_full((num_items, int(choice_index.max()) + 1), float("-inf"))
    table[item_index, choice_index] = scores
    return table.argmax(dim=1)


def supports_prompt_sharing(model: torch.nn.Module) -> bool:
    """Whether the model takes a KV cache, position ids and ``logits_to_keep`` (Hugging Face causal LMs do)."""
    params = forward_parameters(model)
    return {"position_ids", "logits_to_keep"} <= params and bool({"cache", "past_key_values"} & params)


def answer_logits(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Logits only at the positions that predict answer tokens, from one forward of the whole batch.

    Position t predicts token t + 1, so the kept positions are those whose next label is not -100.
    The model is asked for logits there only (Hugging Face's ``logits_to_keep`` with a boolean
    (batch, length) mask): the vocabulary projection and its backward run on the answer tokens rather
    than on every prompt and padding position. A model without ``logits_to_keep``, or one that ignores
    a 2-D mask, returns every position's logits, which are indexed here instead: same result.

    Args:
        model: Causal LM called as ``model(input_ids=..., attention_mask=...).logits``.
        batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the answers), (batch, length).

    Returns:
        ``logits`` (A, vocab) at the A answer-predicting positions in row-major order, ``targets`` (A,)
        the answer tokens they predict, and ``rows`` (A,) the batch row of each.
    """
    labels = batch["labels"]
    keep = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))  # (batch, length)
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in forward_parameters(model) else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    if logits.dim() == 3 and logits.shape[:2] == keep.shape:  # every position's logits
        logits = logits[keep]
    targets = labels[:, 1:][keep[:, :-1]]
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"answer_logits: the model returned logits of shape {tuple(logits.shape)} for a (batch, length) "
            f"logits_to_keep mask with {targets.shape[0]} positions; expected ({targets.shape[0]}, vocab)"
        )
    return logits, targets, keep.nonzero()[:, 0]


def _choice_logprobs(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Summed log-probability of each sequence's answer tokens, from one forward of the whole batch."""
    logits, targets, rows = answer_logits(model, batch)
    token_logp = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(len(batch["labels"]), device=logits.device).index_add_(0, rows, token_logp)


def _choice_logprobs_shared_prompt(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Same as ``_choice_logprobs``, running each item's prompt once and its choices on the prompt's KV cache."""
    ids, is_answer, item_index = batch["input_ids"], batch["labels"] != -100, batch["item_index"]
    device, num_items, width = ids.device, len(batch["gold"]), ids.shape[1]
    n_answer = is_answer.sum(dim=1)
    start = is_answer.int().argmax(dim=1)  # = prompt length: labels begin right after the prompt
    first = torch.full((num_items,), len(ids), device=device).scatter_reduce(
        0, item_index, torch.arange(len(ids), device=device), reduce="amin"
    )
    prompt_len = start[first]
    # Left-pad the prompts so that every one ends in the last column, where the first answer token is predicted.
    source = torch.arange(int(prompt_len.max()), device=device) - (prompt_len.max() - prompt_len)[:, None]
    prompt_mask = (source >= 0).long()
    prompt_ids = ids[first].gather(1, source.clamp(min=0))
    cache_arg = "cache" if "cache" in forward_parameters(model) else "past_key_values"
    out = model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=source.clamp(min=0), use_cache=True,
        logits_to_keep=1,
    )  # fmt: skip
    steps = torch.arange(int(n_answer.max()), device=device)
    answer = ids.gather(1, (start[:, None] + steps).clamp(max=width - 1))
    answer_mask = steps < n_answer[:, None]
    next_logp = out.logits[:, -1].float().log_softmax(-1)[item_index]
    total = next_logp.gather(1, answer[:, :1]).squeeze(1)
    if answer.shape[1] > 1:
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.reorder_cache(item_index)  # one copy of the item's prompt cache per choice
        # Input s predicts answer token s + 1: real only while s + 1 < n_answer. A choice's last token is in
        # this input only when a longer choice shares the batch; masked, nothing attends to it and routing
        # statistics count the same tokens whatever the batch.
        out = model(
            input_ids=answer[:, :-1],
            attention_mask=torch.cat([prompt_mask[item_index], answer_mask[:, 1:].long()], dim=1),
            position_ids=prompt_len[item_index][:, None] + steps[:-1],
            **{cache_arg: cache},
        )
        logp = out.logits.float().log_softmax(-1).gather(-1, answer[:, 1:, None]).squeeze(-1)
        total = total + (logp * answer_mask[:, 1:]).sum(dim=1)
    return total


def score_batch(model: torch.nn.Module, batch: dict[str, Tensor], share_prompt: bool = False) -> dict[str, Tensor]:
    """Score every choice of every item in an eval batch.

    Args:
        model: Causal LM; called as ``model(input_ids=..., attention_mask=...).logits`` (with ``logits_to_keep``
            when its forward takes it).
        batch: An eval batch from ``MultiTaskDataModule.val_dataloader()`` / ``test_dataloader()``.
        share_prompt: Run each item's prompt once and score its choices on the prompt's KV cache (needs
            ``supports_prompt_sharing(model)``): the same scores, 2-4x faster on 4-choice items.

    Returns:
        Per-item tensors (length = number of items): ``correct`` (headline, ``correct_norm``), ``correct_sum``,
        ``correct_norm``, ``correct_token_norm`` (float 0/1), ``pred`` (headline choice), ``gold_loss_sum``
        (summed NLL of the gold answer tokens) and ``gold_tokens`` (their count); and per sequence (one per item
        and choice, as ``batch["item_index"]`` / ``batch["choice_index"]``): ``choice_logprob`` (summed
        log-likelihood of the choice) and ``choice_logprob_norm`` (divided by the choice's character length, as ``EncodedItem.choice_chars``).
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    score = _choice_logprobs_shared_prompt if share_prompt else _choice_logprobs
    seq_logp = score(model, batch)
    seq_tokens = (batch["labels"] != -100).sum(dim=1)
    item_index, choice_index, gold = batch["item_index"], batch["choice_index"], batch["gold"]
    num_items = len(gold)
    variants = {
        "sum": seq_logp,
        "norm": seq_logp / batch["choice_chars"].clamp(min=1),
        "token_norm": seq_logp / seq_tokens.clamp(min=1),
    }
    out = {}
    for name, scores in variants.items():
        pred = _argmax_per_item(scores, item_index, choice_index, num_items)
        out[f"correct_{name}"] = (pred == gold).float()
        if name == "norm":
            out["pred"] = pred
    out["correct"] = out["correct_norm"]
    # Per-sequence (item, choice) scores, for predictions that report every choice's score.
    out["choice_logprob"], out["choice_logprob_norm"] = seq_logp, variants["norm"]
    is_gold = choice_index == gold[item_index]
    out["gold_loss_sum"] = torch.zeros(num_items, device=device).index_add_(0, item_index[is_gold], -seq_logp[is_gold])
    out["gold_tokens"] = torch.zeros(num_items, device=device).index_add_(
        0, item_index[is_gold], seq_tokens[is_gold].float()
    )
    return out


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def extract_choice(generated: str, choices: Sequence[str], lettered: bool = False) -> int:
    """Map generated text to a choice index, or -1 when it names none.

    Order: exact match; the text starts with a choice (longest first); with ``lettered``, a leading letter
    (``B``, ``B.``, ``(B)``); otherwise the choice sharing the most words with the text.
    """
    text = _normalise(generated)
    normalised = [_normalise(c) for c in choices]
    if text in normalised:
        return normalised.index(text)
    starts = [(len(c), i) for i, c in enumerate(normalised) if c and (text + " ").startswith(c + " ")]
    if starts:
        return max(starts)[1]
    if lettered:
        match = re.match(r"\s*\(?([A-J])\b", generated)
        if match and LETTERS.index(match.group(1)) < len(choices):
            return LETTERS.index(match.group(1))
    words = set(text.split())
    overlaps = [len(words & set(c.split())) / max(1, len(set(c.split()))) for c in normalised]
    best = max(range(len(choices)), key=lambda i: overlaps[i])
    return best if overlaps[best] > 0 else -1


def generate_choices(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[EncodedItem],
    choices: Sequence[Sequence[str]],
    lettered: bool,
    batch_size: int,
    max_new_tokens: int,
) -> list[int]:
    """Each item's choice from its greedy continuation's first line (``extract_choice``): ``mosld.evaluate``'s
    ``method="generate"``, decoded like a generation task's items (``generate_items``, the one decoder)."""
    first_line = DecodeOptions(max_new_tokens, stop=("\n",))
    texts = generate_items(model, tokenizer, items, first_line, batch_size)
    return [extract_choice(text, item_choices, lettered) for text, item_choices in zip(texts, choices, strict=True)]
