"""Building, warming up and timing the variants round-robin in one process (``run``)."""

from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bench.memory import CpuMemory, SavedTensors, resident_bytes
from bench.profiling import profile_step
from bench.report import add_ratios, iqr
from bench.variants import COMPILED_VARIANTS, LABELS, Shape, apply_variant, build_base, decoder_layers


def log(msg: str) -> None:
    """A timestamped progress line on stderr (stdout carries the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Runner:
    """One variant: its model, optimizer and measurements."""

    name: str
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    trainable: int = 0
    times: list[float] = field(default_factory=list)  # the step-time measure (see timed_step)
    wall: list[float] = field(default_factory=list)  # wall-clock seconds per step
    memory: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    compiled: bool = False
    compile_info: dict[str, int] = field(default_factory=dict)

    def fail(self, stage: str, err: BaseException) -> None:
        kind = "out of memory" if isinstance(err, torch.OutOfMemoryError) else type(err).__name__
        self.error = f"{stage}: {kind}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        log(f"{self.name}: FAILED in {stage}: {kind}\n{traceback.format_exc(limit=6)}")
        self.model = self.optimizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    """Wait for the GPU (a no-op on a CPU), so a timer brackets the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(runner: Runner, ids: torch.Tensor) -> None:
    """Forward, backward, AdamW step and ``zero_grad`` on one batch."""
    loss = runner.model(input_ids=ids, labels=ids).loss
    loss.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)


