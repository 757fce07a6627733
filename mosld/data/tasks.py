"""Task registry: Hugging Face multiple-choice datasets and user JSONL tasks, mapped to one ``Example`` shape.

A built-in task is read from a local data directory laid out as ``<owner>__<name>/<config>/<split>.jsonl``
(the layout of the project's ``shared/data``), or else from the Hugging Face Hub with
``datasets.load_dataset(<hub name>, <config>, split=...)``. A user task is a JSONL file, or a folder of
``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl``, with rows ``{"question", "choices", "label"}`` and an
optional ``"context"``.

Splits follow the paper's protocol (see ``docs/data.md``): ``test`` is the official labelled test split, or the
validation split where test labels are not public; ``validation`` is the official validation split unless that
split became the test split or does not exist, in which case 10% of train is held out with a fixed seed.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# the row shapes and parsers live in rows.py; the names are kept here, where the rest of mosld imports them from
from .rows import (  # noqa: F401 -- re-exported
    LETTERS,
    MMLU_HEADER,
    Example,
    Parsed,
    Row,
    TaskDataError,
    _first_duplicate,
    _mmlu_subject,
    _parse_arc,
    _parse_boolq,
    _parse_mctest,
    _parse_mmlu,
    _parse_openbookqa,
    _parse_race,
    _parse_user,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
HOLDOUT_FRACTION = 0.1
# Fixed, independent of any training seed, so every run holds out (and evaluates on) the same examples.
HOLDOUT_SEED = 20241212
EVAL_SAMPLE_SEED = 0
DATA_DIR_ENV = "MOSLD_DATA_DIR"
USER_COLUMNS = ("question", "choices", "label")


@dataclass(frozen=True)
class TaskSpec:
    """How one registry task maps its hub dataset to ``Example``s.

    Attributes:
        name: Registry name.
        hub_name: Hugging Face Hub dataset id.
        configs: Hub configs; several are concatenated split by split (MCTest: mc160 + mc500).
        columns: Columns a row must have.
        parse: Turns a row into (context, question, choices, label); raises ``TaskDataError``.
        family: Prompt family (``science``, ``passage``, ``yesno`` or ``mmlu``), picks the default template.
        test_source: Source split used as ``test``; ``validation`` where test labels are not public.
        hub_splits: Splits the hub dataset has.
        eval_only: Left out of training by default (BoolQ: the local train split has no passages).
        train_size: Seeded subsample size of train when the source has more rows (RACE: the paper's 10,083).
        stratum: The stratum of an example for a seeded evaluation sample (``seeded_sample``): a capped sample
            then takes every stratum in proportion to its size (MMLU: the subject); ``None`` for a plain sample.
        min_length: Token budget of this task's sequences when ``max_length`` is smaller (MMLU: evaluation-only,
            its questions are never cut, and 1,433 of its 14,042 test items need more than 256 tokens).
    """

    name: str
    hub_name: str
    configs: tuple[str, ...]
    columns: tuple[str, ...]
    parse: Callable[[Row], Parsed]
    family: str
    test_source: str = "test"
    hub_splits: tuple[str, ...] = SPLITS
    eval_only: bool = False
    train_size: int | None = None
    stratum: Callable[[Example], str] | None = None
    min_length: int | None = None

    def local_dir(self, data_dir: Path, config: str) -> Path:
        return data_dir / self.hub_name.replace("/", "__") / config


_ARC_COLUMNS = ("question", "choices", "answerKey")
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("openbookqa", "allenai/openbookqa", ("main",), ("question_stem", "choices", "answerKey"),
                 _parse_openbookqa, "science"),
        TaskSpec("commonsense_qa", "tau/commonsense_qa", ("default",), ("question", "choices", "answerKey"),
                 _parse_arc, "science", test_source="validation"),
        TaskSpec("race", "ehovy/race", ("all",), ("article", "question", "options", "answer"),
                 _parse_race, "passage", train_size=10083),
        TaskSpec("mctest", "sagnikrayc/mctest", ("mc160", "mc500"), ("story", "question", "answer_options", "answer"),
                 _parse_mctest, "passage"),
        TaskSpec("arc_easy", "allenai/ai2_arc", ("ARC-Easy",), _ARC_COLUMNS, _parse_arc, "science"),
        TaskSpec("arc_challenge", "allenai/ai2_arc", ("ARC-Challenge",), _ARC_COLUMNS, _parse_arc, "science"),
        TaskSpec("boolq", "google/boolq", ("default",), ("question", "passage", "answer"), _parse_boolq, "yesno",
                 test_source="validation", hub_splits=("train", "validation"), eval_only=True),
        # no train split; dev (5 per subject, the few-shot pool) is not one of the three splits
        TaskSpec("mmlu", "cais/mmlu", ("all",), ("question", "subject", "choices", "answer"), _parse_mmlu, "mmlu",
                 hub_splits=("validation", "test"), eval_only=True, stratum=_mmlu_subject,
                 min_length=2048),
    )
}  # fmt: skip
KNOWN_TASKS: tuple[str, ...] = tuple(TASKS)
PAPER_TASKS: tuple[str, ...] = ("openbookqa", "commonsense_qa", "race", "mctest", "arc_easy", "arc_challenge")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory to use: the argument, else ``$MOSLD_DATA_DIR``, else ``None`` (hub only)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen).expanduser() if chosen is not None else None


@lru_cache(maxsize=64)
def _read_jsonl_cached(path: str, mtime_ns: int, size: int) -> tuple[Row, ...]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(data, dict):
                raise TaskDataError(f"{path}:{number}: expected a JSON object per line, got {type(data).__name__}")
            rows.append(Row(path, number, data))
    return tuple(rows)


def read_jsonl(path: str | os.PathLike) -> tuple[Row, ...]:
    """Rows of a JSONL file (cached while the file is unchanged); bad JSON is reported with file and line."""
    stat = Path(path).stat()
    return _read_jsonl_cached(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


_WARNED_DUPLICATES: set[tuple[str, str, str]] = set()  # (task, split, first place) already reported


class _Source:
    """Where a task's raw splits come from: local files, or the hub."""

    def __init__(self, name: str, columns: Sequence[str], parse: Callable[[Row], Parsed]):
        self.name, self.columns, self.parse = name, tuple(columns), parse

    def available(self) -> set[str]:
        raise NotImplementedError

    def rows(self, split: str) -> list[Row]:
        raise NotImplementedError

    def describe(self, split: str) -> str:
        raise NotImplementedError

    def examples(self, split: str) -> list[Example]:
        examples, duplicated = [], []
        for row in self.rows(split):
            missing = [c for c in self.columns if c not in row.data]
            if missing:
                raise TaskDataError(
                    f"task {self.name!r}: {row.where()}: missing column(s) {missing}; expected columns "
                    f"{list(self.columns)}, found {sorted(row.data)}"
                )
            try:
                context, question, choices, label = self.parse(row)
            except TaskDataError as err:
                raise TaskDataError(f"task {self.name!r}: {err}") from None
            # Source files carry stray whitespace (MCTest answers end in "\r"); it would leak into the answer tokens.
            context = context.strip() if context else None
            if _first_duplicate(choices) is not None:
                duplicated.append(row.where())
            examples.append(Example(self.name, context or None, question.strip(), [c.strip() for c in choices], label))
        # User tasks refuse these (_parse_user); a benchmark is kept as published, to compare. Said once per
        # file: a split is read again when validation is held out from train.
        if duplicated and (self.name, split, duplicated[0]) not in _WARNED_DUPLICATES:
            _WARNED_DUPLICATES.add((self.name, split, duplicated[0]))
            log.warning(
                "task %s split %s: %d items repeat a choice (first at %s); an item whose gold is a later copy "
                "can never be scored correct (kept, as in the published benchmark)",
                self.name,
                split,
                len(duplicated),
                duplicated[0],
            )
        if not examples:
            raise TaskDataError(f"task {self.name!r}: split {split!r} is empty ({self.describe(split)})")
        return examples


