"""A protocol: methods x settings x seeds over a base config, read from ``configs/experiments/<name>.yaml``.

Example::

    name: cpu
    config: [configs/mosld.yaml]          # base config files, composed left to right
    args: {trainer.max_steps: 200}         # options for every fit (as on the command line)
    methods: [lora, mola, mosl, mosld]
    settings: [mixture]                    # and/or single (one model per task)
    seeds: [0, 1, 2]
    test: {data.tasks: [arc_easy, boolq, mmlu], data.max_eval_examples: 300}   # options of the test pass
    commit_adapters: [0, 1, 2]             # seeds whose exported adapter goes beside the record
    results: experiments/results/cpu       # where the records go (this default: experiments/results/<name>)
    single_args: {arc_easy: {trainer.max_steps: 25}}   # options of one task's fits in the single setting
    compare_with: [configs/experiments/cpu.yaml]       # protocols whose trained runs the results page adds

The test tasks that are not training tasks (BoolQ, MMLU: evaluation-only) are the out-of-domain tasks; a
record that lacks a test task is topped up by the sweep (tested on the missing tasks from its kept adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import NonNegativeInt

from ..adapters.config import Method

Setting = Literal["mixture", "single"]


@dataclass(frozen=True)
class Run:
    """One run of a protocol (in the single setting: one model per training task, recorded together)."""

    method: str
    setting: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.setting}-seed{self.seed}"

    def matches(self, only: dict[str, str]) -> bool:
        """Whether the run passes an ``--only`` filter such as ``{"method": "mosld", "seed": "1"}``."""
        return all(str(getattr(self, key)) in values.split("|") for key, values in only.items())


@dataclass
class Protocol:
    """The fields of a protocol file, typed: jsonargparse checks a file against them (``load_protocol``).

    ``source`` is the file it was read from (not a field of the file). What the types cannot say (lists that
    must not be empty, files that must exist) ``__post_init__`` checks, naming the field.
    """

    name: str
    config: str | list[str]
    methods: list[Method]
    seeds: list[NonNegativeInt]
    settings: list[Setting] = field(default_factory=lambda: ["mixture"])
    args: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    commit_adapters: list[int] = field(default_factory=list)
    description: str = ""
    source: str = ""
    results: str = ""
    single_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    compare_with: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config = [self.config] if isinstance(self.config, str) else list(self.config)
        self.seeds = [int(s) for s in self.seeds]  # plain ints (jsonargparse keeps its NonNegativeInt)
        for c in self.config:
            if not Path(c).is_file():
                raise ValueError(f"config: {c!r} is not a file (paths are relative to the repository)")
        for key in ("methods", "seeds", "settings"):
            if not getattr(self, key):
                raise ValueError(f"{key}: expected a non-empty list")
        missing = [c for c in self.compare_with if not Path(c).is_file()]
        if missing:
            raise ValueError(f"compare_with: expected a list of protocol files, got {missing!r} (no such file)")
        tasks = self.test.get("data.tasks")
        if tasks is not None and (
            not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks)
        ):
            raise ValueError(f"test: data.tasks: expected a non-empty list of task names, got {tasks!r}")

    @property
    def results_dir(self) -> Path:
        """Where the protocol's records live: its ``results`` field, else ``experiments/results/<name>``."""
        return Path(self.results or Path("experiments/results") / self.name)

    @property
    def test_tasks(self) -> list[str] | None:
        """The tasks of the test pass (``test: {data.tasks: [...]}``); ``None`` when the base config's are used."""
        tasks = self.test.get("data.tasks")
        return [str(t) for t in tasks] if tasks is not None else None

    def runs(self, only: dict[str, str] | None = None) -> list[Run]:
        """The runs in order: seed, then setting, then method (so a partial sweep covers every method early)."""
        runs = [Run(m, s, k) for k in self.seeds for s in self.settings for m in self.methods]
        return [r for r in runs if r.matches(only or {})]


def protocol_parser() -> ArgumentParser:
    """jsonargparse's parser of a protocol file's fields (``Protocol``'s, less ``source``)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Protocol, skip={"source"}, instantiate=False)
    return parser


def load_protocol(path: str | Path) -> Protocol:
    """Read and check a protocol file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"protocol {path}: no such file (protocols live in configs/experiments/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"protocol {path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"protocol {path}: expected a mapping of fields, got {type(data).__name__}")
    try:
        fields = protocol_parser().parse_object(data)
        return Protocol(**fields.as_dict(), source=str(path))
    except Exception as err:  # jsonargparse's ArgumentError names the field; __post_init__'s ValueError too
        raise ValueError(f"protocol {path}: {err}") from err


def parse_only(text: str | None) -> dict[str, str]:
    """``"method=mosld,seed=1"`` -> ``{"method": "mosld", "seed": "1"}``; ``|`` separates alternatives."""
    if not text:
        return {}
    only = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("method", "setting", "seed"):
            raise ValueError(f"--only: expected method=..., setting=... or seed=... separated by commas, got {part!r}")
        only[key.strip()] = value.strip()
    return only
