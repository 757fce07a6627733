"""Run a protocol: every (method, setting, seed) is an ordinary ``fit`` and ``test`` through the training
CLI (``python -m mosld.training``, the code path of ``python main.py``), each in its own process.

Layout: the work of a run (TensorBoard logs, checkpoints, exported adapters) goes to
``<work dir>/<run>/{fit,test}`` (git-ignored), its record to ``<results dir>/<run>/``: ``metrics.json``
(written last: a run with it is finished and skipped), ``predictions.jsonl``, ``routing.json`` and, for the
seeds in ``commit_adapters``, ``adapter/``. An interrupted fit resumes from the newest checkpoint in its
folder, else starts again. A finished run whose record lacks some of the protocol's test tasks (a task added
to the protocol later) is *topped up*: tested on the missing tasks only, from its kept adapter (or its fit's
last checkpoint, where the work folder still has it), and the results merged into its record. For a given seed every method trains on the same batches in the same order
(``seed_everything`` and ``data.seed`` are the seed) and is tested on the same items (the data module's fixed
evaluation sample), so comparisons are paired. The base model is tested once per protocol (``zero_shot``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..data.tasks import is_eval_only, task_name
from .metrics import record_average
from .protocol import Protocol, Run
from .topup import adapter_checkpoint, merge_into_record, read_test_dir, write_json

# Callbacks whose files make up a record; appended to the trainer's callbacks when the config lacks them.
RECORD_CALLBACKS = (
    "mosld.training.TrainRecord",
    "mosld.training.ItemPredictionWriter",
    "mosld.training.RouterStatsCallback",
    "mosld.training.EvalSummary",
    "mosld.training.AdapterExport",
)
ZERO_SHOT = "zero_shot"
METHOD_FIELDS = ("num_experts", "top_k", "share", "shared_dropout")


class SweepError(RuntimeError):
    pass


def cli_value(value: object) -> str:
    """A protocol value as a command-line value (lists and mappings as JSON, which jsonargparse reads)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def option_args(options: dict[str, object]) -> list[str]:
    return [arg for key, value in options.items() for arg in (f"--{key}", cli_value(value))]


def resolved_config(subcommand: str, args: list[str]) -> dict:
    """The configuration the CLI would run with (``--print_config``, in this process; nothing is loaded)."""
    from ..training.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        main([subcommand, *args, "--print_config"])
    if not out.getvalue().strip():
        raise SweepError(f"the configuration was refused:\n{err.getvalue().strip()}")
    return yaml.safe_load(out.getvalue())


def logger_arg(save_dir: Path, version: str) -> list[str]:
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(save_dir), "name": "", "version": version}}  # fmt: skip
    return ["--trainer.logger", json.dumps(logger)]


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "mosld"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


