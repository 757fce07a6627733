"""``python -m mosld.experiments sweep|aggregate ...``: run a protocol, and turn its records into a results page.

python -m mosld.experiments sweep configs/experiments/cpu.yaml [--only method=mosld,seed=1] [--dry-run]
python -m mosld.experiments sweep configs/experiments/cpu_single.yaml --launcher local --jobs 2
python -m mosld.experiments sweep configs/experiments/paper.yaml --launcher slurm --jobs 8 --partition gpu --gpus-per-job 1
python -m mosld.experiments aggregate configs/experiments/cpu.yaml [--out docs/results.md]
python -m mosld.experiments compare lightning_logs/version_0 lightning_logs/version_1 [--stage val]
python -m mosld.experiments restore configs/experiments/cpu_babi.yaml mosld-mixture-seed0 --out runs/babi-mosld
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.tasks import task_name
from .aggregate import aggregate
from .compare import SCORINGS, compare_runs, format_comparison
from .launch import LAUNCHERS, SlurmOptions, launch
from .protocol import load_protocol, parse_only
from .sweep import Sweep, SweepError


def dry_run_state(record: Path, test_tasks: list[str] | None, setting: str) -> str:
    """``to run``, ``recorded``, or ``recorded; lacks mmlu (top-up)`` for a mixture record missing test tasks."""
    if not (record / "metrics.json").is_file():
        return "to run"
    have = json.loads((record / "metrics.json").read_text())["tasks"]
    missing = [task_name(t) for t in test_tasks or [] if task_name(t) not in have] if setting == "mixture" else []
    if not missing:
        return "recorded"
    kept = "from its adapter" if (record / "adapter").is_dir() else "only from its fit checkpoint: no adapter kept"
    return f"recorded; lacks {', '.join(missing)} (top-up {kept})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mosld.experiments", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="run the protocol's runs that have no record yet")
    sweep.add_argument("protocol", help="a protocol file, e.g. configs/experiments/cpu.yaml")
    sweep.add_argument("--only", help="run a subset: method=mosld,seed=1 (| between alternatives: method=lora|mosld)")
    sweep.add_argument("--results-dir", type=Path, help="default: the protocol's results folder")
    sweep.add_argument("--work-dir", type=Path, help="default experiments/runs/<protocol name> (git-ignored)")
    sweep.add_argument("--no-zero-shot", action="store_true", help="skip the base model's test")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and whether each is recorded")
    jobs = sweep.add_argument_group("jobs", "run each run as a submitit job instead of one after the other here")
    jobs.add_argument("--launcher", choices=LAUNCHERS, help="local: jobs on this machine; slurm: a SLURM array job")
    jobs.add_argument("--jobs", type=int, default=1, help="jobs running at once (default 1)")
    jobs.add_argument("--time", type=int, default=24 * 60, help="wall-time limit of one job in minutes (default 1440)")
    jobs.add_argument("--partition", help="SLURM partition")
    jobs.add_argument("--account", help="SLURM account")
    jobs.add_argument("--gpus-per-job", type=int, default=0, help="SLURM: GPUs of each job (default 0)")
    jobs.add_argument("--cpus-per-job", type=int, help="SLURM: CPUs of each job")
    jobs.add_argument("--mem-gb", type=float, help="SLURM: memory of each job in GB")
    agg = commands.add_parser("aggregate", help="write the results page from the protocol's records")
    agg.add_argument("protocol", help="a protocol file, e.g. configs/experiments/cpu.yaml")
    agg.add_argument("--results-dir", type=Path, help="default: the protocol's results folder")
    agg.add_argument("--out", type=Path, help="default docs/results.md for cpu, else docs/results_<name>.md")
    cmp = commands.add_parser("compare", help="two run folders item by item (paired interval, McNemar)")
    cmp.add_argument("run_a", type=Path)
    cmp.add_argument("run_b", type=Path)
    cmp.add_argument("--stage", default="val", choices=("val", "test"), help="<stage>_predictions.jsonl to read")
    cmp.add_argument("--scoring", default="correct", choices=SCORINGS, help="correct: the headline scoring")
    cmp.add_argument("--json", type=Path, help="also write the figures to this file")
    restore = commands.add_parser("restore", help="a run folder (config.yaml, adapter/) from a record's kept adapter")
    restore.add_argument("protocol", help="a protocol file, e.g. configs/experiments/cpu_babi.yaml")
    restore.add_argument("run", help="the run's name, e.g. mosld-mixture-seed0")
    restore.add_argument("--out", type=Path, required=True, help="the new run folder (must not exist or be empty)")
    restore.add_argument("--results-dir", type=Path, help="default: the protocol's results folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            result = compare_runs(args.run_a, args.run_b, args.stage, args.scoring)
            print(format_comparison(result, str(args.run_a), str(args.run_b)))
            if args.json:
                args.json.write_text(json.dumps(result, indent=1) + "\n")
            return 0
        protocol = load_protocol(args.protocol)
        results_dir = args.results_dir or protocol.results_dir
        if args.command == "aggregate":
            out = args.out or Path("docs/results.md" if protocol.name == "cpu" else f"docs/results_{protocol.name}.md")
            test_tasks = [task_name(t) for t in protocol.test_tasks or []]
            others = [load_protocol(other).results_dir for other in protocol.compare_with]
            aggregate(results_dir, out, expected_runs=[run.name for run in protocol.runs()], test_tasks=test_tasks,
                      compare_with=others)  # fmt: skip
            print(f"wrote {out}")
            return 0
        if args.command == "restore":
            named = [run for run in protocol.runs() if run.name == args.run]
            if not named:
                raise ValueError(f"restore: {args.run!r} is not a run of {args.protocol} "
                                 f"(its runs: {', '.join(run.name for run in protocol.runs())})")  # fmt: skip
            out = Sweep(protocol, results_dir).restore(named[0], args.out)
            print(f"wrote {out}/config.yaml and {out}/adapter")
            return 0
        runs = protocol.runs(parse_only(args.only))
        if args.dry_run:
            for run in runs:
                print(f"{run.name}: {dry_run_state(results_dir / run.name, protocol.test_tasks, run.setting)}")
            return 0
        sweep = Sweep(protocol, results_dir, args.work_dir)
        if args.launcher is None:
            sweep.run(runs, zero_shot=not args.no_zero_shot)
            return 0
        slurm = SlurmOptions(args.partition, args.account, args.gpus_per_job, args.cpus_per_job, args.mem_gb)
        failures = launch(sweep, runs, args.launcher, args.jobs, not args.no_zero_shot, args.time, slurm)
        if failures:
            print(f"error: {len(failures)} job(s) failed (the others finished; run the sweep again to retry them):",
                  *map(str, failures), sep="\n", file=sys.stderr)  # fmt: skip
            return 1
    except (ValueError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
