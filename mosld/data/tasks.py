"""Task registry: Hugging Face datasets and user JSONL tasks, mapped to ``Example`` (multiple choice) or
``GenerationExample`` (free text) items.

A built-in task is read from a local data directory laid out as ``<owner>__<name>/<config>/<split>.jsonl``
(the layout of the project's ``shared/data``; bAbI: ``babi/en/qa<N>_<name>/<split>.jsonl``), or else from the
Hugging Face Hub with ``datasets.load_dataset(<hub name>, <config>, split=...)``. A user task is a JSONL file, or
a folder of ``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl``, each in one of the row formats of
``mosld.data.formats`` (multiple choice, Alpaca, prompt/response, chat), detected per file from its first row.

Splits follow the paper's protocol (see ``docs/data.md``): ``test`` is the official labelled test split, or the
validation split where test labels are not public; ``validation`` is the official validation split unless that
split became the test split or does not exist, in which case 10% of train is held out with a fixed seed.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# the row formats and generation parsers live in formats.py, the row shapes (Row, Example, GenerationExample) and
# multiple-choice parsers in rows.py; their names are kept here too, where the rest of mosld imports them from
from .formats import (
    CHAT,
    GENERATION,
    MC_FORMAT,
    MULTIPLE_CHOICE,
    RowFormat,
    babi_hub_rows,
    check_columns,
    detect_format,
    make_example,
    parse_babi,
    parse_gsm8k,
    read_jsonl,
)
from .generation import GenerationSpec, user_task_defaults
from .rows import (  # noqa: F401 -- re-exported
    LETTERS,
    MMLU_HEADER,
    Example,
    GenerationExample,
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
    _parse_user,  # noqa: F401 -- re-exported
)
from .sampling import stratified_indices

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
HOLDOUT_FRACTION = 0.1
# Fixed, independent of any training seed, so every run holds out (and evaluates on) the same examples.
HOLDOUT_SEED = 20241212
EVAL_SAMPLE_SEED = 0
DATA_DIR_ENV = "MOSLD_DATA_DIR"
USER_COLUMNS = MC_FORMAT.columns


@dataclass(frozen=True)
class TaskSpec:
    """How one registry task maps its hub dataset to ``Example``s.

    Attributes:
        name: Registry name.
        hub_name: Hugging Face Hub dataset id.
        configs: Hub configs; several are concatenated split by split (MCTest: mc160 + mc500).
        columns: Columns a row must have.
        parse: Turns a row into (context, question, choices, label), or for a generation task (context, prompt,
            target, references, history); raises ``TaskDataError``.
        family: Prompt family (``science``, ``passage``, ``yesno``, ``mmlu``; ``generation``), picks the default
            template.
        test_source: Source split used as ``test``; ``validation`` where test labels are not public.
        hub_splits: Splits the hub dataset has.
        eval_only: Left out of training by default (BoolQ: the local train split has no passages).
        train_size: Seeded subsample size of train when the source has more rows (RACE: the paper's 10,083).
        stratum: The stratum of an example for a seeded evaluation sample (``seeded_sample``): a capped sample
            then takes every stratum in proportion to its size (MMLU: the subject); ``None`` for a plain sample.
        min_length: Token budget of this task's sequences when ``max_length`` is smaller (MMLU: evaluation-only,
            its questions are never cut, and 1,433 of its 14,042 test items need more than 256 tokens).
        generation: How a generation task is decoded and scored; ``None`` for a multiple-choice task.
        local_glob: Where the local copy is, as a glob under the data directory, when it is not laid out as
            ``<owner>__<name>/<config>`` (bAbI: ``babi/en/qa1_*``).
        hub_convert: Turns one hub row into the local rows (bAbI: a story into one row per question).
    """

    name: str
    hub_name: str
    configs: tuple[str, ...]
    columns: tuple[str, ...]
    parse: Callable[[Row], tuple]
    family: str
    test_source: str = "test"
    hub_splits: tuple[str, ...] = SPLITS
    eval_only: bool = False
    train_size: int | None = None
    stratum: Callable[[Example], str] | None = None
    min_length: int | None = None
    generation: GenerationSpec | None = None
    local_glob: str | None = None
    hub_convert: Callable[[dict], list[dict]] | None = None

    @property
    def row_format(self) -> RowFormat:
        kind = MULTIPLE_CHOICE if self.generation is None else GENERATION
        return RowFormat(self.name, kind, self.columns, self.parse)

    def local_dir(self, data_dir: Path, config: str) -> Path:
        if self.local_glob is not None:  # bAbI: babi/en/qa1_single-supporting-fact, found by its "qa1_" prefix
            return next(iter(sorted(data_dir.glob(self.local_glob))), data_dir / self.local_glob)
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
        TaskSpec("gsm8k", "openai/gsm8k", ("main",), ("question", "answer"), parse_gsm8k, "generation",
                 hub_splits=("train", "test"), generation=GenerationSpec("final_number", 256, (), "plain")),
        *(TaskSpec(f"babi_qa{n}", "facebook/babi_qa", (f"en-qa{n}",), ("story", "question", "answer"), parse_babi,
                   "generation", hub_splits=("train", "test"), local_glob=f"babi/en/qa{n}_*",
                   hub_convert=babi_hub_rows,
                   # qa8 (lists/sets) answers are comma-separated sets; qa19's paths ("n,w") are ordered
                   generation=GenerationSpec("set_match" if n == 8 else "exact_match", 8, ("\n",), "plain"))
          for n in range(1, 21)),
    )
}  # fmt: skip
KNOWN_TASKS: tuple[str, ...] = tuple(TASKS)
PAPER_TASKS: tuple[str, ...] = ("openbookqa", "commonsense_qa", "race", "mctest", "arc_easy", "arc_challenge")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory to use: the argument, else ``$MOSLD_DATA_DIR``, else ``None`` (hub only)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen).expanduser() if chosen is not None else None


_WARNED_DUPLICATES: set[tuple[str, str, str]] = set()  # (task, split, first place) already reported


class _Source:
    """Where a task's raw splits come from: local files, or the hub."""

    def __init__(self, name: str):
        self.name = name

    def available(self) -> set[str]:
        raise NotImplementedError

    def rows(self, split: str) -> list[Row]:
        raise NotImplementedError

    def describe(self, split: str) -> str:
        raise NotImplementedError

    def row_format(self, split: str) -> RowFormat:
        """The format the rows of ``split`` are in."""
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """``multiple_choice`` or ``generation``."""
        raise NotImplementedError

    def examples(self, split: str) -> list[Example] | list[GenerationExample]:
        self.kind  # noqa: B018 -- a user task's files must all hold one kind of item
        rows, fmt = self.rows(split), self.row_format(split)
        first = rows[0] if rows and isinstance(self, _UserSource) else None
        examples, duplicated = [], []
        for row in rows:
            try:
                check_columns(row, fmt, first)
                example = make_example(self.name, fmt, fmt.parse(row), row)
            except TaskDataError as err:
                raise TaskDataError(f"task {self.name!r}: {err}") from None
            if isinstance(example, Example) and _first_duplicate(example.choices) is not None:
                duplicated.append(row.where())
            examples.append(example)
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
        super().__init__(spec.name)
        self.spec, self.data_dir = spec, data_dir
        dirs = [spec.local_dir(data_dir, c) for c in spec.configs] if data_dir is not None else []
        # Local only when every config is there; a partial copy would silently drop rows.
        self.local_dirs = dirs if dirs and all(d.is_dir() for d in dirs) else []

    def available(self) -> set[str]:
        if self.local_dirs:
            return {s for s in SPLITS if all((d / f"{s}.jsonl").is_file() for d in self.local_dirs)}
        return set(self.spec.hub_splits)

    def row_format(self, split: str) -> RowFormat:
        return self.spec.row_format

    @property
    def kind(self) -> str:
        return self.spec.row_format.kind

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
        convert = self.spec.hub_convert or (lambda record: [record])
        rows = (row for record in dataset for row in convert(dict(record)))
        return (Row(source, i, r) for i, r in enumerate(rows, start=1))


