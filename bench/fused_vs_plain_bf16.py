"""The removed fused layer (commit a4586b7) against the plain layer, trained side by side on SmolLM2.

Both layers wrap the same model, start from the same weights and see the default run's first
training batches with the same seeds; prints each step's loss and how far the adapters end apart,
in fp32 and in bf16 autocast (the default run's precision). Run from the repository root:

    mkdir -p /tmp/old && git show a4586b7:mosld/adapters/layer.py > /tmp/old/old_layer.py
    MOSLD_DATA_DIR=../shared/data python bench/fused_vs_plain_bf16.py 12
"""

from __future__ import annotations

import copy
import itertools
import sys
import time

import torch

from mosld import AdapterConfig, MoSLDLinear, inject_adapters
from mosld.data.datamodule import MultiTaskDataModule
from mosld.models import load_base_model
from mosld.training.module import answer_logits_loss

sys.path.insert(0, "/tmp/old")
import old_layer  # noqa: E402  (the old layer file, taken from git as above)

TASKS = ["openbookqa", "commonsense_qa", "race", "mctest", "arc_easy", "arc_challenge"]


def with_old_layers(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose adapter layers are the old class, with the same tensors."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoSLDLinear):
                old = old_layer.MoSLDLinear(
                    child.base_layer, r=child.r, alpha=child.scaling * child.r, num_experts=child.num_experts,
                    top_k=child.top_k, share=child.share, shared_dropout=child.shared_dropout,
                )  # fmt: skip
                old.load_state_dict(child.state_dict())
                setattr(parent, name, old)
    return model


def train(model: torch.nn.Module, batches: list[dict], bf16: bool) -> tuple[list[float], torch.Tensor]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    losses = []
    for step, batch in enumerate(batches):
        torch.manual_seed(100 + step)  # the same DropConnect masks for both layers
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = answer_logits_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, torch.cat([p.detach().flatten() for p in params])


def default_run_start(steps: int) -> tuple[list[dict], torch.nn.Module]:
    """The default run's first ``steps`` training batches (sampled order) and SmolLM2 with fresh MoSLD layers."""
    data = MultiTaskDataModule(
        tasks=TASKS, model_name_or_path="embedded:smollm2-135m", batch_size=8, num_samples_per_epoch=960,
        max_length=256, length_group_batches=1, seed=0,
    )  # fmt: skip
    data.setup("fit")
    batches = list(itertools.islice(data.train_dataloader(), steps))
    torch.manual_seed(0)
    config = AdapterConfig(method="mosld", r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    return batches, inject_adapters(load_base_model("embedded:smollm2-135m"), config)


def main(steps: int) -> None:
    torch.set_num_threads(1)
    batches, new = default_run_start(steps)
    old = with_old_layers(new)
    for bf16 in (False, True):
        started = time.perf_counter()
        (loss_old, weights_old), (loss_new, weights_new) = (train(copy.deepcopy(m), batches, bf16) for m in (old, new))
        print(f"{'bf16-mixed' if bf16 else 'fp32'} ({time.perf_counter() - started:.0f} s)")
        print("  old   " + " ".join(f"{v:.6f}" for v in loss_old))
        print("  plain " + " ".join(f"{v:.6f}" for v in loss_new))
        gap = max(abs(a - b) for a, b in zip(loss_old, loss_new, strict=True))
        rel = ((weights_old - weights_new).norm() / weights_old.norm()).item()
        print(
            f"  largest loss difference {gap:.2e}; adapter weights after {steps} steps: relative difference {rel:.2e}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
