"""mosld against MoE-PEFT (MoLA, MixLoRA, LoRA) and peft: training-step time, forward time, memory.

Both sides build the same Llama from the same weights file (the embedded SmolLM2-135M's cached
safetensors, or a seeded random tiny model), each with its own implementation of the matched
adapters, and train on the same batch with the same AdamW, dtype and threads. The sides run in
two worker processes (``bench/peers/worker.py``; MoE-PEFT in its own environment,
``bench/peers/setup_env.sh``); every round times one training step of every variant of both sides,
then one forward of each, in an order rotated each round, so load changes hit both sides alike.
Ratios are mosld / peer: medians, and the median and range of the per-round ratios.

    bash bench/peers/setup_env.sh                        # once: the peer's environment
    python -m bench.peers.compare                        # SmolLM2-135M shape, 2 x 256 tokens, 1 thread
    python -m bench.peers.compare --shape tiny --rounds 2 --warmup 1    # seconds: every variant, both sides
    python -m bench.peers.crosscheck                     # the correctness cross-check (docs/benchmarks.md)

Results: ``bench/results/cpu-peers.{json,md}`` by default (``--out``, ``--markdown``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.peers import report
from bench.report import iqr

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / "bench" / "peers" / ".venv" / "bin" / "python"
MOSLD_VARIANTS = ("floor", "peft_lora", "lora", "mola", "mola_mlp", "mosld_mlp")
PEER_VARIANTS = ("floor", "lora", "mola", "mixlora")
# (mosld-side variant, MoE-PEFT variant): the matched configurations the ratios compare
PAIRS = (
    ("floor", "floor"),
    ("lora", "lora"),
    ("peft_lora", "lora"),
    ("mola", "mola"),
    ("mosld", "mola"),
    ("mola_mlp", "mixlora"),
    ("mosld_mlp", "mixlora"),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class WorkerProcess:
    """A ``bench.peers.worker`` in its own interpreter, spoken to one JSON line at a time."""

    def __init__(self, side: str, python: Path | str, threads: int, device: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if device == "cpu":
            env["MOE_PEFT_EXECUTOR_TYPE"] = "CPU"  # else MoE-PEFT picks CUDA whenever it is there
        self.side = side
        self.process = subprocess.Popen(
            [str(python), "-m", "bench.peers.worker", "--side", side],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def __call__(self, command: str, **kwargs) -> object:
        self.process.stdin.write(json.dumps({"command": command, **kwargs}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker exited (status {self.process.wait()}); its stderr is above")
        reply = json.loads(line)
        if not reply["ok"]:
            raise WorkerError(f"{self.side}: {command} {kwargs.get('variant', '')}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"command": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self.process.stdout.close()


class WorkerError(RuntimeError):
    pass


def embedded_config(folder: Path) -> dict:
    """The Llama config of a transformers-5 ``config.json`` in keys both 5.x and 4.46 read."""
    raw = json.loads((folder / "config.json").read_text())
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
        "rms_norm_eps",
        "hidden_act",
    )
    config = {k: raw[k] for k in keys if k in raw}
    # 5.x writes rope_parameters; 4.46 reads rope_theta and would fall back to 10,000 without it
    config["rope_theta"] = raw.get("rope_parameters", {}).get("rope_theta", raw.get("rope_theta", 10000.0))
    return config


def prepare_base(shape: str, base: str, seed: int, folder: Path) -> tuple[dict, str]:
    """(config, weights file) both sides build from: the embedded SmolLM2's cache or seeded random weights."""
    if base == "embedded":
        if shape != "smollm2":
            raise SystemExit("--base embedded is the SmolLM2-135M shape; use --shape smollm2 (or --base random)")
        from mosld.models import resolve_model_path

        cached = Path(resolve_model_path("embedded:smollm2-135m"))  # builds the cache on first use
        return embedded_config(cached), str(cached / "model.safetensors")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench.variants import SHAPES

    config = dict(SHAPES[shape].config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    weights = folder / f"{shape}-seed{seed}.safetensors"
    save_file(state, str(weights))
    return config, str(weights)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", choices=("smollm2", "tiny", "llama2k"), default="smollm2")
    parser.add_argument(
        "--base",
        choices=("embedded", "random"),
        default=None,
        help="embedded: SmolLM2-135M's weights (smollm2's default); random: seeded random weights (the others')",
    )
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (cpu 2, cuda 4)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (cpu 256, cuda 1024)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="cpu float32, cuda bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each worker (1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant; the last measures memory")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (each: one step of every variant)")
    parser.add_argument("--mosld-variants", default=",".join(MOSLD_VARIANTS), help="comma list ('' for none)")
    parser.add_argument("--peer-variants", default=",".join(PEER_VARIANTS), help="comma list ('' for none)")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON, help="the peer environment's python")
    parser.add_argument(
        "--mosld-attn",
        default="eager",
        help="the project side's attention (eager: MoE-PEFT's only one off CUDA; sdpa: transformers' default)",
    )
    parser.add_argument(
        "--balance-loss", action="store_true", help="balancing loss on (coefficient 0.001) on both sides' mixtures"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu-peers.json")
    parser.add_argument("--markdown", type=Path, default=None, help="default: --out with .md")
    return parser.parse_args(argv)


def split(spec: str) -> list[str]:
    return [v for v in spec.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    gpu = args.device == "cuda"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    batch = args.batch or (4 if gpu else 2)
    seq = args.seq or (1024 if gpu else 256)
    base = args.base or ("embedded" if args.shape == "smollm2" else "random")
    variants = {"mosld": split(args.mosld_variants), "moe_peft": split(args.peer_variants)}
    if variants["moe_peft"] and not Path(args.peer_python).exists():
        raise SystemExit(f"{args.peer_python} is missing: run `bash bench/peers/setup_env.sh` first")

    with tempfile.TemporaryDirectory(prefix="mosld-peers-") as tmp:
        config, weights = prepare_base(args.shape, base, args.seed, Path(tmp))
        ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(args.seed))
        pythons = {"mosld": sys.executable, "moe_peft": args.peer_python}
        workers = {
            side: WorkerProcess(side, pythons[side], args.threads, args.device) for side in variants if variants[side]
        }
        try:
            results = run(args, workers, variants, config, weights, ids.tolist(), dtype)
        finally:
            for worker in workers.values():
                worker.close()
    results.update(
        command=" ".join(["python -m bench.peers.compare", *(argv if argv is not None else sys.argv[1:])]),
        shape=args.shape,
        base=base,
        batch=batch,
        seq=seq,
        dtype=dtype,
        threads=args.threads,
        device=args.device,
        rounds=args.rounds,
        warmup=args.warmup,
        mosld_attn=args.mosld_attn,
        balance_loss=args.balance_loss,
        seconds=round(time.monotonic() - start, 1),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    text = report.markdown(results)
    markdown = args.markdown or args.out.with_suffix(".md")
    markdown.write_text(text)
    print(text)
    log(f"wrote {args.out} and {markdown} after {results['seconds']:.0f} s")
    return 0


def run(
    args: argparse.Namespace,
    workers: dict[str, WorkerProcess],
    variants: dict[str, list[str]],
    config: dict,
    weights: str,
    ids: list[list[int]],
    dtype: str,
) -> dict:
    """Build, warm up and measure memory, then time the interleaved rounds; returns the results dict."""
    machine = {}
    for side, worker in workers.items():
        options = {"balance_loss": args.balance_loss}
        if side == "mosld":
            options["attn"] = args.mosld_attn
        machine[side] = worker(
            "init",
            threads=args.threads,
            device=args.device,
            dtype=dtype,
            config=config,
            weights=weights,
            seed=args.seed,
            **options,
        )
        worker("set_ids", ids=ids)
    entries: dict[str, dict] = {}
    live: list[tuple[str, str]] = []
    for side, worker in workers.items():
        for variant in variants[side]:
            key = f"{side}:{variant}"
            entry = entries[key] = {"side": side, "variant": variant, "step_times_ms": [], "forward_times_ms": []}
            try:
                entry.update(worker("build", variant=variant))
                entry["memory"] = worker("warmup", variant=variant, steps=max(1, args.warmup))
                live.append((side, variant))
                log(f"built and warmed up {key}: {entry['trainable']:,} trainable")
            except WorkerError as err:
                entry["error"] = str(err)
                log(f"FAILED {key}: {err}")
    for rnd in range(args.rounds):
        shift = rnd % max(1, len(live))
        order = live[shift:] + live[:shift]
        for phase, field in (("step", "step_times_ms"), ("forward", "forward_times_ms")):
            for side, variant in order:
                key = f"{side}:{variant}"
                if "error" in entries[key]:
                    continue
                try:
                    entries[key][field].append(round(1e3 * workers[side](phase, variant=variant)["time"], 3))
                except WorkerError as err:
                    entries[key]["error"] = f"round {rnd}: {err}"
                    log(f"FAILED {key}: {err}")
        medians = {k: round(statistics.median(e["step_times_ms"])) for k, e in entries.items() if e["step_times_ms"]}
        log(f"round {rnd + 1}/{args.rounds}: median step ms so far {medians}")
    summarise(entries)
    return {"machine": machine, "config": config, "variants": entries, "pairs": pairs(entries)}


def summarise(entries: dict[str, dict]) -> None:
    """Medians, IQR, and each variant's own cost: its time minus its side's floor in the same round."""
    for entry in entries.values():
        for name in ("step", "forward"):
            values = entry[f"{name}_times_ms"]
            if values:
                entry[f"{name}_ms"] = statistics.median(values)
                entry[f"{name}_ms_iqr"] = 1e3 * iqr([v / 1e3 for v in values])
        floor = entries.get(f"{entry['side']}:floor")
        if floor and entry["variant"] != "floor" and entry["step_times_ms"] and floor["step_times_ms"]:
            own = [a - b for a, b in zip(entry["step_times_ms"], floor["step_times_ms"], strict=False)]
            entry["adapter_ms"] = statistics.median(own)


def pairs(entries: dict[str, dict]) -> list[dict]:
    """mosld / peer ratios of every matched pair both sides ran."""
    out = []
    for ours, theirs in PAIRS:
        a, b = entries.get(f"mosld:{ours}"), entries.get(f"moe_peft:{theirs}")
        if not a or not b or not a.get("step_times_ms") or not b.get("step_times_ms"):
            continue
        pair: dict = {"mosld": ours, "moe_peft": theirs}
        for name in ("step", "forward"):
            field = f"{name}_times_ms"
            per_round = [x / y for x, y in zip(a[field], b[field], strict=False) if y > 0]
            if per_round:
                pair[name] = {
                    "ratio_of_medians": statistics.median(a[field]) / statistics.median(b[field]),
                    "paired_median": statistics.median(per_round),
                    "paired_min": min(per_round),
                    "paired_max": max(per_round),
                    "per_round": [round(r, 4) for r in per_round],
                }
        for key in ("peak", "saved"):
            x, y = a.get("memory", {}).get(key), b.get("memory", {}).get(key)
            if x and y:
                pair[f"{key}_ratio"] = x / y
        if a.get("adapter_ms") is not None and b.get("adapter_ms"):
            pair["adapter_ratio"] = a["adapter_ms"] / b["adapter_ms"]
        out.append(pair)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
