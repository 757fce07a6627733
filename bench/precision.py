"""Training-step time of the default run in fp32 and in bf16 autocast, side by side, and what ``auto`` picks.

The default run's setting (embedded SmolLM2-135M, MoSLD on q/v, the six paper tasks mixed at T = 2,
batches of 8, max_length 256, loss on the answer positions) on the same batches, alternating fp32 and
bf16 autocast, reporting medians and their ratio beside ``trainer.precision auto``'s choice on this
machine. To see a CPU without native bf16 on one that has it, cap oneDNN and ATen at AVX2::

    python -m bench.precision --data-dir ../shared/data --batches 8
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python -m bench.precision --data-dir ../shared/data --batches 3
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
    parser.add_argument("--batches", type=int, default=8, help="timed batches (each timed in both precisions)")
    args = parser.parse_args(argv)

    choice = choose_precision("cpu")
    batches = default_run_batches(args.batches + 1, args.data_dir)
    model, params = default_run_model()

    times: dict[str, list[float]] = {"32-true": [], "bf16-mixed": []}
    for i, batch in enumerate(batches):
        order = list(times) if i % 2 else list(times)[::-1]
        for precision in order:
            elapsed, _ = timed_step(lambda b: answer_logits_loss(model, b), batch, params, precision == "bf16-mixed")
            if i > 0:  # the first batch warms up
                times[precision].append(elapsed)
    fp32, bf16 = (statistics.median(times[k]) for k in times)
    result = {
        "median_s": {"32-true": fp32, "bf16-mixed": bf16},
        "bf16_over_fp32": bf16 / fp32,
        "auto": choice.precision,
        "auto_reason": choice.reason,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    print(
        f"forward + backward, {args.batches} default-run batches of 8 x <= 256 tokens, {torch.get_num_threads()} "
        f"threads, ATen capability {result['cpu_capability']}:\n"
        f"  fp32 (32-true):         {fp32:.2f} s (median)\n"
        f"  bf16 autocast:          {bf16:.2f} s (median)\n"
        f"  bf16 / fp32 = {bf16 / fp32:.2f}; trainer.precision auto -> {choice.precision} ({choice.reason})"
    )
    return result


if __name__ == "__main__":
    main()
