"""How far bf16 training moves with the number of CPU threads, for the removed fused layer and the plain one.

Trains the default run's first training batches (SmolLM2, MoSLD q/v, same weights, same DropConnect
seeds) four ways in bf16 autocast: the old fused layer (commit a4586b7) and the plain layer, each with
1 and with 2 torch threads, and, as a control, the plain layer in fp32 with 1 and 2 threads. Prints each
step's loss and the relative distance of the adapters after the last step, so that the old-vs-plain gap
can be read against the gap one layer shows with itself when only the thread count changes. Run from the
repository root:

    mkdir -p /tmp/old && git show a4586b7:mosld/adapters/layer.py > /tmp/old/old_layer.py
    MOSLD_DATA_DIR=../shared/data python bench/bf16_threads.py 12
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import time
from pathlib import Path

import torch

# The training loop and the old-layer swap of the fused-vs-plain comparison beside this file.
_spec = importlib.util.spec_from_file_location("fused_vs_plain", Path(__file__).with_name("fused_vs_plain_bf16.py"))
fused_vs_plain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fused_vs_plain)


def main(steps: int) -> None:
    batches, plain = fused_vs_plain.default_run_start(steps)
    layers = {"old": fused_vs_plain.with_old_layers(plain), "plain": plain}
    runs = [("old", True), ("plain", True), ("plain", False)]
    results = {}
    for name, bf16 in runs:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            started = time.perf_counter()
            results[name, bf16, threads] = fused_vs_plain.train(copy.deepcopy(layers[name]), batches, bf16)
            label = f"{name} {'bf16' if bf16 else 'fp32'} {threads} thread(s)"
            losses = " ".join(f"{v:.6f}" for v in results[name, bf16, threads][0])
            print(f"{label:<24} ({time.perf_counter() - started:4.0f} s) {losses}", flush=True)

    def gap(a: tuple, b: tuple) -> str:
        (loss_a, weights_a), (loss_b, weights_b) = results[a], results[b]
        loss_gap = max(abs(x - y) for x, y in zip(loss_a, loss_b, strict=True))
        rel = ((weights_a - weights_b).norm() / weights_a.norm()).item()
        return f"largest loss difference {loss_gap:.2e}, adapter weights relative difference {rel:.2e}"

    print(f"\nafter {steps} steps:")
    print(f"  old bf16, 1 vs 2 threads:   {gap(('old', True, 1), ('old', True, 2))}")
    print(f"  plain bf16, 1 vs 2 threads: {gap(('plain', True, 1), ('plain', True, 2))}")
    print(f"  old vs plain bf16, 1 thread:  {gap(('old', True, 1), ('plain', True, 1))}")
    print(f"  old vs plain bf16, 2 threads: {gap(('old', True, 2), ('plain', True, 2))}")
    print(f"  plain fp32, 1 vs 2 threads: {gap(('plain', False, 1), ('plain', False, 2))}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
