"""DDP on two CPU processes (gloo) against the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

SCRIPT = REPO / "tests" / "distributed_run.py"
# The FSDP test runs on 2 CPU processes (gloo) by default; MOSLD_TEST_ACCELERATOR=gpu runs it on
# the GPUs of the machine instead (NCCL), as the GPU check in bench/gpu_checks.sh does.
ACCELERATOR = os.environ.get("MOSLD_TEST_ACCELERATOR", "cpu")


def write_task(folder: Path, offset: int) -> str:
    """A small generic-format task: which of the numbers is the largest."""
    folder.mkdir(parents=True)
    for split, count in (("train", 48), ("validation", 11), ("test", 5)):
        with (folder / f"{split}.jsonl").open("w") as f:
            for i in range(count):
                numbers = [offset + i, offset + 2 * i + 1, offset + 3 * i + 2]
                f.write(json.dumps({"question": f"Which number is the largest? ({split} {i})",
                                    "choices": [str(n) for n in numbers], "label": 2}) + "\n")  # fmt: skip
    return str(folder)


def write_generation_task(folder: Path) -> str:
    """A small prompt/response task: repeat a number."""
    folder.mkdir(parents=True)
    for split, count in (("train", 48), ("validation", 11)):
        rows = [{"prompt": f"Repeat {i} ({split}).", "response": f"{i} {i}"} for i in range(count)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def run(
    tmp: Path, name: str, devices: int, model_dir: str, tasks: list[str], *extra: str, accelerator: str = "cpu"
) -> list[dict]:
    out = tmp / name
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--model", model_dir, "--tasks", *tasks, "--devices", str(devices),
           "--accelerator", accelerator, "--out", str(out), *extra]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_the_single_process_run(tiny_model_dir, tmp_path):
    # two multiple-choice tasks and a generation task, decoded greedily (4 tokens) and scored by token F1
    tasks = [write_task(tmp_path / "bigger_a", 0), write_task(tmp_path / "bigger_b", 100),
             write_generation_task(tmp_path / "repeat")]  # fmt: skip
    generation = ["--generation", json.dumps({"repeat": {"metric": "token_f1", "max_new_tokens": 4}})]
    single = run(tmp_path, "single", 1, tiny_model_dir, tasks, "--strategy", "auto", *generation)[0]
    ranks = run(tmp_path, "ddp", 2, tiny_model_dir, tasks, "--strategy", "ddp", *generation)

    # The ranks take equally long shards of the single-process epoch's draws, which together give them
    # back whole (length-grouped: each rank a slice of every global batch; draws may repeat an example).
    epoch = single["epoch0_indices"]
    shard0, shard1 = ranks[0]["epoch0_indices"], ranks[1]["epoch0_indices"]
    assert len(shard0) == len(shard1) == len(epoch) // 2 > 0
    assert sorted(shard0 + shard1) == sorted(epoch) and shard0 != shard1

    # Adapter weights are identical on both ranks after training, and training moved them.
    assert ranks[0]["adapters"].keys() == ranks[1]["adapters"].keys()
    for key, value in ranks[0]["adapters"].items():
        assert torch.equal(value, ranks[1]["adapters"][key]), key
    assert any(v.abs().sum() > 0 for k, v in ranks[0]["adapters"].items() if k.endswith("lora_B"))

    # Per-task accuracy reduced over ranks equals the single-process figure on the same items
    # (before training both runs are the base model).
    for key, value in single["val_before"].items():
        if key.endswith(("/acc", "/items", "acc_avg", "/token_f1", "score_avg")):
            assert ranks[0]["val_before"][key] == pytest.approx(value, abs=1e-12), key
            assert ranks[1]["val_before"][key] == ranks[0]["val_before"][key], key
    assert single["val_before"]["val/bigger_a/items"] == 11
    assert single["val_before"]["val/repeat/items"] == 5  # no test file: validation.jsonl tests, 10% of train validates
    assert "val/repeat/token_f1" in single["val_before"] and "val/repeat/token_f1" in ranks[0]["val_after"]

    # So do the per-task routing statistics (token-weighted over ranks), layer by layer.
    routing, routing_ddp = single["routing_before"], ranks[0]["routing_before"]
    # (the generation task's count every prompt and decoded token: the same tokens decoded in both runs)
    assert routing.keys() == routing_ddp.keys() == {"bigger_a", "bigger_b", "repeat"}
    for task, layers in routing.items():
        assert layers.keys() == routing_ddp[task].keys() and layers
        for layer, stats in layers.items():
            assert routing_ddp[task][layer]["tokens"] == stats["tokens"] > 0, (task, layer)
            for key in ("load", "mean_prob", "entropy"):
                assert routing_ddp[task][layer][key] == pytest.approx(stats[key], abs=1e-6), (task, layer, key)


def test_fsdp_strategy_refuses_a_single_process(tiny_model_dir, tmp_path):
    tasks = [write_task(tmp_path / "bigger_a", 0)]
    out = tmp_path / "one"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--model", tiny_model_dir, "--tasks", *tasks, "--devices", "1",
           "--strategy", "fsdp", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "AdapterFSDPStrategy needs at least 2 processes" in proc.stderr


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_resumes_and_exports_a_loadable_adapter(tiny_model_dir, tmp_path):
    """FSDP with gloo on CPU: adapters in their own units, full-state checkpoints, resume, export."""
    from safetensors.torch import load_file

    import mosld
    from mosld.models import load_base_model

    tasks = [write_task(tmp_path / "bigger_a", 0), write_task(tmp_path / "bigger_b", 100)]
    devices = 2 if ACCELERATOR == "cpu" else torch.cuda.device_count()
    if devices < 2:
        pytest.skip(f"FSDP needs 2 or more devices; {ACCELERATOR} has {devices}")
    fsdp = ("--strategy", "fsdp")
    first = run(tmp_path, "first", devices, tiny_model_dir, tasks, *fsdp, "--max_steps", "4", accelerator=ACCELERATOR)
    through = run(
        tmp_path, "through", devices, tiny_model_dir, tasks, *fsdp, "--max_steps", "8", accelerator=ACCELERATOR
    )
    ckpt = tmp_path / "first" / "last.ckpt"
    resumed = run(tmp_path, "resumed", devices, tiny_model_dir, tasks, *fsdp, "--max_steps", "8",
                  "--ckpt_path", str(ckpt), accelerator=ACCELERATOR)  # fmt: skip
    print("FSDP losses: first", first[0]["losses"], "through", through[0]["losses"], "resumed", resumed[0]["losses"])

    checkpoint = torch.load(ckpt, weights_only=False)
    assert checkpoint["global_step"] == 4
    assert checkpoint["state_dict"] and all(mosld.adapters.is_adapter_parameter(k) for k in checkpoint["state_dict"])
    assert resumed[0]["global_step"] == 8 and len(resumed[0]["losses"]) == 4
    # The first run's losses are the uninterrupted run's first four (same seed, same data).
    assert first[0]["losses"] == pytest.approx(through[0]["losses"][:4], abs=1e-6)
    # The resumed run picks up the curve where it was, far below the untrained loss. (A mid-epoch
    # resume draws the epoch's samples from its start again, so batches, not the level, differ.)
    start = through[0]["losses"][0]
    gap = start - through[0]["losses"][4]
    assert gap > 0.1, through[0]["losses"]
    assert abs(resumed[0]["losses"][0] - through[0]["losses"][4]) < gap / 2

    # The exported adapter is the checkpoint's adapter, and loads onto a plain base on one device.
    exported = load_file(tmp_path / "first" / "adapter" / "adapter_model.safetensors")
    assert {f"model.{k}" for k in exported} == set(checkpoint["state_dict"])
    for key, value in exported.items():
        assert torch.equal(value, checkpoint["state_dict"][f"model.{key}"]), key
    model = mosld.load_adapter(load_base_model(tiny_model_dir), tmp_path / "first" / "adapter")
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    print(f"FSDP ({ACCELERATOR}, {devices} device(s)): resumed at step 4, exported adapter loads on one device")
