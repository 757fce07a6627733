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

import yaml

from ..adapters.config import METHODS

SETTINGS = ("mixture", "single")
_FIELDS = {
    "name",
    "description",
    "config",
    "args",
    "methods",
    "settings",
    "seeds",
    "test",
    "commit_adapters",
    "results",
    "single_args",
    "compare_with",
}


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
    name: str
    config: list[str]
    methods: list[str]
    seeds: list[int]
    settings: list[str] = field(default_factory=lambda: ["mixture"])
    args: dict[str, object] = field(default_factory=dict)
    test: dict[str, object] = field(default_factory=dict)
    commit_adapters: list[int] = field(default_factory=list)
    description: str = ""
    source: str = ""
    results: str = ""
    single_args: dict[str, dict[str, object]] = field(default_factory=dict)
    compare_with: list[str] = field(default_factory=list)

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
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"protocol {path}: unknown field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    for key in ("name", "config", "methods", "seeds"):
        if key not in data:
            raise ValueError(f"protocol {path}: field {key!r} is required")
    config = [data["config"]] if isinstance(data["config"], str) else list(data["config"])
    for c in config:
        if not Path(c).is_file():
            raise ValueError(f"protocol {path}: config: {c!r} is not a file (paths are relative to the repository)")
    bad = [m for m in data["methods"] if m not in METHODS]
    if bad or not data["methods"]:
        raise ValueError(f"protocol {path}: methods: expected some of {', '.join(METHODS)}, got {data['methods']!r}")
    settings = data.get("settings", ["mixture"])
    if not settings or any(s not in SETTINGS for s in settings):
        raise ValueError(f"protocol {path}: settings: expected some of {', '.join(SETTINGS)}, got {settings!r}")
    seeds = data["seeds"]
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"protocol {path}: seeds: expected a list of integers >= 0, got {seeds!r}")
    for key in ("args", "test"):
        if not isinstance(data.get(key, {}), dict):
            raise ValueError(f"protocol {path}: {key}: expected a mapping of option -> value")
    results = data.get("results", "")
    if not isinstance(results, str):
        raise ValueError(f"protocol {path}: results: expected a folder path, got {results!r}")
    single_args = data.get("single_args", {})
    if not isinstance(single_args, dict) or not all(isinstance(v, dict) for v in single_args.values()):
        raise ValueError(f"protocol {path}: single_args: expected a mapping of task -> {{option: value}}")
    compare_with = data.get("compare_with", [])
    if not isinstance(compare_with, list) or not all(isinstance(c, str) and Path(c).is_file() for c in compare_with):
        raise ValueError(f"protocol {path}: compare_with: expected a list of protocol files, got {compare_with!r}")
    tasks = data.get("test", {}).get("data.tasks")
    if tasks is not None and (not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks)):
        raise ValueError(f"protocol {path}: test: data.tasks: expected a non-empty list of task names, got {tasks!r}")
    return Protocol(
        name=str(data["name"]),
        config=config,
        methods=list(data["methods"]),
        seeds=list(seeds),
        settings=list(settings),
        args=dict(data.get("args", {})),
        test=dict(data.get("test", {})),
        commit_adapters=list(data.get("commit_adapters", [])),
        description=str(data.get("description", "")),
        source=str(path),
        results=results,
        single_args={str(task): dict(options) for task, options in single_args.items()},
        compare_with=list(compare_with),
    )


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
