"""Prompt templates and tokenisation shared by training and scoring.

Training and evaluation build their token sequences from the same ``EncodedItem``: the prompt tokens, then
one choice's answer tokens (training appends EOS after the gold answer). Only answer tokens carry labels;
prompt tokens are masked with -100. A long passage is cut (from its end) so that the question, the
choices and the longest answer plus EOS always fit in ``max_length``; where these alone do not fit, the items
are refused, never cut. The cut depends on the item, not on the choice, so every choice of an item is scored
after exactly the prompt the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from mosld.data.generation import token_ids
from mosld.data.rows import IGNORE_INDEX
from mosld.data.tasks import LETTERS, TASKS, Example, TaskDataError

__all__ = ["IGNORE_INDEX", "TEMPLATES", "EncodedItem", "PromptTemplate", "encode_examples", "get_template"]


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt format: ``context`` (only when the example has one) + ``body``, then the ``answer`` target.

    Attributes:
        name: Template name (key of ``TEMPLATES``).
        context: Format string with ``{context}``; the passage part that may be truncated.
        body: Format string with ``{question}`` and optionally ``{choices}`` (one ``choice`` line per choice).
        choice: Format of one ``{choices}`` line, with ``{letter}`` and ``{text}``.
        answer: Format of the target continuation, with ``{text}`` (cloze) or ``{letter}``.
    """

    name: str
    context: str = "{context}\n\n"
    body: str = "Q: {question}\nA:"
    choice: str = "{letter}. {text}"
    answer: str = " {text}"

    @property
    def delimiter(self) -> str:
        """The whitespace before every answer (lm-evaluation-harness's ``target_delimiter``)."""
        return self.answer[: len(self.answer) - len(self.answer.lstrip())]

    def render(self, example: Example) -> tuple[str, str, list[str]]:
        """(truncatable part, body, answer texts): the prompt is the first two joined.

        The truncatable part is the context format up to the end of ``{context}``; what follows it (the
        separator) starts the body, so a cut passage is still followed by the separator and the question.
        Without a context the truncatable part is empty.
        """
        lines = "\n".join(self.choice.format(letter=LETTERS[i], text=c) for i, c in enumerate(example.choices))
        body = self.body.format(question=example.question, choices=lines)
        answers = [self.answer.format(letter=LETTERS[i], text=c) for i, c in enumerate(example.choices)]
        if not example.context:
            return "", body, answers
        before, _, after = self.context.partition("{context}")
        return before + example.context, after + body, answers


# "Q:/A:" beats "Question:/Answer:" by 6.8 points on 500 ARC-Easy test items with the embedded SmolLM2
# (length-normalised scoring; docs/zero_shot.md, "Prompt variants").
# Listed choices are lettered "A.", so these variants keep the long cue words rather than end in "A:".
_LETTERED = {"body": "Question: {question}\n{choices}\nAnswer:", "answer": " {letter}"}
TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        # Cloze style: the answer text is scored (or generated) right after "A:".
        PromptTemplate("science", context=""),
        PromptTemplate("passage"),
        PromptTemplate("yesno"),
        # lm-evaluation-harness's zero-shot MMLU: the subject line (the context), the question, the lettered
        # choices, "Answer:", and the letters as answers
        PromptTemplate("mmlu", body="{question}\n{choices}\nAnswer:", answer=" {letter}"),
        # Variants kept for comparison (docs/zero_shot.md): long cue words; choices listed, target = letter or text.
        PromptTemplate("science_question", context="", body="Question: {question}\nAnswer:"),
        PromptTemplate("science_lettered", context="", **_LETTERED),
        PromptTemplate("passage_lettered", **_LETTERED),
        PromptTemplate("science_listed", context="", body=_LETTERED["body"]),
        PromptTemplate("passage_listed", body=_LETTERED["body"]),
    )
}
FAMILY_TEMPLATES = {"science": "science", "passage": "passage", "yesno": "yesno", "mmlu": "mmlu"}


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    """A template by name (or passed through); unknown names list the known ones."""
    if isinstance(name, PromptTemplate):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"prompt template {name!r}: unknown; known templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass
