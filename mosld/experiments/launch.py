"""Run a protocol's runs as jobs through submitit: on this machine (``local``, ``jobs`` at a time) or on a SLURM
cluster (``slurm``, one array job with ``jobs`` tasks running at once).

Each job is one run (the base model's zero-shot test is one more job, first in line) and runs the serial
sweep's own code for it (``Sweep.run_or_top_up``) in a process of its own, so a job's record is the same as the
serial sweep's and the sweep stays resumable: only runs without a complete record are submitted. A failing job
is reported with its log files and the other jobs go on; the launcher returns the failures.

submitit's job folders (pickled calls, stdout/stderr of every job) are under ``<work dir>/jobs``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .protocol import Run
from .sweep import ZERO_SHOT, Sweep

LAUNCHERS = ("local", "slurm")


@dataclass(frozen=True)
class SlurmOptions:
    """What a SLURM job asks for (``sbatch`` options); ``None`` leaves the cluster's default."""

    partition: str | None = None
    account: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem_gb: float | None = None


@dataclass(frozen=True)
class Failure:
    """A job that did not finish: its run, the first line of its error and its log files."""

    name: str
    error: str
    stdout: Path
    stderr: Path

    def __str__(self) -> str:
        return f"{self.name}: {self.error}\n  log: {self.stderr} (stdout: {self.stdout})"


def run_job(sweep: Sweep, run: Run | None) -> str:
    """One job: the base model's test (``run`` None) or one run, recorded or topped up as the serial sweep would."""
    if run is None:
        sweep.zero_shot()
        return ZERO_SHOT
    sweep.run_or_top_up(run)
    return run.name


def _submitit():
    try:
        import submitit
    except ImportError as err:  # an optional extra, like lm-eval
        raise ValueError("--launcher needs submitit: pip install 'mosld[launch]' (or pip install submitit)") from err
    return submitit


def launch(
    sweep: Sweep,
    runs: list[Run],
    launcher: str = "local",
    jobs: int = 1,
    zero_shot: bool = True,
    time_min: int = 24 * 60,
    slurm: SlurmOptions | None = None,
    poll_seconds: float = 5.0,
    log: Callable[[str], None] = print,
) -> list[Failure]:
    """Run the pending ones of ``runs`` (and the zero-shot base) as submitit jobs, at most ``jobs`` at once.

    Args:
        sweep: The protocol's sweep (its folders are made absolute: a job may start elsewhere).
        runs: The runs to consider; those with a complete record are skipped.
        launcher: ``local`` (this machine) or ``slurm``.
        jobs: Jobs running at once. Locally each job gets ``cpu count / jobs`` threads unless
            ``OMP_NUM_THREADS`` is set; on SLURM this is the array's parallelism.
        zero_shot: Also test the base model (one job), when its record is missing or lacks a task.
        time_min: Wall-time limit of one job, in minutes (SLURM's ``--time``; locally the job is stopped after it).
        slurm: Partition, account, GPUs, CPUs and memory of each SLURM job.
        poll_seconds: How often the launcher looks at its jobs.
        log: Where progress lines go.

    Returns:
        The jobs that failed (empty when every job finished).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if jobs < 1 or time_min < 1:  # by hand: a Python function the argparse command line calls
        raise ValueError(f"--jobs and --time: expected integers >= 1, got {jobs} and {time_min}")
    submitit = _submitit()
    sweep.results_dir, sweep.work_dir = sweep.results_dir.resolve(), sweep.work_dir.resolve()
    todo: list[Run | None] = [None] if zero_shot and sweep.pending(None) else []
    todo += [run for run in runs if sweep.pending(run)]
    skipped = len(runs) - sum(run is not None for run in todo)
    log(f"{len(todo)} job(s) to run, {skipped} run(s) already recorded; {launcher} launcher, {jobs} at a time")
    if not todo:
        return []
    executor = submitit.AutoExecutor(folder=sweep.work_dir / "jobs", cluster=launcher)
    executor.update_parameters(timeout_min=time_min, name=f"mosld-{sweep.protocol.name}")
    if launcher == "slurm":
        slurm = slurm or SlurmOptions()
        options = {"slurm_partition": slurm.partition, "slurm_account": slurm.account,
                   "cpus_per_task": slurm.cpus_per_job, "mem_gb": slurm.mem_gb}  # fmt: skip
        executor.update_parameters(gpus_per_node=slurm.gpus_per_job, slurm_array_parallelism=jobs,
                                   **{k: v for k, v in options.items() if v is not None})  # fmt: skip
        submitted = list(zip(todo, executor.map_array(run_job, [sweep] * len(todo), todo), strict=True))
        for item, job in submitted:
            log(f"{_name(item)}: submitted as SLURM job {job.job_id}")
        return _wait(submitted, [], None, poll_seconds, log)
    if "OMP_NUM_THREADS" not in os.environ:  # jobs side by side must not each take every core
        executor.update_parameters(local_setup=[f"export OMP_NUM_THREADS={max(1, (os.cpu_count() or 1) // jobs)}"])
    return _wait([], todo, lambda item: executor.submit(run_job, sweep, item), poll_seconds, log, jobs)


def _name(item: Run | None) -> str:
    return ZERO_SHOT if item is None else item.name


def _wait(running: list, queue: list, submit: Callable | None, poll_seconds: float, log: Callable,
          jobs: int = 0) -> list[Failure]:  # fmt: skip
    """Keep up to ``jobs`` of ``queue`` running (``submit`` starts one), wait for every job, collect the failures.
    ``running`` holds (item, job) pairs already submitted."""
    failures: list[Failure] = []
    since = {job.job_id: time.perf_counter() for _, job in running}
    total, done = len(running) + len(queue), 0
    while running or queue:
        while submit is not None and queue and len(running) < jobs:
            item = queue.pop(0)
            job = submit(item)
            running.append((item, job))
            since[job.job_id] = time.perf_counter()
            log(f"{_name(item)}: started (job {job.job_id}; log {job.paths.stdout})")
        for item, job in [pair for pair in running if pair[1].done()]:
            running.remove((item, job))
            done += 1
            seconds = time.perf_counter() - since[job.job_id]
            error = job.exception()
            if error is None:
                log(f"[{done}/{total}] {_name(item)}: done {seconds:.0f} s after submission")
                continue
            failures.append(Failure(_name(item), error_line(str(error)), job.paths.stdout, job.paths.stderr))
            log(f"[{done}/{total}] {failures[-1]}")
        if running or queue:
            time.sleep(poll_seconds)
    return failures


def error_line(text: str) -> str:
    """The line of a failed job's trace that says what failed: the sweep's own error, else the last exception line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "SweepError:" in line:
            return line.split("SweepError:", 1)[1].strip()
    exceptions = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return exceptions[-1] if exceptions else (lines[0] if lines else "failed")
