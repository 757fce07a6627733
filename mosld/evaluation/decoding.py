"""The one decoder: batched decoding on the KV cache, a token per step, greedy or sampled, row by row.

Training-time evaluation and ``mosld.evaluate`` decode through ``generate_batch`` (``mosld.evaluation.generation_scoring``),
the server (``mosld.serve``) through ``decode_steps`` itself; both run this loop. It is a short loop rather than
``model.generate``, so that what each model call receives is explicit and the same for every adapter method:

- ``position_ids`` count each row's real tokens (left padding does not shift them), as in an unpadded run;
- every call passes the ``attention_mask``, in which padding and the steps of rows that already stopped are
  0, so the adapters' routing statistics (``mosld.adapters.inject._track_padding``) count only real tokens;
- ``use_cache=True`` whatever the model's config says (the training module turns it off for training);
- the vocabulary projection runs on the last position only (``logits_to_keep=1``).

Every row has its own ``DecodeOptions`` (token budget, stop strings, temperature, top-p, seed), so rows of one
batch can be different requests. A row's tokens do not depend on the other rows: padding and stopped rows
are masked, and a sampled row draws from its own seeded generator.

A row stops at an EOS id (the tokenizer's, and the model's ``generation_config`` ones), once its decoded text
contains a stop string, after its ``max_new_tokens`` tokens, or when the caller cancels it; the loop ends when
every row has stopped.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

FinishReason = Literal["stop", "length", "cancelled"]
# A text ending in this character may end in the first bytes of a character whose other bytes come in the next
# token (byte-level BPE splits multi-byte characters): such a tail is held back until the character is complete.
INCOMPLETE_CHARACTER = "\ufffd"


@dataclass(frozen=True)
class DecodeOptions:
    """How one row is decoded.

    Attributes:
        max_new_tokens: Most tokens generated (an EOS counts as one, and is not part of the text).
        stop: Stop strings: the row stops once its text contains one, and its text ends before it.
        temperature: 0 decodes greedily (the most likely token); above 0 samples from the softmax of
            ``logits / temperature``.
        top_p: Nucleus sampling: sample among the most likely tokens whose probabilities first reach ``top_p``
            (1 keeps every token). Ignored when greedy.
        seed: Seed of the row's own random generator (sampling only); ``None`` draws one.
        ignore_eos: Go on past an EOS (not part of the text) until ``max_new_tokens`` or a stop string: answers of
            a fixed length, for measuring decoding speed (vLLM's option of the same name).
    """

    max_new_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.temperature < 0:
            raise ValueError(f"temperature: expected a number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RowUpdate:
    """What one decoding step produced for one row.

    Attributes:
        row: The row's index in the batch.
        delta: Text that became final at this step (with ``text_deltas``; else ""). Held back until it is
            final: a tail that may be the start of a stop string, or the first bytes of a character.
        finish_reason: ``None`` while the row decodes; ``stop`` (EOS or a stop string), ``length``
            (``max_new_tokens`` reached) or ``cancelled`` once it stopped.
        text: On the row's last update, its whole text: decoded without special tokens, cut before the first
            stop string (not stripped); ``None`` before.
        tokens: Tokens the row has generated so far (an EOS included).
    """

    row: int
    delta: str
    finish_reason: FinishReason | None = None
    text: str | None = None
    tokens: int = 0


@dataclass
class _Row:
    options: DecodeOptions
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sampled: int = 0  # tokens drawn, an EOS included: what max_new_tokens limits
    emitted: str = ""  # text handed out as deltas so far
    finish_reason: FinishReason | None = None


def decode_options(spec: object) -> DecodeOptions:
    """The ``DecodeOptions`` of a generation task's spec (``mosld.data.generation.GenerationSpec``): every field the
    two share, so that a decoding option given to both reaches the decoder without code in between."""
    shared = {f.name: getattr(spec, f.name) for f in dataclasses.fields(DecodeOptions) if hasattr(spec, f.name)}
    return DecodeOptions(**shared)


def forward_parameters(model: torch.nn.Module) -> set[str]:
    """Names of the parameters of ``model.forward`` (empty when they cannot be read)."""
    forward = getattr(model, "forward", None)
    try:
        return set(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return set()


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
    # Not tokenizer.pad(padding_side="left"): callers hold token ids and a pad id, not always a tokenizer, and
    # serving and generate_items pad with EOS where the tokenizer has no pad token (tokenizer.pad would refuse).
    width = max((len(p) for p in prompts), default=0)
    return {
        "input_ids": torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long),
        "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long),
    }


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def final_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of a running row's ``text`` that no later token can change or cut: without a tail that may be
    the start of a stop string or an incomplete character."""
    end = len(text)
    while end and text[end - 1] == INCOMPLETE_CHARACTER:
        end -= 1
    held = 0  # the longest tail that is a proper prefix of some stop string
    for s in stop:
        held = max([held] + [size for size in range(1, min(len(s), end + 1)) if text.endswith(s[:size], 0, end)])
    return text[: end - held]


def sample_tokens(logits: Tensor, rows: Sequence[_Row]) -> list[int]:
    """Each row's next token from its (rows, vocab) logits: the argmax for greedy rows, else a draw from the
    temperature-scaled, top-p-truncated softmax with the row's own generator (on the CPU, so that a seed gives
    the same tokens on every device and in every batch)."""
    tokens = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if row.finish_reason is not None or row.options.greedy:
            continue
        probs = torch.softmax(logits[i].float().cpu() / row.options.temperature, dim=-1)
        if row.options.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
            sorted_probs[before >= row.options.top_p] = 0  # the most likely token always stays
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator))
    return tokens