class EncodedItem:
    """Token ids of one multiple-choice item.

    Attributes:
        prompt: Prompt tokens (special prefix, possibly truncated passage, question).
        choices: Answer tokens of each choice, without EOS.
        label: Index of the gold choice.
        choice_chars: Character length of each choice's continuation without the template's leading space (the
            delimiter), the length normalisation of lm-evaluation-harness's ``acc_norm`` (docs/harness.md).
    """

    prompt: list[int]
    choices: list[list[int]]
    label: int
    choice_chars: list[int]

    def train_sequence(self, eos_id: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for training: prompt + gold answer + EOS, loss on the answer and EOS only."""
        answer = self.choices[self.label] + [eos_id]
        return self.prompt + answer, [IGNORE_INDEX] * len(self.prompt) + answer

    def choice_sequence(self, index: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for scoring choice ``index``: prompt + answer, labels on the answer only."""
        answer = self.choices[index]
        return self.prompt + answer, [IGNORE_INDEX] * len(self.prompt) + answer

    def train_length(self) -> int:
        """Length of the training sequence (prompt, gold answer, EOS)."""
        return len(self.prompt) + len(self.choices[self.label]) + 1

    def __len__(self) -> int:
        return len(self.prompt) + max(len(c) for c in self.choices) + 1


_ids = token_ids


def encode_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    template: str | PromptTemplate,
    max_length: int,
) -> list[EncodedItem]:
    """Tokenise examples with a template, truncating passages to fit ``max_length``.

    Answer tokens are taken as the tokens of ``body + answer`` after those of ``body`` so that tokenizers
    that merge across the boundary or add a word-start marker (SentencePiece) still give the tokens the
    model sees in the full text; where the prefix does not match, the answer is tokenised on its own.

    Args:
        examples: Items to encode.
        tokenizer: The base model's tokenizer; its special prefix (e.g. BOS) starts every prompt.
        template: Template name or object.
        max_length: Upper bound on prompt + longest answer + EOS, in tokens; a registry task's ``min_length``
            raises it for that task's items (MMLU's questions, evaluation only, are never cut).

    Returns:
        One ``EncodedItem`` per example.

    Raises:
        TaskDataError: ``max_length`` leaves no room for the question and answers of some items (the message
            says how many and the length they need).
    """
    template = get_template(template)
    if max_length < 8:
        raise ValueError(f"max_length: expected at least 8 tokens, got {max_length}")
    spec = TASKS.get(examples[0].task) if examples else None
    if spec is not None and spec.min_length is not None:
        max_length = max(max_length, spec.min_length)
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    rendered = [template.render(e) for e in examples]
    contexts = _ids(tokenizer, [r[0] for r in rendered])
    bodies = _ids(tokenizer, [r[1] for r in rendered])
    flat = [(r[1], a) for r in rendered for a in r[2]]
    joined = _ids(tokenizer, [body + answer for body, answer in flat])
    alone = _ids(tokenizer, [answer for _, answer in flat])
    items, k, too_long = [], 0, []
    for example, (_, _, answers), context, body in zip(examples, rendered, contexts, bodies, strict=True):
        choice_ids = []
        for answer_alone in alone[k : k + len(answers)]:
            whole = joined[k]
            choice_ids.append(
                whole[len(body) :] if whole[: len(body)] == body and len(whole) > len(body) else answer_alone
            )
            k += 1
        longest = max(len(c) for c in choice_ids)
        room = max_length - len(prefix) - longest - 1  # 1 for the EOS appended in training
        if len(body) > room:  # cutting the question or an answer would train and score another item
            too_long.append(len(prefix) + len(body) + longest + 1)
            continue
        prompt = prefix + context[: room - len(body)] + body
        # lm-eval's acc_norm divides by the choice's length without its target_delimiter (docs/harness.md).
        chars = [len(a) - len(template.delimiter) for a in answers]
        items.append(EncodedItem(prompt, choice_ids, example.label, chars))
    if too_long:
        raise TaskDataError(
            f"data.max_length = {max_length} is too small for task {examples[0].task!r}: {len(too_long)} of "
            f"{len(examples)} items do not fit their question and answers, which are never cut (passages are); "
            f"they need up to {max(too_long)} tokens: raise data.max_length to at least {max(too_long)}"
        )
    return items
