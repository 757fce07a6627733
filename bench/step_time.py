"""Training-step time and peak memory of adapter variants on a randomly initialised causal LM.

One process builds every variant on the same randomly initialised model (same seed, same inputs,
same AdamW over the trainable tensors only, same dtype), warms each up, then times training steps
(forward, backward, optimizer step, zero_grad) round-robin over the variants so that machine
noise hits all of them alike, and reports medians, tokens/s, peak memory and every figure as a
ratio to peft's LoRA r = 8 on the same target modules. See ``docs/benchmarks.md``.

The variants and shapes are in ``bench/variants.py``, the memory measures in ``bench/memory.py``,
the timing loop in ``bench/runner.py``, the tables in ``bench/report.py``. Run from the
repository root as a module::

    python -m bench.step_time                                   # CPU, SmolLM2 shape, q/v, eager
    python -m bench.step_time --device cuda --shape llama2k --compile
    python -m bench.step_time --gpu-suite --out-dir "$OUT"      # the GPU suite
    python -m bench.step_time --gpu-suite --device cpu --shape tiny --out-dir /tmp/suite  # dry run
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.report import machine_info, write_outputs
from bench.runner import log, run
from bench.variants import COMPILED_VARIANTS, EXTRA_VARIANTS, SHAPES, VARIANTS, Shape, targets_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--shape", choices=tuple(SHAPES), default=None, help="default: smollm2 (suite: both)")
    parser.add_argument("--targets", default=None, help="comma list of projections or 'all' (default: the shape's)")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma list from {','.join(VARIANTS + EXTRA_VARIANTS)} (default: the first eight; suite: all)",
    )
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (cpu 2, cuda 4)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (cpu 256, cuda 1024)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="cpu: float32, cuda: bfloat16")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per variant, the last measures memory (cpu 2, cuda 5)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="round-robin rounds (cpu 10, cuda 5)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (cpu 1, cuda 6)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"also time compiled {','.join(COMPILED_VARIANTS)} (default: on for cuda, off for cpu)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (cpu default 1: on a shared machine more threads made timings swing 3x)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    parser.add_argument("--markdown", type=Path, default=None, help="markdown output file")
    parser.add_argument(
        "--gpu-suite",
        action="store_true",
        help="the GPU suite: llama2k and smollm2, eager and compiled, all variants, into --out-dir",
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="suite output folder (results.json, results.md)")
    parser.add_argument(
        "--profile",
        default=None,
        help="comma list of variants to profile for one step after timing, into profiles.txt beside the "
        "results (suite default: floor,peft_d05,mosld; 'none' to skip)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=360.0, help="suite: start no new compile or timing round after this"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    default_variants = VARIANTS + EXTRA_VARIANTS if args.gpu_suite else VARIANTS
    variants = [v for v in args.variants.split(",") if v] if args.variants else list(default_variants)
    unknown = set(variants) - set(VARIANTS) - set(EXTRA_VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    warmup = max(1, args.warmup if args.warmup is not None else (5 if gpu else 2))
    rounds = args.rounds if args.rounds is not None else (5 if gpu else 10)
    steps = args.steps if args.steps is not None else (6 if gpu else 1)
    compile_on = args.compile if args.compile is not None else gpu
    # Every variant's decoder layers run through the same compiled code object; without a higher
    # limit dynamo would stop compiling after 8 layer structures and silently run the rest eagerly.
    for key, value in (("cache_size_limit", 64), ("recompile_limit", 64), ("accumulated_cache_size_limit", 512)):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, value)
    machine = machine_info(device)
    log(machine["summary"])
    profile_spec = args.profile if args.profile is not None else ("floor,peft_d05,mosld" if args.gpu_suite else "none")
    profile = frozenset(v for v in profile_spec.split(",") if v and v != "none")
    counts = dict(warmup=warmup, rounds=rounds, steps=steps, profile=profile)

    if args.gpu_suite:
        if args.out_dir is None:
            raise SystemExit("--gpu-suite needs --out-dir")
        shapes = [SHAPES[args.shape]] if args.shape else [SHAPES["llama2k"], SHAPES["smollm2"]]
        outputs = (args.out_dir / "results.json", args.out_dir / "results.md")
        results = gpu_suite(
            args, shapes, device, dtype, variants, counts, lambda res: write_outputs(res, machine, args, *outputs)
        )
        print(write_outputs(results, machine, args, *outputs))
        return 0

    shape = SHAPES[args.shape or "smollm2"]
    batch, seq = shape.gpu_tokens if gpu else shape.cpu_tokens
    results = run(
        shape,
        device,
        dtype,
        variants,
        targets_for(args.targets, shape),
        args.batch or batch,
        args.seq or seq,
        compile_variants=list(COMPILED_VARIANTS) if compile_on else [],
        **counts,
    )
    out_json = args.out or (args.out_dir / "results.json" if args.out_dir else None)
    out_md = args.markdown or (args.out_dir / "results.md" if args.out_dir else None)
    print(write_outputs(results, machine, args, out_json, out_md))
    return 0


def gpu_suite(
    args: argparse.Namespace,
    shapes: list[Shape],
    device: torch.device,
    dtype: torch.dtype,
    variants: list[str],
    counts: dict,
    save: Callable[[list[dict]], object],
) -> list[dict]:
    """Every shape eager, then every shape compiled, saving the results after each phase."""
    start = time.monotonic()
    deadline = start + args.budget_s
    results: list[dict] = []
    plan = [(s, False) for s in shapes] + [(s, True) for s in shapes]  # both eager runs before any compiling
    for shape, compiled in plan:
        mode = "compiled" if compiled else "eager"
        if compiled and time.monotonic() > deadline:
            log(f"{shape.name} compiled: skipped, time budget spent")
            results.append(
                {"shape": shape.name, "mode": mode, "device": device.type, "variants": {}, "skipped": "time budget"}
            )
            continue
        batch, seq = shape.gpu_tokens if device.type == "cuda" else shape.cpu_tokens
        try:
            results += run(
                shape,
                device,
                dtype,
                [v for v in variants if v in COMPILED_VARIANTS] if compiled else variants,
                targets_for(args.targets, shape),
                args.batch or batch,
                args.seq or seq,
                compile_variants=list(COMPILED_VARIANTS) if compiled else [],
                eager=not compiled,
                deadline=deadline,
                **counts,
            )
        except Exception as err:  # noqa: BLE001 - report the phase, keep going
            log(f"{shape.name} {mode}: run failed: {err}\n{traceback.format_exc()}")
        save(results)
        log(f"wrote the results after {time.monotonic() - start:.0f} s")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