class _UserSource(_Source):
    def __init__(self, path: Path):
        self.files = _user_split_files(path)
        if path.is_file():  # data/quiz.jsonl is task "quiz"; data/quiz/test.jsonl too
            name = path.parent.name if path.stem in SPLITS else path.stem
        else:
            name = path.name
        super().__init__(name)
        self.path = path

    def available(self) -> set[str]:
        return set(self.files)

    def describe(self, split: str) -> str:
        return str(self.files.get(split, self.path))

    def rows(self, split: str) -> list[Row]:
        return list(read_jsonl(self.files[split]))

    def row_format(self, split: str) -> RowFormat:
        rows = self.rows(split)
        if not rows:  # an empty split: refused as empty by examples()
            return MC_FORMAT
        try:
            return detect_format(rows[0])
        except TaskDataError as err:
            raise TaskDataError(f"task {self.name!r}: {err}") from None

    @property
    def kind(self) -> str:
        """The kind of item of the task's files, which must all hold the same kind."""
        formats = {split: self.row_format(split) for split in self.files if self.rows(split)}
        kinds = {fmt.kind for fmt in formats.values()}
        if len(kinds) > 1:
            found = ", ".join(f"{self.files[s]} holds {f.name} rows ({f.kind})" for s, f in formats.items())
            raise TaskDataError(
                f"task {self.name!r}: its split files must hold the same kind of item (multiple choice or "
                f"generation): {found}"
            )
        return kinds.pop() if kinds else MULTIPLE_CHOICE

    def generation_defaults(self) -> GenerationSpec:
        """ROUGE-L, 128 new tokens, no stop string; the chat template for chat rows (where the tokenizer has one)."""
        formats = [self.row_format(split) for split in SPLITS if split in self.files]
        return user_task_defaults(CHAT in formats[:1])


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


def task_kind(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """``multiple_choice`` or ``generation``: a registry task's, or what a user task's files hold."""
    if name in TASKS:
        return TASKS[name].row_format.kind
    return _source(name, resolve_data_dir(data_dir)).kind


def generation_defaults(name: str) -> GenerationSpec | None:
    """A generation task's default ``GenerationSpec`` (``None`` for a multiple-choice task); a user task's says
    ``chat`` for chat rows, which the data module turns to ``plain`` for a tokenizer without a chat template."""
    if name in TASKS:
        return TASKS[name].generation
    source = _source(name, None)
    return source.generation_defaults() if source.kind == GENERATION else None


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
        keep = stratified_indices([spec.stratum(e) for e in examples], limit, seed)
    else:
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


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


def load_predict_examples(path: str | os.PathLike) -> list[Example] | list[GenerationExample]:
    """Items to predict, from a file in any user row format whose targets may be missing: a multiple-choice row
    without ``label`` is recorded with label -1, a generation row without its target has no references."""
    rows = read_jsonl(path)
    if not rows:
        raise TaskDataError(f"{path}: no questions to predict")
    fmt = detect_format(rows[0])
    examples = []
    for row in rows:
        check_columns(row, fmt, rows[0], predict=True)
        examples.append(make_example("predict", fmt, fmt.parse(row, need_target=False), row))
    return examples
