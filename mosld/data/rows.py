"""The shapes a dataset row passes through (``Row`` -> ``Example`` or ``GenerationExample``) and the
multiple-choice row parsers of the task registry (``mosld.data.tasks``); each parser returns (context, question,
choices, label) or raises ``TaskDataError`` naming the file, line and field. The generation row formats are in
``mosld.data.formats``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LETTERS = "ABCDEFGHIJ"
IGNORE_INDEX = -100  # the label of a token that carries no loss (prompt tokens, padding)


class TaskDataError(ValueError):
    """A task's data cannot be loaded or parsed; the message names the task, file, line and field."""


@dataclass
class Example:
    """One multiple-choice item, whatever dataset it came from.

    Attributes:
        task: Registry name (or user task name) the example belongs to.
        context: Passage to read (RACE article, MCTest story, BoolQ passage), ``None`` for closed-book tasks.
        question: The question or sentence stem.
        choices: Answer texts, in the dataset's order.
        label: Index of the correct entry of ``choices``.
    """

    task: str
    context: str | None
    question: str
    choices: list[str]
    label: int


@dataclass
class GenerationExample:
    """One free-text item: the conversation before the target, the target to train on, references to score.

    Attributes:
        task: Registry name (or user task name) the example belongs to.
        context: Passage put before the prompt (bAbI: the story); cut from its start when too long.
        prompt: The last user turn (Alpaca: instruction + "\\n\\n" + input; bAbI and GSM8K: the question).
        target: What training teaches (then EOS); GSM8K: the whole worked solution. Empty only in predict files.
        references: What generated text is scored against (usually ``[target]``; GSM8K: the final number).
        history: (role, content) turns before the last user turn (chat rows; a system turn first).
    """

    task: str
    context: str | None
    prompt: str
    target: str
    references: list[str]
    history: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Row:
    """A raw dataset row with where it came from, for error messages."""

    source: str
    line: int
    data: dict[str, Any]

    def where(self) -> str:
        return f"{self.source}:{self.line}"


Parsed = tuple[str | None, str, list[str], int]