def _generator(options: DecodeOptions) -> torch.Generator | None:
    if options.greedy:
        return None
    generator = torch.Generator()
    if options.seed is None:
        generator.seed()  # a non-deterministic seed
    else:
        generator.manual_seed(options.seed)
    return generator


@torch.inference_mode()
def decode_steps(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Tensor,
    attention_mask: Tensor,
    options: Sequence[DecodeOptions],
    *,
    text_deltas: bool = False,
    cancelled: Callable[[int], bool] | None = None,
) -> Iterator[list[RowUpdate]]:
    """Decode a batch of left-padded prompts, yielding after every step what each row produced.

    Args:
        model: Causal LM taking ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values``
            (or ``cache``) and ``use_cache`` (Hugging Face causal LMs, with or without adapters). Its
            train/eval mode is left as it is (callers put it in eval mode).
        tokenizer: Decodes the tokens; its ``eos_token_id`` (and ``pad_token_id``, fed to stopped rows).
        input_ids: (batch, prompt length), the prompts left-padded.
        attention_mask: (batch, prompt length), 0 on the padding.
        options: One per row.
        text_deltas: Decode each row's text at every step and hand out what became final (``RowUpdate.delta``),
            for streaming; without it only the finished rows' texts are decoded (and running rows' texts where
            they have stop strings to look for).
        cancelled: Asked before every step for each running row; a row for which it says True stops
            (``cancelled``) and its later steps are padding.

    Yields:
        After the prompts' forward and after every later one, the updates of the rows that produced text or
        stopped at that step (a row's last update has its ``finish_reason`` and its ``text``).
    """
    if len(options) != input_ids.shape[0]:
        raise ValueError(f"decode_steps: {len(options)} options for {input_ids.shape[0]} rows")
    rows = [_Row(o, _generator(o)) for o in options]
    finished = [RowUpdate(i, "", "length", "", 0) for i, row in enumerate(rows) if row.options.max_new_tokens <= 0]
    for update in finished:
        rows[update.row].finish_reason = "length"
    if finished:
        yield finished
    if all(row.finish_reason for row in rows):
        return
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device).long()
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    params = forward_parameters(model)
    cache_arg = "cache" if "cache" in params else "past_key_values"
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    next_position = mask.sum(1, keepdim=True)  # (rows, 1): each row's number of real tokens so far
    while True:
        updates = []
        for i, row in enumerate(rows):
            if row.finish_reason is None and cancelled is not None and cancelled(i):
                row.finish_reason = "cancelled"
                updates.append(_last_update(i, row, tokenizer))
        tokens = sample_tokens(out.logits[:, -1], rows)
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if row.finish_reason is not None:
                continue
            row.sampled += 1
            if token in eos and not row.options.ignore_eos:
                row.finish_reason = "stop"
            else:
                row.tokens.append(token)
                update = _advance(i, row, tokenizer, text_deltas)
                if update is not None and row.finish_reason is None:
                    updates.append(update)
            if row.finish_reason is None and row.sampled >= row.options.max_new_tokens:
                row.finish_reason = "length"
            if row.finish_reason is not None:
                updates.append(_last_update(i, row, tokenizer))
        if updates:
            yield updates
        running = [row.finish_reason is None for row in rows]
        if not any(running):
            return
        alive = torch.tensor(running, device=device)
        feed = torch.where(alive, torch.tensor(tokens, device=device), torch.full_like(alive, pad_id, dtype=torch.long))
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)  # a stopped row's steps are padding
        cache = getattr(out, "cache", None) or out.past_key_values
        out = model(
            input_ids=feed[:, None], attention_mask=mask, position_ids=next_position, use_cache=True,
            **{cache_arg: cache}, **last_only,
        )  # fmt: skip
        next_position = next_position + 1


def _advance(i: int, row: _Row, tokenizer: PreTrainedTokenizerBase, text_deltas: bool) -> RowUpdate | None:
    """After a token was appended: stop the row at a stop string; the text that became final, if asked for."""
    stop = row.options.stop
    if not stop and not text_deltas:
        return None
    text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    if stop and any(s in text for s in stop):
        row.finish_reason = "stop"
        return None
    if not text_deltas:
        return None
    final = final_prefix(text, stop)
    if len(final) <= len(row.emitted) or not final.startswith(row.emitted):
        return None  # nothing new; or a tokenizer whose decoding of a longer prefix rewrote earlier text
    delta, row.emitted = final[len(row.emitted) :], final
    return RowUpdate(i, delta, tokens=row.sampled)


def _last_update(i: int, row: _Row, tokenizer: PreTrainedTokenizerBase) -> RowUpdate:
    """A stopped row's whole text, and the part of it not handed out yet."""
    text = cut_at_stop(tokenizer.decode(row.tokens, skip_special_tokens=True), row.options.stop)
    delta = text[len(row.emitted) :] if text.startswith(row.emitted) else ""
    row.emitted = text
    return RowUpdate(i, delta, row.finish_reason, text, row.sampled)
