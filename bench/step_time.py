#!/usr/bin/env python
"""Training-step time and peak memory of adapter variants on a randomly initialised causal LM.

One process builds every variant on the same randomly initialised model (same seed, same inputs,
same AdamW over the trainable tensors only, same dtype), warms each up, then times training steps
(forward, backward, optimizer step, zero_grad) round-robin over the variants so that machine
noise hits all of them alike, and reports medians, tokens/s, peak memory and every figure as a
ratio to peft's LoRA r = 8 on the same target modules. See ``docs/benchmarks.md``.

Variants: ``floor`` (frozen base, one trainable scalar on the input embeddings: what every
adapter costs on top of), ``peft_d0`` / ``peft_d05`` (peft LoRA r = 8, lora_dropout 0 / 0.05),
this project's ``lora``, ``mola``, ``mosl``, ``mosld``, and ``loop_mosld`` (MoSLD computed
with a Python loop over experts, as published mixture-of-LoRA code does; ``bench/loop_reference.py``).

Examples::

    python bench/step_time.py                                   # CPU, SmolLM2 shape, q/v, eager
    python bench/step_time.py --device cuda --shape llama2k --compile
    python bench/step_time.py --gpu-suite --out-dir "$OUT"      # everything the GPU acceptance needs
    python bench/step_time.py --gpu-suite --device cpu --shape tiny --out-dir /tmp/suite  # dry run
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loop_reference import inject_loop_mosld  # noqa: E402

import mosld  # noqa: E402

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("floor", "peft_d0", "peft_d05", "lora", "mola", "mosl", "mosld", "loop_mosld")
# Diagnostics for the GPU suite: mosld through the plain autograd path (what the fused op buys),
# and mosld with bf16 adapter weights (what fp32 master weights cost in casts).
EXTRA_VARIANTS = ("mosld_bf16w",)
COMPILED_VARIANTS = ("peft_d05", "mosld", "floor", "peft_d0")  # the compiled phase's subset, most important first
REFERENCE = "peft_d0"  # ratio columns are to this and to peft_d05
LABELS = {
    "floor": "frozen base + 1 scalar (floor)",
    "peft_d0": "peft LoRA r=8, dropout 0",
    "peft_d05": "peft LoRA r=8, dropout 0.05",
    "lora": "mosld `lora`",
    "mola": "mosld `mola`",
    "mosl": "mosld `mosl`",
    "mosld": "mosld `mosld`",
    "loop_mosld": "loop-over-experts MoSLD (reference)",
    "mosld_bf16w": "mosld `mosld`, bf16 adapter weights",
}


@dataclass(frozen=True)
class Shape:
    """A model shape and the adapter layout the benchmark uses on it."""

    name: str
    config: dict
    targets: tuple[str, ...]
    experts: int | tuple[int, ...]
    cpu_tokens: tuple[int, int]  # (batch, sequence length) defaults
    gpu_tokens: tuple[int, int]


SHAPES = {
    # SmolLM2-135M with the paper's adapter config: q and v, experts 8/6/4/2 by depth quartile.
    "smollm2": Shape(
        "smollm2",
        dict(
            hidden_size=576,
            num_hidden_layers=30,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        ),
        ("q_proj", "v_proj"),
        (8, 6, 4, 2),
        (2, 256),
        (4, 1024),
    ),
    # Llama-shaped (TinyLlama's widths), 8 layers, adapters on all seven projections, 8 experts.
    "llama2k": Shape(
        "llama2k",
        dict(
            hidden_size=2048,
            num_hidden_layers=8,
            intermediate_size=5632,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            tie_word_embeddings=False,
            max_position_embeddings=2048,
        ),
        ALL_PROJECTIONS,
        8,
        (1, 256),
        (4, 1024),
    ),
    # A few-layer model to exercise every code path (the GPU suite included) on a CPU in seconds.
    "tiny": Shape(
        "tiny",
        dict(
            hidden_size=64,
            num_hidden_layers=4,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            tie_word_embeddings=True,
            max_position_embeddings=256,
        ),
        ALL_PROJECTIONS,
        (4, 3, 3, 2),
        (2, 32),
        (2, 32),
    ),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- memory
class CpuMemory:
    """Peak resident-set growth of one step, read from Linux's /proc (VmHWM reset via clear_refs).

    Freed heap pages are handed back to the OS with ``malloc_trim`` first, so that one variant's
    step does not reuse pages another variant's step left mapped and look smaller than it is.
    """

    def __init__(self) -> None:
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self.available = Path("/proc/self/clear_refs").exists()

    def keep_freed_memory(self) -> None:
        """Serve every tensor from glibc's heap and never give freed pages back on its own.

        By default tensors above a few MiB are mmap-ed and unmapped on free, so every step
        page-faults its activations in again (hundreds of ms, varying with the neighbours'
        load). Reusing freed heap memory is what a caching allocator (the GPU's, jemalloc)
        does; it leaves the memory step's explicit ``malloc_trim`` + high-water mark intact.
        """
        if self._libc is None:
            return
        m_trim_threshold, m_mmap_max = -1, -4
        self._libc.mallopt(m_mmap_max, 0)
        self._libc.mallopt(m_trim_threshold, 2**30)

    @staticmethod
    def _status(key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) * 1024 if match else 0

    def start(self) -> int:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes the variant keeps between steps: parameters, buffers, optimizer state (storages counted once)."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


# ---------------------------------------------------------------------------------------- variants
def build_base(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape.config, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def apply_variant(model: nn.Module, variant: str, shape: Shape, targets: tuple[str, ...]) -> nn.Module:
    """Turn the freshly built base into ``variant`` (in place where possible); returns the model to train."""
    r, alpha, top_k = 8, 16.0, 2
    if variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        # On the input embeddings, so the backward pass runs through every layer as an adapter's does.
        model.floor_scale = nn.Parameter(torch.ones((), device=model.device))
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out * model.floor_scale.to(out.dtype))
        return model
    if variant in ("peft_d0", "peft_d05"):
        import peft

        config = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0 if variant == "peft_d0" else 0.05,
            target_modules=list(targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        return peft.get_peft_model(model, config)  # adapter weights in fp32 (autocast_adapter_dtype)
    if variant == "loop_mosld":
        return inject_loop_mosld(model, targets, shape.experts, r=r, alpha=alpha, top_k=top_k, shared_dropout=0.1)
    method = variant.removesuffix("_bf16w")
    config = mosld.AdapterConfig(
        method=method,
        r=r,
        alpha=alpha,
        target_modules=targets,
        num_experts=1 if method == "lora" else shape.experts,
        top_k=1 if method == "lora" else top_k,
        adapter_dtype="bfloat16" if variant.endswith("_bf16w") else "float32",
    )
    model = mosld.inject_adapters(model, config)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers"):
            return module
    raise ValueError("no decoder layer list found")


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
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(runner: Runner, ids: torch.Tensor) -> None:
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


class SavedTensors:
    """Bytes autograd saves for backward during a forward (distinct storages, parameters excluded).

    Exact where the CPU's peak RSS is crude; on either device it is the activation memory an
    adapter adds. Not available for compiled variants (their graphs save tensors internally).
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


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


# ---------------------------------------------------------------------------------------- one run
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
) -> list[dict]:
    """Build every variant, then time eager and/or compiled steps round-robin. Returns one result per mode."""
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
        [_phase(shape, "eager", runners, ids, device, warmup, rounds, steps, cpu_memory, deadline)] if eager else []
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
        results.append(_phase(shape, "compiled", phase_runners, ids, device, warmup, rounds, steps, cpu_memory, None))
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
    warmup: int,
    rounds: int,
    steps: int,
    cpu_memory: CpuMemory,
    deadline: float | None,
) -> dict:
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
                step_ms_iqr=1e3 * _iqr(runner.times),
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
    for runner in runners:
        if runner.name in PROFILE_VARIANTS and runner.model is not None:
            try:
                PROFILES.append(profile_step(runner, ids, device, f"{shape.name} {mode}"))
            except Exception as err:  # noqa: BLE001 - a diagnostic must not cost the results
                PROFILES.append(f"## {shape.name} {mode} {runner.name}: profiling failed: {err!r}\n")
    _add_ratios(variants)
    return {"shape": shape.name, "mode": mode, "device": device.type, "variants": variants}