class _BuiltinSource(_Source):
    def __init__(self, spec: TaskSpec, data_dir: Path | None):
        super().__init__(spec.name, spec.columns, spec.parse)
        self.spec, self.data_dir = spec, data_dir
        dirs = [spec.local_dir(data_dir, c) for c in spec.configs] if data_dir is not None else []
        # Local only when every config is there; a partial copy would silently drop rows.
        self.local_dirs = dirs if dirs and all(d.is_dir() for d in dirs) else []

    def available(self) -> set[str]:
        if self.local_dirs:
            return {s for s in SPLITS if all((d / f"{s}.jsonl").is_file() for d in self.local_dirs)}
        return set(self.spec.hub_splits)

    def describe(self, split: str) -> str:
        if self.local_dirs:
            return ", ".join(str(d / f"{split}.jsonl") for d in self.local_dirs)
        return f"hub dataset {self.spec.hub_name} configs {list(self.spec.configs)} split {split!r}"

    def rows(self, split: str) -> list[Row]:
        if self.local_dirs:
            return [row for d in self.local_dirs for row in read_jsonl(d / f"{split}.jsonl")]
        return [row for config in self.spec.configs for row in self._hub_rows(config, split)]

    def _hub_rows(self, config: str, split: str) -> Iterator[Row]:
        tried = (
            f"local copy {self.spec.local_dir(self.data_dir, config)} (not found)"
            if self.data_dir is not None
            else f"no data directory (pass data_dir or set ${DATA_DIR_ENV})"
        )
        try:
            import datasets

            dataset = datasets.load_dataset(self.spec.hub_name, config, split=split)
        except Exception as err:
            raise TaskDataError(
                f"task {self.name!r}: {tried}; loading hub dataset {self.spec.hub_name!r} config {config!r} "
                f"split {split!r} failed: {type(err).__name__}: {err}"
            ) from err
        source = f"hub:{self.spec.hub_name}/{config}/{split}"
        return (Row(source, i, dict(r)) for i, r in enumerate(dataset, start=1))


