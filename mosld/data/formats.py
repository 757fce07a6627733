"""Row formats: how a JSONL row becomes an item, and which format a user's file is in.

A user task file is read in the format its first row shows, and every later row must be in that format:

- multiple choice ``{"question", "choices", "label"}`` (optional ``"context"``);
- Alpaca ``{"instruction", "input" (optional, may be ""), "output"}``;
- prompt/response ``{"prompt", "response"}``;
- chat ``{"messages": [{"role", "content"}, ...]}``, whose last turn is the assistant's reply (the target).

The built-in generation tasks (bAbI, GSM8K) have their own parsers here too, and the converter of the hub's
one-row-per-story bAbI schema. A generation parser returns (context, prompt, target, references, history); a
multiple-choice parser (``mosld.data.rows``) returns (context, question, choices, label). Every parser raises
``TaskDataError`` naming the file, line and field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mosld.data.rows import LETTERS, Example, GenerationExample, Row, TaskDataError, _parse_user, nonempty_text

MULTIPLE_CHOICE, GENERATION = "multiple_choice", "generation"
ROLES = ("system", "user", "assistant")
GenParsed = tuple[str | None, str, str, list[str], list[tuple[str, str]]]


@dataclass(frozen=True)
class RowFormat:
    """One row format.

    Attributes:
        name: How messages call it (``Alpaca``).
        kind: ``multiple_choice`` or ``generation``.
        columns: Fields every row must have.
        parse: Row -> parsed tuple (see the module docstring); ``parse(row, need_target=False)`` for predict files.
        shape: The row shape, for messages.
        predict_columns: Fields a row of a predict file must have (the target may be missing there).
    """

    name: str
    kind: str
    columns: tuple[str, ...]
    parse: Callable[..., Any]
    shape: str = ""
    predict_columns: tuple[str, ...] = ()


@lru_cache(maxsize=64)
def _read_jsonl_cached(path: str, mtime_ns: int, size: int) -> tuple[Row, ...]:
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:  # a byte-order mark may open the file
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise TaskDataError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise TaskDataError(f"{path}:{number}: JSON nested too deeply to read") from None
            if not isinstance(data, dict):
                raise TaskDataError(f"{path}:{number}: expected a JSON object per line, got {type(data).__name__}")
            rows.append(Row(path, number, data))
    return tuple(rows)


def read_jsonl(path: str | os.PathLike) -> tuple[Row, ...]:
    """Rows of a JSONL file (cached while the file is unchanged); bad JSON is reported with file and line."""
    stat = Path(path).stat()
    return _read_jsonl_cached(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


def _target(row: Row, key: str, need_target: bool) -> str:
    if not need_target and row.data.get(key) is None:
        return ""
    return nonempty_text(row, key).strip()


def parse_alpaca(row: Row, need_target: bool = True) -> GenParsed:
    instruction = nonempty_text(row, "instruction").strip()
    extra = row.data.get("input")
    if extra is not None:
        if not isinstance(extra, str):
            raise TaskDataError(
                f"{row.where()}: field 'input' should be a string (or \"\", or left out), got {type(extra).__name__}"
            )
        extra = nonempty_text(row, "input").strip() if extra.strip() else ""
    prompt = instruction + ("\n\n" + extra if extra else "")
    target = _target(row, "output", need_target)
    return None, prompt, target, [target] if target else [], []


def parse_prompt_response(row: Row, need_target: bool = True) -> GenParsed:
    prompt = nonempty_text(row, "prompt").strip()
    target = _target(row, "response", need_target)
    return None, prompt, target, [target] if target else [], []


def parse_chat(row: Row, need_target: bool = True) -> GenParsed:
    messages = row.data["messages"]
    if not isinstance(messages, list) or not messages:
        raise TaskDataError(
            f"{row.where()}: field 'messages' should be a non-empty list of {{'role', 'content'}} objects, got "
            f"{messages!r:.80}"
        )
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TaskDataError(
                f"{row.where()}: field 'messages[{i}]' should be an object with 'role' and 'content', got "
                f"{message!r:.80}"
            )
        role = message["role"]
        if role not in ROLES:
            raise TaskDataError(f"{row.where()}: field 'messages[{i}].role' = {role!r:.40}: expected one of {ROLES}")
        if role == "system" and i != 0:
            raise TaskDataError(f"{row.where()}: field 'messages[{i}].role': a system turn may only come first")
        turns.append((role, nonempty_text(row, f"messages[{i}].content", message["content"]).strip()))
    target = ""
    if turns[-1][0] == "assistant":
        target = turns.pop()[1]
    elif need_target:
        raise TaskDataError(
            f"{row.where()}: field 'messages': the last turn should be the assistant's reply (the target), "
            f"got a {turns[-1][0]} turn"
        )
    if not turns or turns[-1][0] != "user":
        raise TaskDataError(
            f"{row.where()}: field 'messages': the turn before the assistant's reply should be a user turn, got "
            f"{turns[-1][0] + ' turn' if turns else 'none'}"
        )
    return None, turns[-1][1], target, [target] if target else [], turns[:-1]


def _parse_user_mc(row: Row, need_target: bool = True):
    if need_target or row.data.get("label") is not None:
        return _parse_user(row)
    return _parse_user(Row(row.source, row.line, {**row.data, "label": 0}))[:3] + (-1,)


# fmt: off
MC_FORMAT = RowFormat("multiple choice", MULTIPLE_CHOICE, ("question", "choices", "label"), _parse_user_mc,
                      '{"question", "choices", "label"} (optional "context")', ("question", "choices"))
ALPACA = RowFormat("Alpaca", GENERATION, ("instruction", "output"), parse_alpaca,
                   '{"instruction", "input" (optional), "output"}', ("instruction",))
PROMPT_RESPONSE = RowFormat("prompt/response", GENERATION, ("prompt", "response"), parse_prompt_response,
                            '{"prompt", "response"}', ("prompt",))
CHAT = RowFormat("chat", GENERATION, ("messages",), parse_chat,
                 '{"messages": [{"role", "content"}, ...]} ending in an assistant turn', ("messages",))
USER_FORMATS = (MC_FORMAT, ALPACA, PROMPT_RESPONSE, CHAT)
# the field that gives each format away, in the order they are tried
_SIGNS = (("messages", CHAT), ("instruction", ALPACA), ("output", ALPACA), ("prompt", PROMPT_RESPONSE),
          ("response", PROMPT_RESPONSE), ("choices", MC_FORMAT), ("question", MC_FORMAT), ("label", MC_FORMAT))
# fmt: on


def detect_format(row: Row) -> RowFormat:
    """The user row format ``row`` is in, from its keys; raises ``TaskDataError`` when it is in none."""
    for key, found in _SIGNS:
        if key in row.data:
            return found
    shapes = "; ".join(f"{f.name} {f.shape}" for f in USER_FORMATS)
    raise TaskDataError(f"{row.where()}: cannot tell the row format from the fields {sorted(row.data)!r:.200}; "
                        f"expected one of: {shapes}")  # fmt: skip


def check_columns(row: Row, fmt: RowFormat, first: Row | None, predict: bool = False) -> None:
    """Refuse a row that lacks a field of ``fmt`` (the format ``first``, the file's first row, was read in)."""
    columns = fmt.predict_columns if predict else fmt.columns
    missing = [c for c in columns if c not in row.data]
    if not missing:
        return
    where = f", the format of this file (detected at line {first.line})" if first is not None else ""
    other = ""
    if first is not None:
        looks = next((f for k, f in _SIGNS if k in row.data), None)
        other = f"; this row looks like a {looks.name} row" if looks is not None and looks is not fmt else ""
    raise TaskDataError(
        f"{row.where()}: missing column(s) {missing}; expected columns {list(columns)}, found {sorted(row.data)!r:.200}"
        f" (row format: {fmt.name} {fmt.shape}{where}{other})"
    )


def make_example(task: str, fmt: RowFormat, parsed: tuple, row: Row) -> Example | GenerationExample:
    """The item a parsed row gives, whitespace around its texts stripped (MCTest answers end in "\\r": it would
    leak into the answer tokens)."""
    if fmt.kind == GENERATION:
        context, prompt, target, references, history = parsed
        return GenerationExample(task, (context or "").strip() or None, prompt.strip(), target.strip(),
                                 [r.strip() for r in references], list(history))  # fmt: skip
    context, question, choices, label = parsed
    if len(choices) > len(LETTERS):  # the listed and lettered templates name choices A..J
        raise TaskDataError(
            f"{row.where()}: field 'choices' has {len(choices)} choices; at most {len(LETTERS)} "
            f"({LETTERS[0]}-{LETTERS[-1]}) can be listed in a prompt"
        )
    return Example(task, (context or "").strip() or None, question.strip(), [c.strip() for c in choices], label)


# --- the built-in generation tasks ---

CALCULATOR = re.compile(r"<<[^<>]*>>")


def parse_babi(row: Row) -> GenParsed:
    story = row.data["story"]
    if not isinstance(story, list) or not all(isinstance(s, str) for s in story):
        raise TaskDataError(f"{row.where()}: field 'story' should be a list of strings, got {story!r:.80}")
    context = "\n".join(s.strip() for s in story if s.strip()) or None
    answer = nonempty_text(row, "answer").strip()
    return context, nonempty_text(row, "question").strip(), answer, [answer], []


def parse_gsm8k(row: Row) -> GenParsed:
    """GSM8K: the worked solution is the target, without its ``<<48/2=24>>`` calculator annotations (the text
    around them already states each result); the number after ``####`` is the reference."""
    answer = nonempty_text(row, "answer")
    number = answer.rpartition("####")[2].strip() if "####" in answer else ""
    if not number:
        raise TaskDataError(f"{row.where()}: field 'answer' should end in a '#### <number>' line, got {answer!r:.80}")
    target = CALCULATOR.sub("", answer).strip()
    return None, nonempty_text(row, "question").strip(), target, [number], []


def babi_hub_rows(record: dict) -> list[dict]:
    """One hub ``facebook/babi_qa`` row (a whole story) -> our rows, one per question (``docs/data.md``).

    The hub row's ``story`` is a struct of lists (``id``, ``type`` 0 = context / 1 = question, ``text``,
    ``supporting_ids``, ``answer``), as ``datasets`` loads a sequence of structs; a list of per-line dicts is
    read too. A question's ``story`` is the context sentences before it; ``supporting_facts`` are 1-based
    positions in that list.
    """
    story = record["story"]
    if isinstance(story, dict):
        keys = ("id", "type", "text", "supporting_ids", "answer")
        lines = [dict(zip(keys, values, strict=True)) for values in zip(*(story[k] for k in keys), strict=True)]
    else:
        lines = list(story)
    rows, sentences, position = [], [], {}
    for line in lines:
        if line["type"] in (0, "context"):
            sentences.append(line["text"].strip())
            position[str(line["id"])] = len(sentences)
        else:
            rows.append({
                "story": list(sentences),
                "question": line["text"].strip(),
                "answer": line["answer"],
                "supporting_facts": [position[str(i)] for i in line["supporting_ids"]],
            })  # fmt: skip
    return rows
