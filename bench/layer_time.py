"""What the adapter itself costs: forward + backward of the adapted projections of one decoder layer.

``bench.step_time`` times whole training steps, where the frozen model dominates on small
shapes (on the CPU SmolLM2 shape q/v adapters are a few per cent of a step), so step ratios
cannot separate adapter implementations. This script times only the target projections of one
decoder layer of the same shape, for every variant, round-robin in one process:

- ``floor``: the frozen projections alone (input gradient only), what any adapter adds to;
- peft LoRA r = 8 (dropout 0 and 0.05), mosld ``lora`` / ``mosld``, the loop-over-experts reference.

It reports the median time per call (forward + backward of all target projections), the
adapter's own cost (that minus the floor, paired per round), the number of ATen operators
one call dispatches (forward + backward; on a GPU each is at least one kernel launch, so this
is what an eager, launch-bound step pays per adapted layer), and ratios. The layer shape,
experts and top-k are those of the shape's first decoder layer (SmolLM2: 8 experts, top-2).

Examples::

    python -m bench.layer_time                       # CPU, SmolLM2 shape, q/v
    python -m bench.layer_time --shape llama2k       # all seven projections of the Llama shape
    python -m bench.layer_time --device cuda --shape llama2k --tokens 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.report import machine_info
from bench.runner import sync
from bench.variants import SHAPES, apply_variant, build_base

LAYER_VARIANTS = ("floor", "peft_d0", "peft_d05", "lora", "mosld", "loop_mosld")
LABELS = {
    "floor": "frozen projections only (floor)",
    "peft_d0": "peft LoRA r=8, dropout 0",
    "peft_d05": "peft LoRA r=8, dropout 0.05",
    "lora": "mosld `lora`",
    "mosld": "mosld `mosld`",
    "loop_mosld": "loop-over-experts MoSLD (reference)",
}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active (forward and, on a CPU, backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def projections(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """The target projections of decoder layer 0, in ``targets`` order (adapted or not)."""
    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[-1] in targets and "0" in parts and parts[-1] not in found:
            found[parts[-1]] = module
    return [(t, found[t]) for t in targets if t in found]


def make_call(model: nn.Module, shape_config: dict, targets: tuple[str, ...], tokens: int, device, dtype):
    """A closure running forward + backward of the layer-0 projections on fixed random inputs."""
    gen = torch.Generator().manual_seed(1)
    hidden, inter = shape_config["hidden_size"], shape_config["intermediate_size"]
    inputs = {d: torch.randn(tokens, d, generator=gen).to(device, dtype).requires_grad_() for d in {hidden, inter}}
    mods = projections(model, targets)
    grads = {}
    with torch.no_grad():
        for name, mod in mods:
            d_in = inter if name == "down_proj" else hidden
            out = mod(inputs[d_in])
            grads[name] = torch.randn(out.shape, generator=gen).to(device, out.dtype)
    params = [p for p in model.parameters() if p.requires_grad]

    def call() -> None:
        outs = [mod(inputs[inter if name == "down_proj" else hidden]) for name, mod in mods]
        torch.autograd.backward(outs, [grads[name] for name, _ in mods])
        for t in list(inputs.values()) + params:
            t.grad = None

    return call


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("smollm2", "llama2k", "tiny"), default="smollm2")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per call (cpu 512, cuda 4096)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=None, help="timed calls per variant per round (cpu 5, cuda 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.tokens or (4096 if device.type == "cuda" else 512)
    calls = args.calls or (20 if device.type == "cuda" else 5)
    base_shape = SHAPES[args.shape]
    experts = base_shape.experts if isinstance(base_shape.experts, int) else base_shape.experts[0]
    shape = dataclasses.replace(base_shape, config={**base_shape.config, "num_hidden_layers": 1}, experts=experts)
    targets = shape.targets

    runners = {}
    for variant in LAYER_VARIANTS:
        model = apply_variant(build_base(shape, device, dtype, seed=0), variant, shape, targets)
        call = make_call(model, shape.config, targets, tokens, device, dtype)
        for _ in range(3):
            call()
        counter = OpCounter()
        with counter:
            call()
        trainable = sum(p.numel() for _, m in projections(model, targets) for p in m.parameters() if p.requires_grad)
        runners[variant] = dict(call=call, trainable=trainable, ops=sum(counter.ops.values()), times=[])
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    order = list(runners.values())
    for round_index in range(args.rounds):
        shift = round_index % len(order)  # rotate the order so load drifts hit every variant alike
        for runner in order[shift:] + order[:shift]:
            sync(device)
            start = clock()
            for _ in range(calls):
                runner["call"]()
            sync(device)
            runner["times"].append((clock() - start) / calls * 1e3)

    floor = runners["floor"]["times"]
    rows = {}
    for variant, runner in runners.items():
        times = runner["times"]
        cost = [t - f for t, f in zip(times, floor, strict=True)]
        rows[variant] = dict(
            label=LABELS[variant],
            ms=statistics.median(times),
            adapter_ms=statistics.median(cost),
            ops=runner["ops"],
            trainable=runner["trainable"],
        )
    ref = rows["peft_d0"]
    for row in rows.values():
        row["x_peft_d0"] = row["ms"] / ref["ms"]
        row["adapter_x_peft_d0"] = row["adapter_ms"] / ref["adapter_ms"] if ref["adapter_ms"] > 0 else None
    loop, ours = rows["loop_mosld"], rows["mosld"]
    summary = dict(
        loop_over_mosld_time=loop["ms"] / ours["ms"],
        loop_over_mosld_adapter_cost=loop["adapter_ms"] / ours["adapter_ms"] if ours["adapter_ms"] > 0 else None,
        mosld_over_peft_d0_adapter_cost=ours["adapter_x_peft_d0"],
    )
    header = (
        f"### {args.shape}: adapted projections of one decoder layer ({', '.join(targets)}), "
        f"{device.type}, {str(dtype).removeprefix('torch.')}, {tokens} tokens, forward + backward, "
        f"{experts} experts top-2, median of {args.rounds} rounds x {calls} calls"
    )
    lines = [
        header,
        "",
        "| variant | trainable | ms per call | adapter ms (minus floor) | ATen ops per call | time x peft d0 | adapter cost x peft d0 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        adapter_ratio = "—" if row["adapter_x_peft_d0"] is None else f"{row['adapter_x_peft_d0']:.2f}"
        lines.append(
            f"| {row['label']} | {row['trainable']:,} | {row['ms']:.3f} | {row['adapter_ms']:.3f} | {row['ops']} "
            f"| {row['x_peft_d0']:.2f} | {adapter_ratio} |"
        )
    lines += [
        "",
        f"loop / mosld: {summary['loop_over_mosld_time']:.2f}x the time per call, "
        f"{summary['loop_over_mosld_adapter_cost']:.2f}x the adapter's own cost; "
        f"mosld / peft d0 adapter cost: {summary['mosld_over_peft_d0_adapter_cost']:.2f}",
    ]
    machine = machine_info(device)
    lines.append(f"\nMachine: {machine['summary']}")
    print("\n".join(lines))
    result = dict(shape=args.shape, device=device.type, tokens=tokens, rows=rows, summary=summary, machine=machine)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
