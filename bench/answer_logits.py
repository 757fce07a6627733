"""Training-step time with logits at the answer positions only vs at every position.

The training module asks the model for logits only where the loss is (the positions that predict
answer tokens; ``mosld.training.module.answer_logits_loss``). This times forward + backward of the
default run's setting (embedded SmolLM2-135M, MoSLD on q/v, the six paper tasks mixed at T = 2,
batches of 8, max_length 256, the precision `trainer.precision auto` picks on this CPU) both ways on the same batches, alternating,
and reports medians and their ratio. Needs the benchmark data (``--data-dir`` or ``$MOSLD_DATA_DIR``).

Example::

    python -m bench.answer_logits --data-dir ../shared/data --batches 12
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.default_run import default_run_batches, default_run_model, timed_step
from mosld.training.module import answer_logits_loss
from mosld.training.precision import choose_precision


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batches", type=int, default=12, help="timed batches (each timed both ways)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args(argv)
    precision = choose_precision("cpu").precision  # as the default run (trainer.precision auto) computes

    batches = default_run_batches(args.batches + 1, args.data_dir, args.batch_size, args.max_length)
    model, params = default_run_model()

    def full(batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def answers_only(batch: dict) -> torch.Tensor:
        return answer_logits_loss(model, batch)

    times: dict[str, list[float]] = {"every position": [], "answer positions": []}
    losses: dict[str, list[float]] = {k: [] for k in times}
    for i, batch in enumerate(batches):
        order = [("every position", full), ("answer positions", answers_only)]
        for name, loss_fn in order if i % 2 else order[::-1]:
            elapsed, loss = timed_step(loss_fn, batch, params, bf16=precision == "bf16-mixed")
            if i > 0:  # the first batch warms up
                times[name].append(elapsed)
                losses[name].append(loss)
    kept = [int((b["labels"] != -100).sum()) for b in batches[1:]]
    positions = [b["input_ids"].numel() for b in batches[1:]]
    every, answers = (statistics.median(times[k]) for k in times)
    result = {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_answer_over_every": answers / every,
        "paired_ratio_median": statistics.median(
            a / e for a, e in zip(times["answer positions"], times["every position"], strict=True)
        ),
        "max_loss_difference": max(
            abs(a - e) for a, e in zip(losses["answer positions"], losses["every position"], strict=True)
        ),
        "answer_tokens_share": sum(kept) / sum(positions),
        "threads": torch.get_num_threads(),
    }
    print(
        f"forward + backward, {args.batches} batches of {args.batch_size} x <= {args.max_length} tokens, "
        f"{torch.get_num_threads()} threads, {precision}:\n"
        f"  logits at every position:     {every:.2f} s (median)\n"
        f"  logits at answer positions:   {answers:.2f} s (median)\n"
        f"  ratio {result['ratio_answer_over_every']:.3f} (paired median {result['paired_ratio_median']:.3f}); "
        f"answer tokens are {100 * result['answer_tokens_share']:.1f}% of the padded positions; "
        f"largest loss difference {result['max_loss_difference']:.2e}"
    )
    return result


if __name__ == "__main__":
    main()
