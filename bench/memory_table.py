"""Peak memory of one training step of the embedded SmolLM2-135M: base precision x method x checkpointing.

Every configuration runs in a fresh subprocess, so that each one's baseline is clean: the resident
set is read after the imports (bitsandbytes' too, for a quantized base) and before the model is
built. The process then loads the base (``load_base_model``, quantized where asked), injects the default config's adapter (q_proj/v_proj,
r 8, alpha 16; ``lora`` one expert, ``mosld`` 8/6/4/2), builds AdamW over the trainable tensors,
runs one warm-up step, resets the high-water mark and measures one more step. The step is the
default run's shape: a batch of 8 x 256 random token ids (seeded), no padding, loss on the last
``--answer-tokens`` positions of each sequence through ``answer_logits_loss`` (logits at those
positions only), backward, AdamW step.

Measured per configuration: **peak** (CPU: VmHWM during the step minus the RSS before the model was
built; CUDA: max allocated, the CUDA context excluded), **resident** (bytes of parameters, buffers
and optimizer state, storages counted once), **saved** (bytes autograd keeps for backward, distinct
storages, parameters excluded), **step growth** (peak during the step minus the RSS just before it).

Example::

    OMP_NUM_THREADS=1 python -m bench.memory_table --out bench/results/cpu-memory
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.memory import CpuMemory, SavedTensors, resident_bytes

MODEL = "embedded:smollm2-135m"
# base row -> (load_base_model dtype, quantization); compute runs in the dtype unless a row says otherwise
BASES = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8": ("float32", {"bits": 8}),
    "nf4": ("float32", {"bits": 4, "quant_type": "nf4", "double_quant": True}),
    "nf4_bf16": ("bfloat16", {"bits": 4, "quant_type": "nf4", "double_quant": True}),
}
METHODS = ("lora", "mosld")
MIB = 2**20


def exact_rss_allocator() -> None:
    """Serve every allocation over 64 KiB by its own mapping, returned to the OS when freed.

    glibc's default raises its mmap threshold (up to 32 MiB) after the first large free, so later
    activations come from the heap, whose freed pages stay resident: RSS would then overstate what
    is alive. A fixed threshold turns that off; the step's RSS follows its tensors.
    """
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def own_weights(model: torch.nn.Module) -> None:
    """Copy the tensors that still point into the safetensors file into memory of their own.

    Unquantized weights load as views of the memory-mapped file; its touched pages count in the RSS
    for as long as any tensor maps it, also after quantization replaced most of them. Owning the
    tensors drops the mapping, so the RSS holds the model as it is, not the file it came from.
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if type(t).__name__ not in ("Params4bit", "Int8Params"):
                t.data = t.data.clone()