def _check_text(row: Row, key: str, value: str) -> str:
    """``value`` unless it holds a lone surrogate (a JSON ``\\ud800`` escape), which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TaskDataError(
            f"{row.where()}: field {key!r} holds text that is not valid Unicode ({err.reason})"
        ) from None
    return value


def _field(row: Row, key: str, kind: type) -> Any:
    value = row.data[key]
    # bool is an int subclass: true/false must not pass as a label index, nor 0/1 as a BoolQ answer.
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise TaskDataError(
            f"{row.where()}: field {key!r} should be {kind.__name__}, got {type(value).__name__} {value!r:.80}"
        )
    return _check_text(row, key, value) if kind is str else value


_FIELD = object()


def nonempty_text(row: Row, key: str, value: Any = _FIELD) -> str:
    """Field ``key`` of ``row`` (or ``value``, a part of it named ``key``): a string that is not only whitespace."""
    value = row.data[key] if value is _FIELD else value
    if not isinstance(value, str):
        raise TaskDataError(
            f"{row.where()}: field {key!r} should be a string, got {type(value).__name__} {value!r:.80}"
        )
    if not value.strip():
        raise TaskDataError(f"{row.where()}: field {key!r} is empty (or only whitespace)")
    return _check_text(row, key, value)


def _letter_index(row: Row, key: str, letters: Sequence[str]) -> int:
    answer = row.data[key]
    if answer not in letters:
        raise TaskDataError(
            f"{row.where()}: label {key!r} = {answer!r} is not one of the choice labels {list(letters)} "
            "(an unlabelled split, such as CommonsenseQA's test, cannot be used for training or scoring)"
        )
    return list(letters).index(answer)


def _choices_struct(row: Row, key: str = "choices") -> tuple[list[str], list[str]]:
    choices = _field(row, key, dict)
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or not texts:
        raise TaskDataError(
            f"{row.where()}: field {key!r} should be {{'text': [...], 'label': [...]}} with equal, non-empty lists"
        )
    return [str(t) for t in texts], [str(label) for label in labels]


def _parse_arc(row: Row) -> Parsed:
    texts, labels = _choices_struct(row)
    return None, _field(row, "question", str), texts, _letter_index(row, "answerKey", labels)


def _parse_openbookqa(row: Row) -> Parsed:
    texts, labels = _choices_struct(row)
    return None, _field(row, "question_stem", str), texts, _letter_index(row, "answerKey", labels)


def _parse_race(row: Row) -> Parsed:
    options = [str(o) for o in _field(row, "options", list)]
    label = _letter_index(row, "answer", LETTERS[: len(options)])
    return _field(row, "article", str), _field(row, "question", str), options, label


def _parse_mctest(row: Row) -> Parsed:
    options = _field(row, "answer_options", dict)
    letters = sorted(options)
    # The hub (and the local copy) keep MCTest's literal "\newline" / "\tab" escapes in the story.
    story = _field(row, "story", str).replace("\\newline", "\n").replace("\\tab", "\t")
    return (
        story,
        _field(row, "question", str),
        [str(options[k]) for k in letters],
        _letter_index(row, "answer", letters),
    )


def _parse_boolq(row: Row) -> Parsed:
    question = _field(row, "question", str).strip()
    # BoolQ questions are lower-case and lack the question mark.
    question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
    passage = _field(row, "passage", str).strip()
    return passage or None, question, ["no", "yes"], int(_field(row, "answer", bool))


MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}."


def _parse_mmlu(row: Row) -> Parsed:
    # lm-evaluation-harness's zero-shot MMLU prompt: the subject line (its task description) is the context,
    # the question and its lettered choices the body (the "mmlu" template), " A".." D" the answers.
    choices = _field(row, "choices", list)
    if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise TaskDataError(f"{row.where()}: field 'choices' should be a list of 4 strings, got {choices!r:.200}")
    answer = _field(row, "answer", int)
    if not 0 <= answer < 4:
        raise TaskDataError(f"{row.where()}: field 'answer' = {answer} is not a choice index 0-3")
    subject = _field(row, "subject", str).replace("_", " ")
    return MMLU_HEADER.format(subject=subject), _field(row, "question", str), list(choices), answer


def _mmlu_subject(example: Example) -> str:
    """An MMLU example's subject: its context is the subject line."""
    return example.context or ""


def _first_duplicate(choices: Sequence[str]) -> str | None:
    """The first choice that repeats an earlier one once whitespace is stripped, else None."""
    seen: set[str] = set()
    for choice in choices:
        if choice.strip() in seen:
            return choice
        seen.add(choice.strip())
    return None


def _parse_user(row: Row) -> Parsed:
    choices = _field(row, "choices", list)
    if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise TaskDataError(
            f"{row.where()}: field 'choices' should be a list of at least 2 non-empty strings, got {choices!r:.200}"
        )
    for i, choice in enumerate(choices):
        _check_text(row, f"choices[{i}]", choice)
    duplicate = _first_duplicate(choices)
    if duplicate is not None:
        raise TaskDataError(
            f"{row.where()}: field 'choices' holds {duplicate!r} more than once (after stripping whitespace); "
            "an item whose gold is a later copy could never be scored correct: make the choices distinct"
        )
    label = _field(row, "label", int)
    if not 0 <= label < len(choices):
        raise TaskDataError(
            f"{row.where()}: field 'label' = {label} is outside the choices (expected 0..{len(choices) - 1})"
        )
    context = row.data.get("context")
    if context is not None and not isinstance(context, str):
        raise TaskDataError(f"{row.where()}: field 'context' should be a string or null, got {type(context).__name__}")
    if context is not None:
        _check_text(row, "context", context)
    return context or None, nonempty_text(row, "question"), list(choices), label
