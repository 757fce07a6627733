"""Serving throughput and latency: the routed mixture, the collapsed peft LoRA and the bare base behind
``python -m mosld.serve``, at 1, 4 and 16 concurrent clients.

Each variant is one server process, started in turn (never two at once, so that they do not share the CPU or
GPU); for each concurrency, every client sends ``--requests`` streamed chat requests one after the other (greedy,
the same prompts in the same order for every variant) with the official ``openai`` client. Every answer is
``--max-tokens`` long (``ignore_eos``: the variants would otherwise decode answers of different lengths, a
fine-tuned adapter's short answers against the base's long ones); ``--natural-length`` lets them end at EOS.
Measured per request: time to first token (the first chunk with text), time to the last chunk, output tokens
(the server's usage count), time per token after the first; per concurrency: output tokens/s over the level's
wall time. The table gives each figure and its ratio to the bare base at the same concurrency. A warm-up
request per server is not counted.

    python -m bench.serve --run lightning_logs/version_0 --out bench/results/serve-cpu
    python -m bench.serve --run RUN --peft RUN/peft/mixture --clients 1,4,16 --requests 4 --max-tokens 64
    python -m bench.serve --run RUN --clients 1 --requests 1 --max-tokens 4 --out /tmp/serve-smoke   # smoke test

The collapsed variant needs the run's peft export (``python scripts/export_peft.py RUN``, default
``RUN/peft/mixture``); without it the variant is skipped with a message. Not a test: docs/serving.md has
the figures and the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.report import machine_info
from mosld.serve.model import run_settings

PROMPTS = [
    "What is the boiling point of water at sea level?",
    "Name three primary colours.",
    "Explain in one sentence why the sky is blue.",
    "Give a synonym for 'happy'.",
    "What is 17 plus 25?",
    "Write a short greeting for a birthday card.",
    "Which planet is closest to the Sun?",
    "Translate 'good morning' into French.",
    "List two uses of a paperclip.",
    "What do bees make?",
    "Describe a cat in five words.",
    "Why do we need sleep?",
    "What is the capital of Japan?",
    "Suggest a name for a pet fish.",
    "How many legs does a spider have?",
    "What is the opposite of 'ancient'?",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], threads: int | None, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "mosld.serve", *args, "--port", str(port), "--log-level", "warning"]
    command += ["--threads", str(threads)] if threads else []
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the server did not start ({' '.join(command)}):\n{log.read_text()}") from None
            time.sleep(0.5)
    return process, url


def one_request(client, prompt: str, max_tokens: int, fixed_length: bool) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model="mosld", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": fixed_length},
    )  # fmt: skip
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    first = first or done
    per_token = (done - first) / (tokens - 1) if tokens > 1 else None  # after the first: the decoding steps
    return {"ttft": first - started, "seconds": done - started, "tokens": tokens, "per_token": per_token}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(url: str, clients: int, requests: int, max_tokens: int, fixed_length: bool) -> dict[str, float]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)

    def run_client(c: int) -> list[dict[str, float]]:
        prompts = [PROMPTS[(c * requests + r) % len(PROMPTS)] for r in range(requests)]
        return [one_request(client, prompt, max_tokens, fixed_length) for prompt in prompts]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [row for rows in pool.map(run_client, range(clients)) for row in rows]
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(rows),
        "output_tokens": sum(r["tokens"] for r in rows),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
        "ttft_median_s": statistics.median(r["ttft"] for r in rows),
        "ttft_p95_s": percentile([r["ttft"] for r in rows], 0.95),
        "request_median_s": statistics.median(r["seconds"] for r in rows),
        "request_p95_s": percentile([r["seconds"] for r in rows], 0.95),
        "per_token_median_ms": 1000 * statistics.median(r["per_token"] for r in rows if r["per_token"] is not None)
        if any(r["per_token"] is not None for r in rows)
        else None,
    }


def table(results: dict[str, list[dict]]) -> str:
    base = {row["clients"]: row for row in results.get("base", [])}
    lines = [
        "| variant | clients | output tokens / request | output tok/s | x base | TTFT median (s) | TTFT p95 (s) "
        "| ms / token after the first (median) | request median (s) | x base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, rows in results.items():
        for row in rows:
            ref = base.get(row["clients"])
            speed = f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
            latency = f"{row['request_median_s'] / ref['request_median_s']:.2f}" if ref else "-"
            per_token = "-" if row["per_token_median_ms"] is None else f"{row['per_token_median_ms']:.0f}"
            lines.append(
                f"| {variant} | {row['clients']} | {row['output_tokens'] / row['requests']:.1f} "
                f"| {row['tokens_per_s']:.1f} | {speed} | {row['ttft_median_s']:.3f} | {row['ttft_p95_s']:.3f} "
                f"| {per_token} | {row['request_median_s']:.2f} | {latency} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run (the routed mixture)")
    parser.add_argument("--peft", type=Path, help="the collapsed LoRA (default RUN/peft/mixture)")
    parser.add_argument("--clients", default="1,4,16", help="comma list of concurrencies")
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--natural-length",
        action="store_true",
        help="let answers end at EOS (default: every answer is --max-tokens long, ignore_eos, so that the "
        "variants decode the same number of tokens)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each server")
    parser.add_argument("--serve-args", default="", help="more options for every server (e.g. '--device cuda')")
    parser.add_argument("--out", type=Path, default=None, help="folder for serve.json, serve.md and server logs")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    peft_folder = args.peft or args.run / "peft" / "mixture"
    # every variant in the run's precision: a peft folder records none, and `auto` could choose another
    extra = ["--precision", run_settings(args.run)[1], *args.serve_args.split()]
    variants = {"routed": ["--run", str(args.run)], "collapsed-peft": ["--peft", str(peft_folder)],
                "base": ["--run", str(args.run), "--no-adapter"]}  # fmt: skip
    if not (peft_folder / "adapter_config.json").is_file():
        print(f"collapsed-peft: skipped, {peft_folder} has no peft export (scripts/export_peft.py)", file=sys.stderr)
        del variants["collapsed-peft"]
    out = args.out or Path("/tmp") / f"mosld-bench-serve-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for variant, serve_args in variants.items():
        process, url = start_server(serve_args + extra, args.threads, out / f"{variant}.log")
        try:
            measure(url, 1, 1, 4, True)  # warm-up: first calls allocate and pick kernels
            results[variant] = []
            for n in clients:
                row = measure(url, n, args.requests, args.max_tokens, not args.natural_length)
                results[variant].append(row)
                print(f"{variant} x{n}: {row['tokens_per_s']:.1f} tok/s, TTFT median {row['ttft_median_s']:.3f} s",
                      flush=True)  # fmt: skip
        finally:
            process.terminate()
            process.wait(60)
    record = {
        "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(torch.device("cuda" if "cuda" in args.serve_args else "cpu")),
        "max_tokens": args.max_tokens,
        "fixed_length": not args.natural_length,
        "requests_per_client": args.requests,
        "results": results,
    }
    (out / "serve.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "serve.md").write_text(table(results) + "\n")
    print(table(results))
    return record


if __name__ == "__main__":
    main()