PROFILE_VARIANTS: set[str] = set()  # --profile
PROFILES: list[str] = []  # profile_step's reports, written to profiles.txt


def profile_step(runner: Runner, ids: torch.Tensor, device: torch.device, tag: str) -> str:
    """One step under torch.profiler: the top ops by device and by host time, and both totals.

    When the host total is near the step time and the device total well below it, the step is
    bound by the host's per-op cost (eager dispatch), not by the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    syncs = count_host_syncs(runner, ids) if device.type == "cuda" else None
    train_step(runner, ids)
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        train_step(runner, ids)
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    device_total = sum(getattr(e, device_key, 0) for e in events) / 1e3
    host_total = sum(e.self_cpu_time_total for e in events) / 1e3
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    text = [
        f"## {tag} {runner.name}{' (compiled)' if runner.compiled else ''}: profiled step {1e3 * wall:.1f} ms wall, "
        f"self device time {device_total:.1f} ms, self host time {host_total:.1f} ms, {ops} aten op calls"
        + ("" if syncs is None else f", {len(syncs)} host-device syncs"),
    ]
    text += [f"  sync: {where}" for where in sorted(set(syncs or []))[:10]]
    if device.type == "cuda":
        text.append(events.table(sort_by=device_key, row_limit=25, max_name_column_width=60))
    text.append(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    return "\n".join(text) + "\n"


def count_host_syncs(runner: Runner, ids: torch.Tensor) -> list[str]:
    """One step under CUDA's sync debug mode: the operations that made the host wait for the GPU.

    A sync in the forward or backward (``.item()``, a data-dependent shape) stalls the launch queue,
    which on a launch-bound step costs far more than the kernel itself.
    """
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(runner, ids)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return [
        f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}: {str(w.message)[:80]}" for w in caught if "sync" in str(w.message)
    ]


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _add_ratios(variants: dict[str, dict]) -> None:
    for ref in ("peft_d0", "peft_d05", "floor"):
        base = variants.get(ref, {})
        for entry in variants.values():
            if "step_ms" in entry and "step_ms" in base:
                entry[f"time_x_{ref}"] = entry["step_ms"] / base["step_ms"]
                # Paired: the median of step-by-step ratios within the same round, which cancels
                # load drifting over the run (the i-th steps of two variants ran seconds apart).
                pairs = [a / b for a, b in zip(entry["times_ms"], base["times_ms"], strict=False)]
                entry[f"time_x_{ref}_paired"] = statistics.median(pairs) if pairs else None
            if "mem_peak_mib" in entry and "mem_peak_mib" in base:
                entry[f"mem_x_{ref}"] = entry["mem_peak_mib"] / base["mem_peak_mib"]
            if entry.get("mem_saved_mib") and base.get("mem_saved_mib"):
                entry[f"saved_x_{ref}"] = entry["mem_saved_mib"] / base["mem_saved_mib"]


# ---------------------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(results: list[dict], machine: dict) -> str:
    lines = []
    for res in results:
        head = (
            f"### {res['shape']}, {res['mode']}, {res['device']} ({res['dtype']}, batch {res['batch']} x "
            f"{res['seq']} tokens, targets {','.join(t.removesuffix('_proj') for t in res['targets'])})"
        )
        lines += [
            head,
            "",
            "| variant | trainable | step ms (median) | IQR ms | tokens/s | peak MiB | saved MiB "
            "| time x peft d0 | paired x peft d0 | time x peft d0.05 | mem x peft d0 | mem x peft d0.05 "
            "| saved x peft d0.05 | time x floor |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in res["variants"].values():
            if "error" in e and "step_ms" not in e:
                lines.append(f"| {e['label']} | {e['trainable_params']:,} | {e['error']} |" + " |" * 11)
                continue
            lines.append(
                f"| {e['label']} | {e['trainable_params']:,} | {_fmt(e.get('step_ms'), '.1f')} "
                f"| {_fmt(e.get('step_ms_iqr'), '.1f')} | {_fmt(e.get('tokens_per_s'), ',.0f')} "
                f"| {_fmt(e.get('mem_peak_mib'), ',.0f')} | {_fmt(e.get('mem_saved_mib'), ',.0f')} "
                f"| {_fmt(e.get('time_x_peft_d0'), '.2f')} | {_fmt(e.get('time_x_peft_d0_paired'), '.2f')} "
                f"| {_fmt(e.get('time_x_peft_d05'), '.2f')} "
                f"| {_fmt(e.get('mem_x_peft_d0'), '.2f')} | {_fmt(e.get('mem_x_peft_d05'), '.2f')} "
                f"| {_fmt(e.get('saved_x_peft_d05'), '.2f')} | {_fmt(e.get('time_x_floor'), '.2f')} |"
            )
        lines.append("")
    checks = acceptance(results)
    if checks:
        lines += ["### Acceptance (issue 5)", "", "| check | measured | target | result |", "|---|---:|---:|---|"]
        for c in checks:
            lines.append(f"| {c['check']} | {_fmt(c['value'], '.3f')} | {c['target']} | {c['result']} |")
        lines.append("")
    lines.append(f"Machine: {machine['summary']}")
    return "\n".join(lines) + "\n"


def acceptance(results: list[dict]) -> list[dict]:
    """The issue's acceptance ratios, for the runs present (CPU: smollm2 eager; GPU: llama2k eager)."""
    checks = []

    def ratio(v: dict, a: str, b: str, key: str) -> float | None:
        return v[a][key] / v[b][key] if a in v and b in v and key in v[a] and key in v[b] else None

    def add(name: str, value: float | None, op: str, target: float) -> None:
        ok = None if value is None else (value <= target if op == "<=" else value >= target)
        checks.append(
            {
                "check": name,
                "value": value,
                "target": f"{op} {target}",
                "result": {True: "pass", False: "FAIL"}.get(ok, "n/a"),
            }
        )

    for res in results:
        v, tag = res["variants"], f"{res['shape']} {res['mode']} {res['device']}"
        if res["mode"] != "eager":
            continue
        if res["device"] == "cpu" and res["shape"] == "smollm2":
            add(f"{tag}: mosld time / peft d0 time", ratio(v, "mosld", "peft_d0", "step_ms"), "<=", 1.0)
            paired = v.get("mosld", {}).get("time_x_peft_d0_paired")
            add(f"{tag}: same, median of paired per-round ratios", paired, "<=", 1.0)
            add(f"{tag}: loop time / mosld time", ratio(v, "loop_mosld", "mosld", "step_ms"), ">=", 2.0)
        if res["device"] == "cuda" and res["shape"] == "llama2k":
            add(f"{tag}: mosld time / peft d0.05 time", ratio(v, "mosld", "peft_d05", "step_ms"), "<=", 0.85)
            add(
                f"{tag}: mosld peak mem / peft d0.05 peak mem",
                ratio(v, "mosld", "peft_d05", "mem_peak_mib"),
                "<=",
                0.75,
            )
            add(f"{tag}: mosld time / floor time", ratio(v, "mosld", "floor", "step_ms"), "<=", 1.25)
            add(f"{tag}: loop time / mosld time", ratio(v, "loop_mosld", "mosld", "step_ms"), ">=", 3.0)
    return checks