class _UserSource(_Source):
    def __init__(self, path: Path):
        self.files = _user_split_files(path)
        if path.is_file():  # data/quiz.jsonl is task "quiz"; data/quiz/test.jsonl too
            name = path.parent.name if path.stem in SPLITS else path.stem
        else:
            name = path.name
        super().__init__(name, USER_COLUMNS, _parse_user)
        self.path = path

    def available(self) -> set[str]:
        return set(self.files)

    def describe(self, split: str) -> str:
        return str(self.files.get(split, self.path))

    def rows(self, split: str) -> list[Row]:
        return list(read_jsonl(self.files[split]))


def _user_split_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        # A lone file is the split its name says (test.jsonl), otherwise the training data.
        return {path.stem if path.stem in SPLITS else "train": path}
    files = {s: path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").is_file()}
    if not files:
        raise TaskDataError(f"user task folder {path} holds none of {[f'{s}.jsonl' for s in SPLITS]}")
    return files


def is_user_task(name: str) -> bool:
    """Whether ``name`` refers to a user task (a path) rather than a registry name."""
    return name not in TASKS and (Path(name).exists() or name.endswith(".jsonl") or os.sep in name or "/" in name)


def _source(name: str, data_dir: Path | None) -> _Source:
    if name in TASKS:
        return _BuiltinSource(TASKS[name], data_dir)
    if is_user_task(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise TaskDataError(f"user task {name!r}: no such file or folder")
        return _UserSource(path)
    raise TaskDataError(
        f"unknown task {name!r}; known tasks: {', '.join(KNOWN_TASKS)} (or a path to a JSONL file or a folder of "
        "train/validation/test.jsonl files)"
    )


def task_name(name: str) -> str:
    """The name examples of ``name`` carry: the registry name, or a user task's folder/file name."""
    return name if name in TASKS else _source(name, None).name


def task_family(name: str) -> str:
    """Prompt family of a task; user tasks use the passage family (its context part is dropped when absent)."""
    return TASKS[name].family if name in TASKS else "passage"


def is_eval_only(name: str) -> bool:
    """Whether a task is left out of training by default."""
    return name in TASKS and TASKS[name].eval_only


def split_plan(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Which source split each of train/validation/test comes from, e.g. ``{"validation": "train[10% held out]"}``."""
    source = _source(name, resolve_data_dir(data_dir))
    plan = {}
    for split in SPLITS:
        try:
            source_split, part = _plan(source, split)
        except TaskDataError:
            continue
        plan[split] = {"all": source_split, "kept": "train minus 10% held out", "held_out": "10% of train"}[part]
    return plan


def _plan(source: _Source, split: str) -> tuple[str, str]:
    """(source split, part) for a split; part is ``all``, ``kept`` (train minus hold-out) or ``held_out``."""
    if split not in SPLITS:
        raise TaskDataError(f"split {split!r}: expected one of {list(SPLITS)}")
    available = source.available()
    wanted = source.spec.test_source if isinstance(source, _BuiltinSource) else "test"
    test = wanted if wanted in available else "validation" if "validation" in available else None
    hold_out = "train" in available and ("validation" not in available or test == "validation")
    if split == "test":
        if test is None:
            raise TaskDataError(
                f"task {source.name!r}: no test split (looked for {wanted!r}, then 'validation' in "
                f"{source.describe(wanted)})"
            )
        if test != wanted:
            log.warning(
                "task %s: no %r split (%s not found); using the validation split as the test split and holding "
                "out 10%% of train for validation",
                source.name,
                wanted,
                source.describe(wanted),
            )
        return test, "all"
    if split == "validation":
        if hold_out:
            return "train", "held_out"
        if "validation" in available:
            return "validation", "all"
    elif "train" in available:
        return "train", "kept" if hold_out else "all"
    raise TaskDataError(f"task {source.name!r}: no {split!r} split and no train split to derive it from")


def _held_out_indices(n: int) -> set[int]:
    count = max(1, round(HOLDOUT_FRACTION * n)) if n > 1 else 0
    return set(random.Random(HOLDOUT_SEED).sample(range(n), count))


def seeded_sample(examples: list, limit: int | None, seed: int) -> list:
    """At most ``limit`` examples drawn with ``seed``, kept in their original order.

    Examples of a registry task with a ``stratum`` (MMLU: the subject) are drawn stratified: each stratum gets
    its share of ``limit`` in proportion to its size (largest remainders, ties to the earlier stratum), drawn
    with ``seed``; other tasks get a simple random sample (unchanged, so earlier records' items still pair).
    """
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise ValueError(f"limit: expected a positive number of examples, got {limit}")
    # anything else with a list to sample from (encoded items, say) has no task: a simple random sample
    spec = TASKS.get(getattr(examples[0], "task", None))
    if spec is not None and spec.stratum is not None and all(getattr(e, "task", None) == spec.name for e in examples):
        keep = _stratified_indices([spec.stratum(e) for e in examples], limit, seed)
    else:
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def _stratified_indices(strata: list[str], limit: int, seed: int) -> list[int]:
    """``limit`` indices drawn within each stratum in proportion to its size (proportional allocation)."""
    members: dict[str, list[int]] = {}
    for i, stratum in enumerate(strata):
        members.setdefault(stratum, []).append(i)
    names = sorted(members)
    quotas = {s: limit * len(members[s]) / len(strata) for s in names}
    counts = {s: int(quotas[s]) for s in names}
    # the seats left go to the largest remainders (Hamilton's method), so the counts sum to limit
    by_remainder = sorted(names, key=lambda s: (counts[s] - quotas[s], names.index(s)))
    for s in by_remainder[: limit - sum(counts.values())]:
        counts[s] += 1
    rng = random.Random(seed)
    return sorted(i for s in names for i in rng.sample(members[s], counts[s]))


def load_task(name: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Load one split of a task as ``Example``s.

    Args:
        name: Registry name (see ``KNOWN_TASKS``) or a path to a user task (JSONL file or folder of split files).
        split: ``train``, ``validation`` or ``test``, in the paper's sense (see module docstring).
        data_dir: Local data directory (``<owner>__<name>/<config>/<split>.jsonl``); default ``$MOSLD_DATA_DIR``,
            and the Hugging Face Hub when neither is set or the task is not there.

    Returns:
        The split's examples, in file order.

    Raises:
        TaskDataError: Unknown task, unreadable or malformed data, empty split.
    """
    source = _source(name, resolve_data_dir(data_dir))
    source_split, part = _plan(source, split)
    examples = source.examples(source_split)
    if source_split == "train" and isinstance(source, _BuiltinSource):
        examples = seeded_sample(examples, source.spec.train_size, HOLDOUT_SEED)
    if part != "all":
        held_out = _held_out_indices(len(examples))
        examples = [e for i, e in enumerate(examples) if (i in held_out) == (part == "held_out")]
    if not examples:
        raise TaskDataError(f"task {source.name!r}: split {split!r} is empty ({source.describe(source_split)})")
    return examples


def load_predict_examples(path: str | os.PathLike) -> list[Example]:
    """Questions to predict: user-task rows whose ``label`` may be missing (then recorded as -1)."""
    rows = read_jsonl(path)
    examples = []
    for row in rows:
        data = dict(row.data)
        has_label = "label" in data
        data.setdefault("label", 0)
        context, question, choices, label = _parse_user(Row(row.source, row.line, data))
        examples.append(
            Example("predict", context, question.strip(), [c.strip() for c in choices], label if has_label else -1)
        )
    if not examples:
        raise TaskDataError(f"{path}: no questions to predict")
    return examples
