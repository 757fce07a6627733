"""Decoding throughput: a routed MoSLD model against the same base without adapters, side by side (issue 18).

Both models decode the same prompts with ``mosld.evaluation.generate_batch`` (batched greedy decoding on the
KV cache, prompts left-padded), EOS ignored so that every row decodes exactly ``--new-tokens`` tokens. The
variants alternate within each repeat (bare, routed, routed, bare, ...) so that a change of machine load
hits both; medians over the repeats. Hooks on the model time each call: the first call of a batch is the
prefill (the prompts), the others are decode steps (one token per row each); what remains of the wall time
is the loop itself (argmax, the stop checks, building the next step's inputs).

The routed model is the default run's adapter (``configs/mosld.yaml``: method mosld, r 8, alpha 16, q_proj
and v_proj, experts 8/6/4/2 per depth quartile, top-2, shared A), with non-zero random B (as after
training; the cost does not depend on the values). After the timing, one extra pass per thread count times
the adapter layers themselves (hooks on every ``MoSLDLinear`` and on its base projection: what the adapter
adds per decode step) and one decode batch under ``torch.profiler`` (top operators).

Examples::

    OMP_NUM_THREADS=1 python -m bench.generation_throughput                       # CPU, 1 and 2 threads
    python -m bench.generation_throughput --quick                                 # seconds: smoke test
    python -m bench.generation_throughput --out bench/results/cpu-generation-throughput
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import mosld
from bench.report import machine_info
from mosld.evaluation import generate_batch
from mosld.evaluation.generation_scoring import left_pad
from mosld.models import load_base_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("bare", "mosld")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class NoEOS:
    """The tokenizer with no EOS: every row decodes ``max_new_tokens`` tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.eos_token_id, self.pad_token_id = tokenizer, None, tokenizer.pad_token_id

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens=False):
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)


def make_prompts(tokenizer, count: int, min_len: int, max_len: int) -> list[list[int]]:
    """``count`` prompts of seeded lengths in [min_len, max_len], cut from the repository's docs."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    ids = tokenizer(text)["input_ids"]
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=gen).tolist()
    starts = torch.randint(0, len(ids) - max_len, (count,), generator=gen).tolist()
    return [ids[s : s + n] for s, n in zip(starts, lengths, strict=True)]


def build(variant: str, name: str) -> torch.nn.Module:
    model = load_base_model(name)
    if variant != "bare":
        cfg = mosld.AdapterConfig(method=variant, r=8, alpha=16, target_modules=("q_proj", "v_proj"))
        model = mosld.inject_adapters(model, cfg)
        gen = torch.Generator().manual_seed(1)
        for layer in mosld.adapter_layers(model).values():
            with torch.no_grad():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    model.generation_config.eos_token_id = None
    return model.eval()


class CallTimer:
    """Start and end times of every call of a module (forward pre-hook and hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple[float, float]] = []
        self._start = 0.0
        self.handles = [
            module.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter())),
            module.register_forward_hook(lambda *_: self.calls.append((self._start, time.perf_counter()))),
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def decode_all(model, batches, tokenizer) -> dict[str, float]:
    """Decode every batch; seconds of the whole, of the prefills, of the decode steps, tokens decoded."""
    timer = CallTimer(model)
    prefill = decode = 0.0
    tokens = decode_tokens = 0
    start = time.perf_counter()
    for batch in batches:
        timer.calls.clear()
        texts = generate_batch(model, batch, tokenizer)
        (p0, p1), *steps = timer.calls
        prefill += p1 - p0
        decode += sum(e - s for s, e in steps)
        rows = len(texts)
        tokens += rows * batch["generation"].max_new_tokens
        decode_tokens += rows * len(steps)  # the first token comes from the prefill
    total = time.perf_counter() - start
    timer.remove()
    return {"total_s": total, "prefill_s": prefill, "decode_s": decode, "loop_s": total - prefill - decode,
            "tokens": tokens, "decode_tokens": decode_tokens}  # fmt: skip


def adapter_share(model, batches, tokenizer) -> dict[str, float]:
    """One pass with hooks on the adapter layers: seconds in the MoSLD layers, in their base projections,
    and in the decode steps, over the decode steps only (the first call of a batch is its prefill)."""
    layers = list(mosld.adapter_layers(model).values())
    outer = [CallTimer(m) for m in layers]
    inner = [CallTimer(m.base_layer) for m in layers]
    model_timer = CallTimer(model)
    adapter = base = steps = 0.0
    for batch in batches:
        for t in [*outer, *inner, model_timer]:
            t.calls.clear()
        generate_batch(model, batch, tokenizer)
        adapter += sum(e - s for t in outer for s, e in t.calls[1:])
        base += sum(e - s for t in inner for s, e in t.calls[1:])
        steps += sum(e - s for s, e in model_timer.calls[1:])
    for t in [*outer, *inner, model_timer]:
        t.remove()
    return {"adapted_layers_s": adapter, "base_projections_s": base, "decode_s_with_hooks": steps,
            "adapter_extra_s": adapter - base, "layers": len(layers)}  # fmt: skip


def profile_decode(model, batch, tokenizer, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile

    generate_batch(model, batch, tokenizer)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate_batch(model, batch, tokenizer)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50)


def median(values: list[float]) -> float:
    return statistics.median(values)


