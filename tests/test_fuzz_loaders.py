"""Table-driven fuzzing of every task loader: malformed files end in a clear error naming the file and line, or
load correctly; never another exception.

Each loader (the user row formats: multiple choice, Alpaca, prompt/response, chat; the predict-file loader; the
built-in bAbI and GSM8K parsers) gets a good row, then one of many mutations of it: bytes that are not UTF-8,
empty and whitespace-only fields, wrong types (numbers, null, booleans, lists where strings belong, objects),
missing fields, lone surrogates, more choices than the prompt format can letter, a 5 MB line, JSON nested too
deeply, truncated JSON, a byte-order mark, and so on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mosld.data import Example, GenerationExample, TaskDataError, load_task
from mosld.data.rows import LETTERS
from mosld.data.tasks import load_predict_examples

GOOD = {
    "mc": {"question": "Which animal says moo?", "choices": ["cow", "cat", "duck"], "label": 0, "context": "A farm."},
    "alpaca": {"instruction": "Name a colour.", "input": "Sky", "output": "blue"},
    "prompt_response": {"prompt": "Say hi.", "response": "hi"},
    "chat": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    },
    "babi": {
        "story": ["Mary went home.", "John left."],
        "question": "Where is Mary?",
        "answer": "home",
        "supporting_facts": [1],
    },
    "gsm8k": {"question": "What is 1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"},
}
KIND = {"mc": Example, "babi": GenerationExample, "gsm8k": GenerationExample}
# fields that may be left out, be null, empty or blank (and still load)
OPTIONAL = {"mc": {"context"}, "alpaca": {"input"}, "babi": {"supporting_facts"}}
HUGE = "word " * 1_000_000  # a 5 MB line

WRONG_TYPES = {"int": 7, "float": 1.5, "null": None, "true": True, "list": ["a", "b"], "object": {"a": 1},
               "empty_list": [], "nested_list": [["a"]]}  # fmt: skip


def _set(row: dict, path: tuple, value) -> dict:
    row = json.loads(json.dumps(row))
    target = row
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return row


def _drop(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


def _leaves(fmt: str) -> list[tuple]:
    """Paths of the fields worth mutating."""
    if fmt == "chat":
        return [("messages",), ("messages", 0), ("messages", 1, "role"), ("messages", 1, "content"),
                ("messages", 2, "content"), ("messages", 0, "role")]  # fmt: skip
    return [(k,) for k in GOOD[fmt] if not (fmt == "babi" and k == "supporting_facts")]


def _get(row, path: tuple):
    for key in path:
        row = row[key]
    return row


def _accepts(fmt: str, path: tuple, name: str, value) -> bool:
    """Whether a row with ``value`` (mutation ``name``) at ``path`` is a valid row (so it must load)."""
    original, key = _get(GOOD[fmt], path), path[0]
    if name == "huge":  # any text may be long (a prompt too long for max_length is refused when encoded)
        return isinstance(original, str) and path[-1] != "role" and (fmt, key) != ("gsm8k", "answer")
    optional = len(path) == 1 and key in OPTIONAL.get(fmt, ())
    if optional and (value is None or isinstance(value, str) and not value.strip()):
        return True  # an optional field may be null, empty or blank
    if fmt == "mc" and key == "choices":
        return name == "list"  # ["a", "b"]: other choices, still valid
    if fmt == "babi" and key == "story":
        return name in ("list", "empty_list")  # a list of sentences, or none
    return False


def cases() -> list:
    out = []
    for fmt, good in GOOD.items():
        for path in _leaves(fmt):
            label = ".".join(map(str, path))
            mutations = {"empty": "", "blank": " \t\n ", "surrogate": "\ud800 x", **WRONG_TYPES}
            for name, value in mutations.items():
                out.append((fmt, f"{label}={name}", [good, _set(good, path, value)], _accepts(fmt, path, name, value)))
            if len(path) == 1:
                out.append((fmt, f"{label}=missing", [good, _drop(good, path[0])], path[0] in OPTIONAL.get(fmt, ())))
                first_ok = path[0] in OPTIONAL.get(fmt, ())
                out.append((fmt, f"{label}=missing-line1", [_drop(good, path[0]), good], first_ok))
            out.append((fmt, f"{label}=huge", [good, _set(good, path, HUGE)], _accepts(fmt, path, "huge", HUGE)))
        first, second = json.dumps(good).encode(), json.dumps(good).encode()
        out += [
            (fmt, "not-utf8", [first, second[:5] + b"\xff\xfe" + second[5:]], False),
            (
                fmt,
                "latin1-text",
                [first, json.dumps(good, ensure_ascii=False).replace("}", ', "x": "caf\xe9"}').encode("latin-1")],
                False,
            ),
            (fmt, "bom", [b"\xef\xbb\xbf" + first, second], True),
            (fmt, "truncated-json", [first, second[: len(second) // 2]], False),
            (fmt, "array-line", [first, b"[1, 2]"], False),
            (fmt, "string-line", [first, b'"text"'], False),
            (fmt, "deep-nesting", [first, b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"], False),
            (fmt, "extra-field", [first, _set(good, ("extra",), {"any": [1]})], True),
            (fmt, "blank-lines", [first, b"   ", b"", second], True),
            (fmt, "nan", [first, json.dumps(_set(good, (_leaves(fmt)[0][0],), float("nan"))).encode()], False),
            (fmt, "empty-object", [first, {}], False),
            (fmt, "null-bytes", [first, json.dumps(good).encode() + b"\x00"], False),
        ]
    too_many = [f"choice {i}" for i in range(len(LETTERS) + 1)]
    out += [
        ("mc", "label_ok", [GOOD["mc"], _set(GOOD["mc"], ("label",), 2)], True),
        ("mc", "label-out-of-range", [GOOD["mc"], _set(GOOD["mc"], ("label",), 3)], False),
        ("mc", "label-negative", [GOOD["mc"], _set(GOOD["mc"], ("label",), -1)], False),
        ("mc", "label-string", [GOOD["mc"], _set(GOOD["mc"], ("label",), "0")], False),
        ("mc", "choices-one", [GOOD["mc"], _set(GOOD["mc"], ("choices",), ["cow"])], False),
        ("mc", "choices-duplicate", [GOOD["mc"], _set(GOOD["mc"], ("choices",), ["cow", "cow "])], False),
        ("mc", "choices-with-number", [GOOD["mc"], _set(GOOD["mc"], ("choices",), ["cow", 3])], False),
        ("mc", "choices-with-blank", [GOOD["mc"], _set(GOOD["mc"], ("choices",), ["cow", "  "])], False),
        ("mc", "choices-eleven", [GOOD["mc"], _set(GOOD["mc"], ("choices",), too_many)], False),
        ("mc", "choices-ten", [GOOD["mc"], _set(GOOD["mc"], ("choices",), too_many[:-1])], True),
        ("mc", "choices-huge", [GOOD["mc"], _set(GOOD["mc"], ("choices",), ["cow", HUGE])], True),
        ("alpaca", "other-format-row", [GOOD["alpaca"], GOOD["prompt_response"]], False),
        ("prompt_response", "other-format-row", [GOOD["prompt_response"], GOOD["chat"]], False),
        ("chat", "other-format-row", [GOOD["chat"], GOOD["mc"]], False),
        ("mc", "other-format-row", [GOOD["mc"], GOOD["alpaca"]], False),
        ("chat", "ends-with-user", [GOOD["chat"], _set(GOOD["chat"], ("messages", 2, "role"), "user")], False),
        ("chat", "two-assistants", [GOOD["chat"], _set(GOOD["chat"], ("messages", 1, "role"), "assistant")], False),
        ("chat", "system-later", [GOOD["chat"], _set(GOOD["chat"], ("messages", 2, "role"), "system")], False),
        (
            "chat",
            "content-parts",
            [GOOD["chat"], _set(GOOD["chat"], ("messages", 1, "content"), [{"type": "text", "text": "Hi"}])],
            False,
        ),
        ("chat", "message-string", [GOOD["chat"], _set(GOOD["chat"], ("messages", 1), "Hi")], False),
        ("chat", "no-system", [GOOD["chat"], {"messages": GOOD["chat"]["messages"][1:]}], True),
        ("gsm8k", "no-final-number", [GOOD["gsm8k"], _set(GOOD["gsm8k"], ("answer",), "It is 2.")], False),
        ("gsm8k", "empty-final-number", [GOOD["gsm8k"], _set(GOOD["gsm8k"], ("answer",), "It is 2.\n####  ")], False),
        ("babi", "story-with-number", [GOOD["babi"], _set(GOOD["babi"], ("story",), ["Mary went home.", 3])], False),
    ]
    return out


CASES = cases()


def _write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _load(fmt: str, rows: list, root: Path):
    """Load ``rows`` as test split of a task in format ``fmt``: a user task, or a built-in one from a data dir."""
    if fmt == "babi":
        path = _write(root / "babi" / "en" / "qa1_single-supporting-fact" / "test.jsonl", rows)
        return path, lambda: load_task("babi_qa1", "test", root)
    if fmt == "gsm8k":
        path = _write(root / "openai__gsm8k" / "main" / "test.jsonl", rows)
        return path, lambda: load_task("gsm8k", "test", root)
    path = _write(root / "task" / "test.jsonl", rows)
    return path, lambda: load_task(str(path.parent), "test")


def _bad_line(rows: list) -> int:
    """1-based line of the first row that differs from the good first row (blank lines count)."""
    return 2 if len(rows) == 2 else len(rows)


def _check(load, path: Path, rows: list, should_load: bool, fmt: str) -> None:
    try:
        examples = load()
    except (TaskDataError, ValueError) as err:
        message = str(err)
        assert not should_load, f"a valid file was refused: {message[:300]}"
        assert str(path) in message, message[:300]
        lines = {f"{path}:{n}" for n in range(1, len(rows) + 1)}
        assert any(where in message for where in lines), f"no line number in: {message[:300]}"
        assert len(message) < 2000, "the message should quote the bad value briefly"
        return
    assert should_load, f"an invalid file loaded: {examples[-1]!r:.300}"
    kind = KIND.get(fmt, Example if fmt == "mc" else GenerationExample)
    for example in examples:
        assert isinstance(example, kind)
        if isinstance(example, Example):
            assert example.question.strip() and len(example.choices) >= 2 and 0 <= example.label < len(example.choices)
            assert all(c.strip() for c in example.choices) and len(example.choices) <= len(LETTERS)
        else:
            assert example.prompt.strip() and example.target.strip() and all(r.strip() for r in example.references)
            assert all(role in ("system", "user", "assistant") and text.strip() for role, text in example.history)
        for text in json.dumps([getattr(example, f) for f in vars(example)]).split():
            text.encode("utf-8")  # every field is valid text


@pytest.mark.parametrize(("fmt", "name", "rows", "should_load"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_loaders_end_in_a_clear_error_or_load_correctly(tmp_path, fmt, name, rows, should_load):
    path, load = _load(fmt, rows, tmp_path)
    _check(load, path, rows, should_load, fmt)


PREDICT = [c for c in CASES if c[0] in ("mc", "alpaca", "prompt_response", "chat")]


@pytest.mark.parametrize(("fmt", "name", "rows", "should_load"), PREDICT, ids=[f"{c[0]}-{c[1]}" for c in PREDICT])
def test_the_predict_loader_ends_in_a_clear_error_or_loads(tmp_path, fmt, name, rows, should_load):
    """Predict files may leave the target out; anything else bad is refused as by the task loaders."""
    path = _write(tmp_path / "predict.jsonl", rows)
    target_missing = name in ("ends-with-user", *(f"{k}={how}" for k in ("label", "output", "response")
                                                    for how in ("missing", "null", "missing-line1")))  # fmt: skip
    try:
        examples = load_predict_examples(path)
    except (TaskDataError, ValueError) as err:
        assert not (should_load or target_missing), f"a valid file was refused: {str(err)[:300]}"
        assert str(path) in str(err) and any(f"{path}:{n}" in str(err) for n in range(1, len(rows) + 1)), str(err)[:300]
        return
    assert should_load or target_missing, f"loaded: {examples[-1]!r:.300}"


def test_an_empty_file_names_the_file(tmp_path):
    path = _write(tmp_path / "task" / "test.jsonl", [b""])
    with pytest.raises(TaskDataError, match=rf"split 'test' is empty \({path}\)"):
        load_task(str(path.parent), "test")
    with pytest.raises(TaskDataError, match=rf"{path}: no questions to predict"):
        load_predict_examples(path)