class Sweep:
    """Runs a protocol's runs that have no record yet.

    Args:
        protocol: The protocol.
        results_dir: Where records go; default the protocol's (``experiments/results/<protocol>``).
        work_dir: Where runs work; default ``experiments/runs/<protocol>``.
        python: Interpreter for the runs.
        log: Where progress lines go.
    """

    def __init__(self, protocol: Protocol, results_dir: Path | None = None, work_dir: Path | None = None,
                 python: str = sys.executable, log=print) -> None:  # fmt: skip
        self.protocol = protocol
        self.results_dir = Path(results_dir or protocol.results_dir)
        self.work_dir = Path(work_dir or Path("experiments/runs") / protocol.name)
        self.python, self.log = python, log
        self.base_args = [a for c in protocol.config for a in ("--config", c)] + option_args(protocol.args)
        config = resolved_config("fit", self.base_args)
        self.train_tasks = [t for t in config["data"]["tasks"] if not is_eval_only(t)]
        self.test_tasks = protocol.test_tasks or list(config["data"]["tasks"])
        present = {c.get("class_path") for c in config["trainer"].get("callbacks") or [] if isinstance(c, dict)}
        self.base_args += [f"--trainer.callbacks+={c}" for c in RECORD_CALLBACKS if c not in present]
        # what the method determines (AdapterConfig's METHOD_DEFAULTS) unless the protocol sets it: a base config
        # written for one method may pin them (configs/paper/mosld.yaml pins 8/6/4/2 experts, which LoRA refuses)
        self.method_args = [arg for field in METHOD_FIELDS if f"model.adapter.{field}" not in protocol.args
                            for arg in (f"--model.adapter.{field}", "null")]  # fmt: skip
        self.test_args = option_args(protocol.test)
        unknown = set(protocol.single_args) - {task_name(t) for t in self.train_tasks}
        if unknown:
            raise SweepError(f"protocol {protocol.source}: single_args: {sorted(unknown)} are not training tasks "
                             f"(training tasks: {', '.join(task_name(t) for t in self.train_tasks)})")  # fmt: skip
        self.commit = git_commit()

    # ------------------------------------------------------------------ running
    def run(self, runs: list[Run], zero_shot: bool = True) -> None:
        """Run ``runs`` one after the other in this process (``mosld.experiments.launch`` runs them as jobs)."""
        if zero_shot:
            self.zero_shot()
        for i, run in enumerate(runs, 1):
            self.run_or_top_up(run, f"[{i}/{len(runs)}] ")

    def pending(self, run: Run | None) -> bool:
        """Whether ``run`` (``None``: the base model's test) has work to do: no record, or one lacking a test task."""
        record = self.results_dir / (ZERO_SHOT if run is None else run.name)
        return not (record / "metrics.json").is_file() or bool(self.missing_tasks(record, run))

    def run_or_top_up(self, run: Run, prefix: str = "") -> None:
        """Record ``run``, top up its record with the test tasks it lacks, or skip it when it is complete."""
        if (self.results_dir / run.name / "metrics.json").is_file():
            missing = self.missing_tasks(self.results_dir / run.name, run)
            if not missing:
                self.log(f"{prefix}{run.name}: recorded, skipped")
                return
            self.log(f"{prefix}{run.name}: recorded; topping up {', '.join(missing)}")
            self.top_up(run, missing)
            return
        self.log(f"{prefix}{run.name}: running")
        start = time.perf_counter()
        self.run_one(run)
        self.log(f"{prefix}{run.name}: recorded in {time.perf_counter() - start:.0f} s")

    def zero_shot(self) -> None:
        """The base model (untrained adapters equal it exactly) tested once on the protocol's test items."""
        record = self.results_dir / ZERO_SHOT
        if (record / "metrics.json").is_file():
            missing = self.missing_tasks(record, None)
            if missing:
                self.log(f"{ZERO_SHOT}: recorded; topping up {', '.join(missing)}")
                self.top_up(None, missing)
            return
        self.log(f"{ZERO_SHOT}: testing the base model")
        work = self.work_dir / ZERO_SHOT
        seconds = self._cli(work / "test.log", "test", *self.base_args, *logger_arg(work, "test"), *self.test_args)
        self._write_record(record, Run("base", "none", 0), [(None, work / "test", {"test_seconds": seconds})])

    # ------------------------------------------------------------------ top-ups
    def expected_tasks(self, run: Run | None) -> list[str]:
        """The task names a record should hold: the test tasks (a single-setting run: its training tasks)."""
        tasks = self.train_tasks if run is not None and run.setting == "single" else self.test_tasks
        return [task_name(t) for t in tasks]

    def missing_tasks(self, record: Path, run: Run | None) -> list[str]:
        """Test tasks the record at ``record`` has no results for, in the protocol's order."""
        have = json.loads((record / "metrics.json").read_text())["tasks"]
        return [t for t in self.expected_tasks(run) if t not in have]

    def top_up(self, run: Run | None, missing: list[str]) -> bool:
        """Test a finished run (``None``: the base model) on ``missing`` tasks only and merge the results into
        its record, from its kept adapter or its fit's last checkpoint; no retraining. Returns whether it did
        (a trained run with neither is reported and left as it is: only retraining can give it the tasks)."""
        name = run.name if run is not None else ZERO_SHOT
        record, work = self.results_dir / name, self.work_dir / name
        tasks = [t for t in self.test_tasks if task_name(t) in missing]
        folder = work / f"topup-{len(list(work.glob('topup-*')))}"
        test_part = [*logger_arg(folder, "test"), *self.test_args, "--data.tasks", json.dumps(tasks)]
        if run is None:
            source, args = "base model", [*self.base_args, *test_part]
        else:
            checkpoint, source = work / "fit" / "checkpoints" / "last.ckpt", "fit checkpoint"
            if run.setting == "single":  # its models are tested on their own tasks only: a missing one needs a fit
                self.log(f"  {name}: cannot top up {', '.join(missing)}: a single-setting run's models are tested "
                         "on their own training task; remove the record to run it again")  # fmt: skip
                return False
            if not checkpoint.is_file() and not (record / "adapter" / "adapter_config.json").is_file():
                self.log(f"  {name}: cannot top up {', '.join(missing)}: no adapter kept in {record} and no "
                         f"checkpoint in {work / 'fit'}; remove the record to retrain the run")  # fmt: skip
                return False
            if not checkpoint.is_file():
                checkpoint = adapter_checkpoint(record / "adapter", run.method, folder / "adapter.ckpt")
                source = "kept adapter"
            args = [*self.base_args, *self._run_args(run), *test_part, "--ckpt_path", str(checkpoint)]
        seconds = self._cli(folder / "test.log", "test", *args)
        merge_into_record(record, read_test_dir(folder / "test"), self.train_tasks,
                          {"tasks": missing, "code": self.commit, "from": source, "test_seconds": seconds})  # fmt: skip
        return True

    def _run_args(self, run: Run) -> list[str]:
        """The options that make a fit of ``run`` (its seed, method and setting) out of the base options."""
        return ["--seed_everything", str(run.seed), "--data.seed", str(run.seed), "--model.adapter.method",
                run.method, *self.method_args, "--data.setting", run.setting]  # fmt: skip

    def run_one(self, run: Run) -> None:
        work = self.work_dir / run.name
        fits = [(work, None)] if run.setting == "mixture" else [(work / task_name(t), t) for t in self.train_tasks]
        parts = []
        for folder, task in fits:
            parts.append(self._fit_and_test(run, folder, task))
        self._write_record(self.results_dir / run.name, run, parts)

    def _fit_and_test(self, run: Run, folder: Path, task: str | None) -> tuple[Path, Path, dict]:
        fit_dir, test_dir = folder / "fit", folder / "test"
        times = {}
        run_args = self._run_args(run)
        if task is not None:
            run_args += [
                "--data.tasks",
                json.dumps([task]),
                *option_args(self.protocol.single_args.get(task_name(task), {})),
            ]
        if not (fit_dir / "train_record.json").is_file():
            checkpoints = sorted((fit_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
            resume = ["--ckpt_path", str(checkpoints[-1])] if checkpoints else []
            if not checkpoints:
                shutil.rmtree(fit_dir, ignore_errors=True)
            self.log(f"  fit {folder.name}" + (f" (resuming from {checkpoints[-1].name})" if checkpoints else ""))
            times["fit_seconds_wall"] = self._cli(
                folder / "fit.log", "fit", *self.base_args, *run_args, *logger_arg(folder, "fit"), *resume
            )
        if not (test_dir / "test_predictions.jsonl").is_file():
            self.log(f"  test {folder.name}")
            test_args = list(self.test_args)
            if task is not None:  # a single-task model is tested on its own task
                test_args += ["--data.tasks", json.dumps([task])]
            times["test_seconds"] = self._cli(
                folder / "test.log", "test", "--config", str(fit_dir / "config.yaml"),
                "--ckpt_path", str(fit_dir / "checkpoints" / "last.ckpt"), *logger_arg(folder, "test"), *test_args,
            )  # fmt: skip
        return fit_dir, test_dir, times

    def _cli(self, log_path: Path, *args: str) -> float:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with log_path.open("a") as log:
            done = subprocess.run([self.python, "-m", "mosld.training", *args], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        if done.returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-25:])
            raise SweepError(f"{args[0]} failed (exit {done.returncode}); log {log_path}:\n{tail}")
        return time.perf_counter() - start

    def restore(self, run: Run, out: Path) -> Path:
        """Rebuild a finished run's folder from its record: ``out/config.yaml`` (the fit's configuration, resolved
        from the protocol as the sweep resolves it) and ``out/adapter`` (the record's kept adapter), so that the
        tools that take a run folder (``mosld.serve --run``, ``scripts/export_peft.py``) work on a kept adapter
        after the sweep's work folder is gone. Returns ``out``."""
        record = self.results_dir / run.name
        if not (record / "metrics.json").is_file():
            raise SweepError(f"{record}: no record (metrics.json) for run {run.name}")
        if run.setting != "mixture":
            raise SweepError(f"{run.name}: only a mixture run is one run folder (a single-setting run is one per task)")
        if not (record / "adapter" / "adapter_config.json").is_file():
            raise SweepError(f"{record}: the record kept no adapter (the protocol's commit_adapters lists its seeds)")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise SweepError(f"{out}: exists and is not empty; choose a new folder")
        config = resolved_config("fit", [*self.base_args, *self._run_args(run)])
        recorded = json.loads((record / "metrics.json").read_text()).get("code")
        if recorded and recorded != self.commit:  # the configuration is today's reading of the protocol
            self.log(f"note: {run.name} was recorded at code {recorded}; its config is resolved at {self.commit}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.copytree(record / "adapter", out / "adapter")
        return out

    # ------------------------------------------------------------------ records
    def _write_record(self, record: Path, run: Run, parts: list[tuple[Path | None, Path, dict]]) -> None:
        """Collect a run's (fit folder or None, test folder, timings) into its record, atomically."""
        tmp = record.with_name(record.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tasks, routing, predictions, train, times = {}, {}, [], [], {}
        for part in parts:
            fit_dir, test_dir, part_times = part
            for key, value in part_times.items():
                times[key] = times.get(key, 0.0) + value
            part_tasks, part_predictions, part_routing = read_test_dir(test_dir)
            tasks.update(part_tasks)
            predictions += part_predictions
            routing.update(part_routing)
            if fit_dir is not None:
                train.append(json.loads((fit_dir / "train_record.json").read_text()))
                if run.seed in self.protocol.commit_adapters and (fit_dir / "adapter").is_dir():
                    target = tmp / "adapter" if len(parts) == 1 else tmp / "adapter" / fit_dir.parent.name
                    shutil.copytree(fit_dir / "adapter", target)
        (tmp / "predictions.jsonl").write_text("".join(line + "\n" for line in predictions))
        if routing:
            write_json(tmp / "routing.json", routing)
        in_domain = [t for t in tasks if t in {task_name(x) for x in self.train_tasks}]
        summary = {
            "protocol": self.protocol.name,
            "run": record.name,
            "method": run.method,
            "setting": run.setting,
            "seed": run.seed,
            "code": self.commit,
            "tasks": tasks,
            "in_domain": in_domain,
            "out_of_domain": [t for t in tasks if t not in in_domain],
            "average": record_average(tasks, in_domain) if in_domain else None,
            **times,
        }
        if train:
            summary |= {
                "trainable_parameters": train[0]["trainable_parameters"],
                "total_parameters": train[0]["total_parameters"],
                "steps": sum(t["steps"] for t in train),
                "tokens_seen": sum(t["tokens_seen"] for t in train),
                "padding_fraction": 1
                - sum(t["tokens_seen"] for t in train) / sum(t["padded_positions"] for t in train),
                "train_seconds": sum(t["train_seconds"] for t in train),
                "train_tokens_per_second": sum(t["tokens_seen"] for t in train)
                / sum(t["train_seconds"] for t in train),
                "final_train_loss": sum(t["final_train_loss"] for t in train) / len(train),
                "precision": train[0]["precision"],  # auto resolves per machine: seeds may differ
                "machine": train[0]["machine"],
                "train_loss_curve": train[0]["loss"] if len(train) == 1 else None,
            }
        write_json(tmp / "metrics.json", summary)
        shutil.rmtree(record, ignore_errors=True)
        tmp.replace(record)