def step_batch(vocab: int, batch: int, seq: int, answer_tokens: int, device: torch.device) -> dict:
    """Random ids (seeded), no padding, labels -100 except the last ``answer_tokens`` positions."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, seq - answer_tokens :] = ids[:, seq - answer_tokens :]
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch_.items()}


def measure(base: str, method: str, checkpointing: bool, batch: int, seq: int, answer_tokens: int) -> dict:
    """One configuration's measurements, in this process (call it in a fresh one)."""
    import mosld
    from mosld.adapters.checkpointing import enable_gradient_checkpointing
    from mosld.models import load_base_model
    from mosld.training.module import answer_logits_loss

    dtype, quantization = BASES[base]
    if quantization is not None:
        # an import like torch's (~45 MiB of resident libraries): part of the baseline, not of the model
        import bitsandbytes  # noqa: F401
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = CpuMemory()
    if device.type == "cuda":
        torch.cuda.init()
        baseline = torch.cuda.memory_allocated(device)
    else:
        exact_rss_allocator()
        baseline = cpu.start()
    model = load_base_model(MODEL, dtype=dtype, quantization=quantization)
    if device.type == "cpu":
        own_weights(model)
    elif quantization is None:
        model.to(device)
    model.config.use_cache = False
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    config = mosld.AdapterConfig(method=method, r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    mosld.inject_adapters(model, config).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    data = step_batch(model.config.vocab_size, batch, seq, answer_tokens, device)

    def step() -> None:
        answer_logits_loss(model, data).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: the optimizer state exists from here on
    resident = resident_bytes(model, optimizer)
    saved = SavedTensors(model)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            step()
        torch.cuda.synchronize(device)
        high = torch.cuda.max_memory_allocated(device)
    else:
        before = cpu.start()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            step()
        high = cpu.peak()
    return {
        "base": base,
        "method": method,
        "checkpointing": checkpointing,
        "device": device.type,
        "trainable": sum(p.numel() for p in params),
        "resident": resident,
        "saved": saved.total,
        "before_step": before - baseline,
        "step_growth": high - before,
        "peak": high - baseline,
        "step_s": time.perf_counter() - t0,
    }


def run_all(bases: list[str], args: argparse.Namespace) -> list[dict]:
    """Every configuration in its own subprocess, one after the other."""
    rows = []
    for base in bases:
        for method in METHODS:
            for ckpt in (False, True):
                cmd = [sys.executable, "-m", "bench.memory_table", "--worker", base, method, str(int(ckpt))]
                cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--answer-tokens", str(args.answer_tokens)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
                    row = {"base": base, "method": method, "checkpointing": ckpt, "error": tail[0]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"[{time.strftime('%H:%M:%S')}] {row}", file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def predicted_peak(row: dict, args: argparse.Namespace) -> int:
    """The planner's total (``mosld.tools.memory``) for a measured configuration."""
    from mosld.tools.memory import plan_from_options

    dtype, quantization = BASES[row["base"]]
    adapter = {"method": row["method"], "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    model = {"model_name_or_path": MODEL, "dtype": dtype, "quantization": quantization, "adapter": adapter}
    options = {"model": model | {"gradient_checkpointing": row["checkpointing"]}}
    return plan_from_options(options, args.batch, args.seq, args.answer_tokens)[0].total


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """The side-by-side table (MiB) with the planner's prediction beside each measured peak."""
    device = next((r["device"] for r in rows if "device" in r), "?")
    what = "VmHWM - RSS before the model was built" if device == "cpu" else "max allocated"
    lines = [
        f"#### SmolLM2-135M, one training step, {device}, batch {args.batch} x {args.seq} tokens, "
        f"loss on {args.answer_tokens} answer positions per sequence (peak: {what})",
        "",
        "| base | method | checkpointing | trainable | resident MiB | saved MiB | step growth MiB "
        "| overhead MiB | peak MiB | planner MiB | planner vs peak |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['base']} | {r['method']} | {'on' if r['checkpointing'] else 'off'} |"
        if "error" in r:
            lines.append(head + f" failed: {r['error'][:80]} |" + " |" * 7)
            continue
        # what the process holds between steps beyond its tensors: allocator, libraries, load leftovers
        overhead = r["before_step"] - r["resident"]
        mib = [f"{v / MIB:,.0f}" for v in (r["resident"], r["saved"], r["step_growth"], overhead, r["peak"])]
        predicted = predicted_peak(r, args)
        diff = f"{100 * (predicted - r['peak']) / r['peak']:+.1f}%"
        lines.append(head + f" {r['trainable']:,} | " + " | ".join(mib) + f" | {predicted / MIB:,.0f} | {diff} |")
    lines += [
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; torch {torch.__version__}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", default="fp32,bf16,int8,nf4", help=f"comma-separated, of {', '.join(BASES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--answer-tokens", type=int, default=4)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--from-json", nargs="+", default=None, help="tabulate saved results (merged in order)")
    parser.add_argument("--worker", nargs=3, metavar=("BASE", "METHOD", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        base, method, ckpt = args.worker
        print(json.dumps(measure(base, method, ckpt == "1", args.batch, args.seq, args.answer_tokens)))
        return []
    if args.from_json:
        saved = [json.loads(Path(path).read_text()) for path in args.from_json]
        rows = [row for result in saved for row in result["rows"]]
        for key in ("batch", "seq", "answer_tokens"):  # the shape the rows were measured with
            setattr(args, key, saved[0]["args"][key])
        print(markdown(rows, args))
        return rows
    bases = args.bases.split(",")
    unknown = [b for b in bases if b not in BASES]
    if unknown:
        parser.error(f"--bases: unknown {unknown}; known: {', '.join(BASES)}")
    rows = run_all(bases, args)
    table = markdown(rows, args)
    print(table)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
        Path(args.out + ".md").write_text(table)
    return rows


if __name__ == "__main__":
    main()