def machine_info(device: torch.device) -> dict:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    where = info.get("gpu") or f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    info["summary"] = (
        f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft_version}, "
        f"Python {info['python']}"
    )
    return info


def write_outputs(
    results: list[dict], machine: dict, args: argparse.Namespace, json_path: Path | None, md_path: Path | None
) -> str:
    text = markdown(results, machine)
    folder = json_path.parent if json_path is not None else (md_path.parent if md_path is not None else None)
    if PROFILES and folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "profiles.txt").write_text("\n".join(PROFILES))
    payload = {
        "machine": machine,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "results": results,
        "acceptance": acceptance(results),
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(text)
    return text


# ---------------------------------------------------------------------------------------- CLI
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
        help="the GPU acceptance run: llama2k and smollm2, eager and compiled, all variants, into --out-dir",
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
    PROFILE_VARIANTS.update(v for v in profile_spec.split(",") if v and v != "none")

    if args.gpu_suite:
        if args.out_dir is None:
            raise SystemExit("--gpu-suite needs --out-dir")
        start = time.monotonic()
        deadline = start + args.budget_s
        shapes = [SHAPES[args.shape]] if args.shape else [SHAPES["llama2k"], SHAPES["smollm2"]]
        results: list[dict] = []
        plan = [(s, False) for s in shapes] + [(s, True) for s in shapes]  # both eager runs before any compiling
        for shape, compiled in plan:
            batch, seq = shape.gpu_tokens if gpu else shape.cpu_tokens
            targets = _targets(args.targets, shape)
            if compiled and time.monotonic() > deadline:
                log(f"{shape.name} compiled: skipped, time budget spent")
                results.append(
                    {
                        "shape": shape.name,
                        "mode": "compiled",
                        "device": device.type,
                        "variants": {},
                        "skipped": "time budget",
                    }
                )
                continue
            try:
                res = run(
                    shape,
                    device,
                    dtype,
                    [v for v in variants if v in COMPILED_VARIANTS] if compiled else variants,
                    targets,
                    args.batch or batch,
                    args.seq or seq,
                    warmup,
                    rounds,
                    steps,
                    compile_variants=list(COMPILED_VARIANTS) if compiled else [],
                    eager=not compiled,
                    deadline=deadline,
                )
                results += res
            except Exception as err:  # noqa: BLE001
                log(f"{shape.name}: run failed: {err}\n{traceback.format_exc()}")
                results.append({"shape": shape.name, "mode": "compiled" if compiled else "eager", "error": repr(err)})
            results = [r for r in results if "variants" in r]
            write_outputs(results, machine, args, args.out_dir / "results.json", args.out_dir / "results.md")
            log(f"wrote {args.out_dir} after {time.monotonic() - start:.0f} s")
        print(write_outputs(results, machine, args, args.out_dir / "results.json", args.out_dir / "results.md"))
        return 0

    shape = SHAPES[args.shape or "smollm2"]
    batch, seq = shape.gpu_tokens if gpu else shape.cpu_tokens
    results = run(
        shape,
        device,
        dtype,
        variants,
        _targets(args.targets, shape),
        args.batch or batch,
        args.seq or seq,
        warmup,
        rounds,
        steps,
        compile_variants=list(COMPILED_VARIANTS) if compile_on else [],
    )
    out_json = args.out or (args.out_dir / "results.json" if args.out_dir else None)
    out_md = args.markdown or (args.out_dir / "results.md" if args.out_dir else None)
    print(write_outputs(results, machine, args, out_json, out_md))
    return 0


def _targets(spec: str | None, shape: Shape) -> tuple[str, ...]:
    if spec is None:
        return shape.targets
    if spec == "all":
        return ALL_PROJECTIONS
    return tuple(t if t.endswith("_proj") else f"{t}_proj" for t in spec.split(","))


if __name__ == "__main__":
    raise SystemExit(main())