def timed_step(runner: Runner, ids: torch.Tensor, device: torch.device) -> None:
    """Time one step. GPU: wall clock between device syncs. CPU: the process's CPU time.

    On a CPU the variants run single-threaded, so CPU time equals the wall time on an idle core;
    on a shared machine it leaves out the time the scheduler gives to other processes, which
    otherwise dominates the spread of the timings. Both are recorded.
    """
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    train_step(runner, ids)
    sync(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    runner.wall.append(wall)
    runner.times.append(wall if device.type == "cuda" else cpu)


def measure_memory(runner: Runner, ids: torch.Tensor, device: torch.device, cpu_memory: CpuMemory) -> None:
    """Peak memory of one step as if the variant were alone: resident tensors + the step's peak growth."""
    resident = resident_bytes(runner.model, runner.optimizer)
    saved = SavedTensors(runner.model)
    hooks = (
        contextlib.nullcontext()
        if runner.compiled
        else torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
    )
    if device.type == "cuda":
        gc.collect()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with hooks:
            train_step(runner, ids)
        sync(device)
        growth = torch.cuda.max_memory_allocated(device) - before
    else:
        before = cpu_memory.start()
        with hooks:
            train_step(runner, ids)
        growth = max(0, cpu_memory.peak() - before)
    runner.memory = {"resident": resident, "step_growth": growth, "peak": resident + growth}
    if not runner.compiled:
        runner.memory["saved"] = saved.total


def run(
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    variants: list[str],
    targets: tuple[str, ...],
    batch: int,
    seq: int,
    warmup: int,
    rounds: int,
    steps: int,
    compile_variants: list[str],
    eager: bool = True,
    seed: int = 0,
    deadline: float | None = None,
    profile: frozenset[str] = frozenset(),
) -> list[dict]:
    """Build every variant, then time eager and/or compiled steps round-robin. Returns one result per mode.

    ``profile`` names variants to profile for one step after timing (their reports under
    ``"profiles"`` in each result); ``deadline`` (``time.monotonic()``) stops new rounds and compiles.
    """
    ids = torch.randint(0, shape.config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    cpu_memory = CpuMemory()
    if device.type == "cpu":
        cpu_memory.keep_freed_memory()
    runners = [Runner(v) for v in variants]
    for runner in runners:
        try:
            model = apply_variant(build_base(shape, device, dtype, seed), runner.name, shape, targets)
            params = [p for p in model.parameters() if p.requires_grad]
            runner.trainable = sum(p.numel() for p in params)
            # foreach: CUDA's default; on a CPU the default loops over tensors in Python, which
            # would charge every variant per adapter tensor rather than per element
            runner.model, runner.optimizer = model, torch.optim.AdamW(params, lr=1e-4, foreach=True)
        except Exception as err:  # noqa: BLE001 - report per variant, keep going
            runner.fail("build", err)
    log(f"{shape.name}: built {len(runners)} variants on {device} ({dtype}, {batch}x{seq} tokens)")
    results = (
        [_phase(shape, "eager", runners, ids, device, (warmup, rounds, steps), cpu_memory, deadline, profile)]
        if eager
        else []
    )

    compiled = [r for r in runners if r.name in compile_variants and r.model is not None]
    if compiled:
        compiled.sort(key=lambda r: COMPILED_VARIANTS.index(r.name) if r.name in COMPILED_VARIANTS else 99)
        torch._dynamo.reset()
        phase_runners = []
        for runner in compiled:
            clone = Runner(runner.name, runner.model, runner.optimizer, runner.trainable, compiled=True)
            if deadline is not None and time.monotonic() > deadline:
                clone.error = "skipped: time budget spent before compiling"
            else:
                try:
                    # Regional compilation: every decoder layer compiled; identical layers share one graph.
                    for layer in decoder_layers(clone.model):
                        layer.compile(dynamic=False)
                    from torch._dynamo.utils import counters

                    counters.clear()
                    t0 = time.perf_counter()
                    train_step(clone, ids)  # compiles forward and backward
                    sync(device)
                    # graph breaks or extra graphs would put eager ops and guard checks back in the step
                    clone.compile_info = {
                        "graph_breaks": sum(counters["graph_break"].values()),
                        "unique_graphs": counters["stats"].get("unique_graphs", 0),
                    }
                    log(
                        f"{shape.name}: compiled {clone.name} in {time.perf_counter() - t0:.1f} s "
                        f"{clone.compile_info}; breaks: {dict(counters['graph_break'])}"
                    )
                except Exception as err:  # noqa: BLE001
                    clone.fail("compile", err)
            phase_runners.append(clone)
        phase = _phase(
            shape, "compiled", phase_runners, ids, device, (warmup, rounds, steps), cpu_memory, None, profile
        )
        results.append(phase)
    for runner in runners:
        runner.model = runner.optimizer = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for res in results:
        res.update(batch=batch, seq=seq, targets=list(targets), dtype=str(dtype).removeprefix("torch."))
    return results


def _phase(
    shape: Shape,
    mode: str,
    runners: list[Runner],
    ids: torch.Tensor,
    device: torch.device,
    counts: tuple[int, int, int],
    cpu_memory: CpuMemory,
    deadline: float | None,
    profile: frozenset[str],
) -> dict:
    """Warm up and measure memory, time ``rounds`` rotated rounds of ``steps`` steps per variant, summarise."""
    warmup, rounds, steps = counts
    live = [r for r in runners if r.model is not None]
    for runner in live:
        try:
            for _ in range(warmup - 1):
                train_step(runner, ids)
            sync(device)
            # the last warm-up step is the memory step (its instrumentation stays out of the timings)
            measure_memory(runner, ids, device, cpu_memory)
        except Exception as err:  # noqa: BLE001
            runner.fail("warm-up", err)
    for rnd in range(rounds):
        live = [r for r in runners if r.model is not None]
        if not live:
            break
        shift = rnd % len(live)
        for runner in live[shift:] + live[:shift]:  # rotate the order so no variant always runs first
            try:
                for _ in range(steps):
                    timed_step(runner, ids, device)
            except Exception as err:  # noqa: BLE001
                runner.fail(f"timing round {rnd}", err)
        medians = {r.name: f"{1e3 * statistics.median(r.times):.1f}" for r in runners if r.times}
        log(f"{shape.name} {mode} round {rnd + 1}/{rounds}: median ms so far {medians}")
        if deadline is not None and time.monotonic() > deadline and rnd >= 1:
            log(f"{shape.name} {mode}: time budget spent, stopping after round {rnd + 1}")
            break
    tokens = ids.numel()
    variants = {}
    for runner in runners:
        entry: dict[str, Any] = {"label": LABELS[runner.name], "trainable_params": runner.trainable}
        if runner.times:
            median = statistics.median(runner.times)
            entry.update(
                step_ms=1e3 * median,
                step_ms_min=1e3 * min(runner.times),
                step_ms_iqr=1e3 * iqr(runner.times),
                steps_timed=len(runner.times),
                tokens_per_s=tokens / median,
                times_ms=[round(1e3 * t, 3) for t in runner.times],
                wall_ms=1e3 * statistics.median(runner.wall),
                wall_times_ms=[round(1e3 * t, 3) for t in runner.wall],
                timer="wall clock" if device.type == "cuda" else "process CPU time (1 thread)",
            )
        if runner.memory:
            entry.update({f"mem_{k}_mib": v / 2**20 for k, v in runner.memory.items()})
        if runner.error:
            entry["error"] = runner.error
        if runner.compile_info:
            entry["compile"] = runner.compile_info
        variants[runner.name] = entry
    profiles = []
    for runner in runners:
        if runner.name in profile and runner.model is not None:
            tag = f"{shape.name} {mode} {runner.name}{' (compiled)' if runner.compiled else ''}"
            try:
                profiles.append(profile_step(lambda r=runner: train_step(r, ids), device, tag))
            except Exception as err:  # noqa: BLE001 - a diagnostic must not cost the results
                profiles.append(f"## {tag}: profiling failed: {err!r}\n")
    add_ratios(variants)
    return {"shape": shape.name, "mode": mode, "device": device.type, "variants": variants, "profiles": profiles}