def run(args) -> dict:
    tokenizer = load_tokenizer(args.model)
    no_eos = NoEOS(tokenizer)
    prompts = sorted(make_prompts(tokenizer, args.prompts, args.min_len, args.max_len), key=len, reverse=True)
    spec = SimpleNamespace(metric="exact_match", max_new_tokens=args.new_tokens, stop=())
    batches = [
        {**left_pad(prompts[i : i + args.batch], tokenizer.pad_token_id), "generation": spec}
        for i in range(0, len(prompts), args.batch)
    ]
    models = {v: build(v, args.model) for v in VARIANTS}
    log(f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, batch {args.batch}, "
        f"{args.new_tokens} new tokens; adapter: {mosld.count_parameters(models['mosld'])}")  # fmt: skip
    results: dict = {"settings": vars(args), "prompt_tokens": [len(p) for p in prompts], "threads": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for model in models.values():  # warm-up: one batch each
            generate_batch(model, batches[0], no_eos)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for repeat in range(args.repeats):
            order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                runs[variant].append(decode_all(models[variant], batches, no_eos))
                r = runs[variant][-1]
                log(f"threads {threads} repeat {repeat} {variant}: total {r['total_s']:.2f} s, prefill "
                    f"{r['prefill_s']:.2f} s, decode {r['decode_s']:.2f} s, loop {r['loop_s']:.3f} s")  # fmt: skip
        summary = {}
        for variant, rs in runs.items():
            med = {k: median([r[k] for r in rs]) for k in ("total_s", "prefill_s", "decode_s", "loop_s")}
            med["tokens_per_s"] = rs[0]["tokens"] / med["total_s"]
            med["decode_tokens_per_s"] = rs[0]["decode_tokens"] / med["decode_s"]
            med["decode_ms_per_step"] = 1e3 * med["decode_s"] / (rs[0]["decode_tokens"] / args.batch)
            summary[variant] = {**med, "runs": rs}
        bare, routed = summary["bare"], summary["mosld"]
        ratios = {
            f"{k}_ratio": routed[k] / bare[k] for k in ("total_s", "prefill_s", "decode_s") if bare[k] > 0
        }  # fmt: skip
        paired = [r["decode_s"] / b["decode_s"] for r, b in zip(runs["mosld"], runs["bare"], strict=True)]
        ratios["decode_ratio_paired_median"] = median(paired)
        share = adapter_share(models["mosld"], batches, no_eos) if args.breakdown else None
        profiles = {}
        if args.profile:
            for variant, model in models.items():
                profiles[variant] = profile_decode(model, batches[-1], no_eos)
        results["threads"][str(threads)] = {"summary": summary, "ratios": ratios, "adapter_share": share,
                                            "profiles": profiles}  # fmt: skip
        log(f"threads {threads}: ratios {json.dumps({k: round(v, 3) for k, v in ratios.items()})}")
    results["machine"] = machine_info(torch.device("cpu"))
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    p = results["prompt_tokens"]
    lines = [
        "# Decoding throughput: routed MoSLD vs the bare base (bench/generation_throughput.py)",
        "",
        f"{results['machine']['summary']}.",
        f"Model {s['model']}, fp32; {len(p)} prompts of {min(p)}-{max(p)} tokens (mean {sum(p) / len(p):.0f}), "
        f"batch {s['batch']}, {s['new_tokens']} new tokens per row (EOS ignored), greedy; {s['repeats']} repeats, "
        "variants alternating, medians. Routed: method mosld, r 8, q_proj/v_proj, experts 8/6/4/2 per depth "
        "quartile, top-2, shared A.",
        "",
    ]
    if s.get("note"):
        lines += [s["note"], ""]
    for threads, r in results["threads"].items():
        lines += [f"## {threads} thread(s)", "", "| | bare | mosld | ratio |", "|---|---|---|---|"]
        b, m, ratios = r["summary"]["bare"], r["summary"]["mosld"], r["ratios"]
        rows = [
            ("decoded tokens/s (decode steps)", "decode_tokens_per_s", "{:.1f}"),
            ("ms per decode step (batch of rows)", "decode_ms_per_step", "{:.1f}"),
            ("tokens/s end to end (prefill + decode)", "tokens_per_s", "{:.1f}"),
            ("prefill s (all batches)", "prefill_s", "{:.2f}"),
            ("decode s (all batches)", "decode_s", "{:.2f}"),
            ("loop s (argmax, stop checks, inputs)", "loop_s", "{:.3f}"),
            ("total s", "total_s", "{:.2f}"),
        ]
        for label, key, fmt in rows:
            lines.append(f"| {label} | {fmt.format(b[key])} | {fmt.format(m[key])} | {m[key] / b[key]:.3f} |")
        lines += ["", f"Decode time ratio routed/bare, median of the paired repeats: "
                  f"{ratios['decode_ratio_paired_median']:.3f}.", ""]  # fmt: skip
        share = r.get("adapter_share")
        if share:
            lines += [
                "In decode steps (a separate pass with timing hooks on every adapted layer, which add their own cost): "
                f"{share['decode_s_with_hooks']:.2f} s in the model, {share['adapted_layers_s']:.2f} s in the "
                f"{share['layers']} adapted projections, of which {share['base_projections_s']:.2f} s in their "
                f"frozen base projections: the adapters add {share['adapter_extra_s']:.2f} s "
                f"({100 * share['adapter_extra_s'] / share['decode_s_with_hooks']:.1f}% of the decode time).",
                "",
            ]
        for variant, table in r.get("profiles", {}).items():
            lines += [f"### torch.profiler, one decode batch, {variant}", "", "```", table, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--note", default="", help="a line for the results (the machine's load, say)")
    parser.add_argument("--quick", action="store_true", help="8 short prompts, 8 tokens, 1 repeat, 1 thread")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in str(args.threads).split(",")]
    if args.quick:
        args.prompts, args.min_len, args.max_len, args.new_tokens, args.repeats = 8, 20, 40, 8, 1
        args.threads, args.profile = [1], False
    results = run(args)
    text = markdown(results)
    print(text)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(results, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
