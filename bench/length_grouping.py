#!/usr/bin/env python
"""Padding and training throughput with and without length-grouped batches, on the default run's data.

The default run (``configs/mosld.yaml``: the six paper tasks mixed at T = 2, 960 sampled sequences in
batches of 8, max_length 256) is batched twice: in the sampler's order (``length_group_batches=1``) and
length-grouped (pools of 16 batches sorted by length, the default). For each, the whole epoch's padding
fraction (padded positions that hold no token) is counted, and forward + backward of the embedded
SmolLM2-135M with MoSLD (the precision `auto` picks, answer-position logits as in training) is timed on batches drawn
evenly from the epoch, alternating between the two orders, to give real training tokens per second.

Example::

    python -m bench.length_grouping --data-dir ../shared/data --batches 12
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mosld
from mosld.data import MultiTaskDataModule
from mosld.data.tasks import PAPER_TASKS
from mosld.models import load_base_model
from mosld.training.module import answer_logits_loss
from mosld.training.precision import choose_precision


def epoch_batches(data_dir: str | None, group_batches: int) -> list[dict]:
    data = MultiTaskDataModule(
        tasks=list(PAPER_TASKS), data_dir=data_dir, batch_size=8, max_length=256, temperature=2.0,
        num_samples_per_epoch=960, length_group_batches=group_batches,
    )  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    return list(data.train_dataloader())


def padding(batches: list[dict]) -> tuple[float, int, int]:
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    positions = sum(b["attention_mask"].numel() for b in batches)
    return 1 - tokens / positions, tokens, positions


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batches", type=int, default=12, help="timed batches of each order")
    args = parser.parse_args(argv)
    precision = choose_precision("cpu").precision  # as the default run (trainer.precision auto) computes

    orders = {"sampled order": epoch_batches(args.data_dir, 1), "length-grouped": epoch_batches(args.data_dir, 16)}
    result = {}
    for name, batches in orders.items():
        frac, tokens, positions = padding(batches)
        result[name] = {"padding_fraction": frac, "tokens": tokens, "positions": positions, "seconds": []}
        print(f"{name:>15}: {len(batches)} batches, {tokens:,} tokens in {positions:,} positions, padding {frac:.1%}")

    model = mosld.inject_adapters(load_base_model("embedded:smollm2-135m"), mosld.AdapterConfig()).train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: dict) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = answer_logits_loss(model, batch)
        torch.autograd.grad(loss, params)
        return time.perf_counter() - start

    step(orders["sampled order"][0])  # warm-up
    for k in range(args.batches):
        for name, batches in orders.items():  # the same share of each epoch, alternating
            batch = batches[(k * len(batches)) // args.batches]
            result[name]["seconds"].append(step(batch))
            result[name].setdefault("timed_tokens", 0)
            result[name]["timed_tokens"] += int(batch["attention_mask"].sum())
    for name, r in result.items():
        r["tokens_per_second"] = r["timed_tokens"] / sum(r["seconds"])
        r["epoch_seconds_estimate"] = r["tokens"] / r["tokens_per_second"]
        print(f"{name:>15}: median step {statistics.median(r['seconds']):.2f} s, {r['tokens_per_second']:.0f} tokens/s")
    ratio = result["length-grouped"]["tokens_per_second"] / result["sampled order"]["tokens_per_second"]
    print(f"tokens/s grouped / sampled order: {ratio:.2f} (threads {torch.get_num_threads()})")
    return result


if __name__ == "__main__":
    main()
