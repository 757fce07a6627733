"""Generation tasks: how one is decoded and scored (``GenerationSpec``), its token ids (``GenerationItem``) and
its evaluation batches (``GenerationCollator``).

A generation item is a prompt and a target. Training runs on prompt + target + EOS with loss on the target and
EOS only, as a multiple-choice item trains on its gold answer; evaluation feeds the prompt alone (left-padded)
and scores what the model generates against the references. Two prompt templates:

- ``plain``: ``[context + "\\n"]`` + ``"Q: "`` + prompt + ``"\\nA:"``, the target after a space; a conversation
  (chat rows with history) is ``System: / User: / Assistant:`` lines ending in ``"User: " + prompt + "\\nAssistant:"``;
- ``chat``: the tokenizer's chat template over the history and a user turn ``[context + "\\n\\n"]`` + prompt,
  with the generation prompt; the target is the assistant's reply text, then the tokenizer's EOS (SmolLM2's
  ``<|im_end|>``, which closes a turn).

A context too long for ``max_length`` is cut from its start (whole lines when they fit: bAbI keeps the latest
sentences of its story); prompts and targets are never cut, and items whose prompt and target alone do not fit
are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from mosld.data.rows import IGNORE_INDEX, GenerationExample, TaskDataError

# The names of mosld.evaluation.metrics.METRICS (checked here, so a typo fails when the data module is built).
METRIC_NAMES = ("exact_match", "set_match", "token_f1", "squad_exact_match", "rouge_l", "final_number")
GENERATION_TEMPLATES = ("plain", "chat")
_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_CONTEXT_MARK = "\x00mosld-context\x00"  # stands for the context while a chat template is rendered


@dataclass(frozen=True)
class GenerationSpec:
    """How a generation task is scored and decoded.

    Attributes:
        metric: A name in ``mosld.evaluation.metrics.METRICS`` (``METRIC_NAMES``).
        max_new_tokens: Most tokens generated per item.
        stop: Stop strings besides EOS; ``()`` for none.
        template: ``plain`` or ``chat`` (the tokenizer's chat template; an error if it has none).
    """

    metric: str = "exact_match"
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    template: str = "plain"

    def __post_init__(self) -> None:
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"metric {self.metric!r}: unknown; known metrics: {', '.join(METRIC_NAMES)}")
        tokens = self.max_new_tokens
        # By hand: the fields come from task specs and the untyped data.generation dict, not a jsonargparse type
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive integer, got {tokens!r}")
        stop = self.stop
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop: expected a list of non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if self.template not in GENERATION_TEMPLATES:
            raise ValueError(f"template {self.template!r}: a generation task takes one of {list(GENERATION_TEMPLATES)}")

    def replace(self, overrides: Mapping, option: str = "generation") -> GenerationSpec:
        """This spec with some fields replaced; unknown fields or bad values raise ``ValueError`` naming ``option``."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"{option}: unknown field(s) {unknown}; known fields: {known}")
        try:
            return dataclasses.replace(self, **overrides)
        except ValueError as err:
            raise ValueError(f"{option}: {err}") from None


def user_task_defaults(chat_rows: bool) -> GenerationSpec:
    """A user generation task's spec when no option sets it: ROUGE-L, 128 new tokens, no stop string; the chat
    template for chat rows (``plain_without_chat_template`` turns it to ``plain`` for a tokenizer without one)."""
    return GenerationSpec("rouge_l", 128, (), "chat" if chat_rows else "plain")


def plain_without_chat_template(spec: GenerationSpec, tokenizer: PreTrainedTokenizerBase) -> GenerationSpec:
    """A default ``chat`` template as it applies to ``tokenizer``: ``plain`` when the tokenizer has no chat template.
    (Only for a template no option asked for: ``chat`` asked of such a tokenizer is an error when encoding.)"""
    if spec.template == "chat" and not has_chat_template(tokenizer):
        return dataclasses.replace(spec, template="plain")
    return spec


@dataclass
class GenerationItem:
    """Token ids of one generation item.

    Attributes:
        prompt: Prompt tokens (special prefix included).
        target: Target tokens without EOS (empty for a predict row without a reference).
        references: Texts the generated text is scored against.
    """

    prompt: list[int]
    target: list[int]
    references: list[str]

    def train_sequence(self, eos_id: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for training: prompt + target + EOS, loss on the target and EOS only."""
        answer = self.target + [eos_id]
        return self.prompt + answer, [IGNORE_INDEX] * len(self.prompt) + answer

    def train_length(self) -> int:
        return len(self.prompt) + len(self.target) + 1

    def __len__(self) -> int:
        return self.train_length()


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(example: GenerationExample, template: str, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str, str]:
    """(head, context, tail, target text): the prompt text is head + context + tail, and only context may be cut."""
    context = example.context or ""
    if template == "plain":
        head = "".join(f"{_ROLE_NAMES[role]}: {content}\n" for role, content in example.history)
        # "Q:/A:" as the multiple-choice cloze prompts: after "Answer:" the embedded SmolLM2-Instruct ends its turn at
        # once on every bAbI item tried, after "A:" it answers; a conversation goes on in its own role names
        turn = "User: {}\nAssistant:" if example.history else "Q: {}\nA:"
        return head, context, ("\n" if context else "") + turn.format(example.prompt), " " + example.target

    def chat(user: str) -> str:
        messages = [{"role": r, "content": c} for r, c in example.history] + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    if context:
        head, mark, tail = chat(_CONTEXT_MARK + "\n\n" + example.prompt).partition(_CONTEXT_MARK)
        if mark and _CONTEXT_MARK not in tail:
            return head, context, tail, example.target
        # a template that rewrote the mark: no cutting point, the whole prompt is fixed
        return "", "", chat(context + "\n\n" + example.prompt), example.target
    return "", "", chat(example.prompt), example.target


def _cut_start(tokenizer: PreTrainedTokenizerBase, context: str, ids: list[int], room: int) -> list[int]:
    """The latest part of a context in at most ``room`` tokens: its last lines when some fit, else its last tokens."""
    if room <= 0:
        return []
    lines = context.split("\n")
    memo: dict[int, list[int]] = {}

    def tail_ids(start: int) -> list[int]:
        if start not in memo:
            memo[start] = token_ids(tokenizer, ["\n".join(lines[start:])])[0]
        return memo[start]

    lo, hi = 1, len(lines)  # the first line kept: the smallest start whose lines fit
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tail_ids(mid)) <= room:
            hi = mid
        else:
            lo = mid + 1
    if lo < len(lines) and len(tail_ids(lo)) <= room:
        return tail_ids(lo)
    return ids[len(ids) - room :]


def encode_generation_examples(
    examples: Sequence[GenerationExample],
    tokenizer: PreTrainedTokenizerBase,
    spec: GenerationSpec,
    max_length: int,
) -> list[GenerationItem]:
    """Tokenise generation examples with ``spec.template``, cutting contexts from their start to fit ``max_length``.

    Target tokens are those of ``tail + target`` after those of ``tail`` (the end of the prompt) when that prefix
    matches, else the target tokenised alone, as for multiple-choice answers (``encode_examples``).

    Raises:
        ValueError: ``chat`` asked of a tokenizer without a chat template.
        TaskDataError: ``max_length`` leaves no room for the prompt and target of some items (the message says
            how many and the length they need).
    """
    if max_length < 8:
        raise ValueError(f"max_length: expected at least 8 tokens, got {max_length}")
    if not examples:
        return []
    task = examples[0].task
    if spec.template == "chat" and not has_chat_template(tokenizer):
        raise ValueError(
            f"task {task!r}: template 'chat' (data.templates / data.generation) needs a tokenizer with a chat "
            f"template, and {tokenizer.name_or_path or type(tokenizer).__name__} has none: use 'plain'"
        )
    # a chat template writes its own special tokens (BOS where the model has one)
    prefix = tokenizer("", add_special_tokens=True)["input_ids"] if spec.template == "plain" else []
    rendered = [render(e, spec.template, tokenizer) for e in examples]
    heads, contexts, tails, targets = (token_ids(tokenizer, [r[i] for r in rendered]) for i in range(4))
    joined = token_ids(tokenizer, [r[2] + r[3] for r in rendered])
    items, too_long = [], []
    for example, head, context, tail, alone, whole in zip(
        examples, heads, contexts, tails, targets, joined, strict=True
    ):
        target = whole[len(tail) :] if whole[: len(tail)] == tail and len(whole) > len(tail) else alone
        if not example.target:  # a predict row without a reference
            target = []
        fixed = len(prefix) + len(head) + len(tail) + len(target) + 1  # 1 for the EOS appended in training
        if fixed > max_length:
            too_long.append(fixed)
            continue
        room = max_length - fixed
        kept = context if len(context) <= room else _cut_start(tokenizer, example.context or "", context, room)
        items.append(GenerationItem(prefix + head + kept + tail, target, list(example.references)))
    if too_long:
        raise TaskDataError(
            f"data.max_length = {max_length} is too small for task {task!r}: {len(too_long)} of {len(examples)} "
            f"items do not fit their prompt and target, which are never cut (contexts are); they need up to "
            f"{max(too_long)} tokens: raise data.max_length to at least {max(too_long)}"
        )
    return items


class GenerationCollator:
    """A batch of generation items for decoding: prompts left-padded, with their references and the task's spec."""

    def __init__(self, pad_id: int, spec: GenerationSpec):
        self.pad_id, self.spec = pad_id, spec

    def __call__(self, batch: Sequence[tuple[GenerationItem, int, str]]) -> dict:
        prompts = [item.prompt for item, _, _ in batch]
        # By hand: left_pad is a floor above (evaluation), and eval_loader passes a pad id, no tokenizer to pad with
        width = max(len(p) for p in prompts)
        return {
            "input_ids": torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long),
            "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long),
            "task_ids": torch.tensor([task_id for _, task_id, _ in batch], dtype=torch.long),
            "item_ids": [item_id for _, _, item_id in batch],
            "references": [list(item.references) for item, _, _ in batch],
            "generation": self.spec,
        }
