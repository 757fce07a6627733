"""The training application through its real entry point: configs, resume, checkpoints, logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import DEFAULT_CONFIG, REPO, tiny_model, tiny_run_args
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from mosld.adapters.layer import is_adapter_parameter
from mosld.training.cli import main

CONFIGS = REPO / "configs"
PAPER = CONFIGS / "paper"
DEFAULT = DEFAULT_CONFIG


def print_config(capsys, *configs: Path) -> str:
    """The resolved config the CLI prints for ``fit --config A --config B ...``."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(arg for path in configs for arg in ("--config", str(path))), "--print_config"])
    assert exit_info.value.code in (0, None), configs
    return capsys.readouterr().out


def test_every_shipped_config_parses(capsys):
    """Configs never rot: each YAML goes through the CLI parser, presets on top of the default and
    paper methods on top of the paper base (protocols are checked in test_experiments)."""
    configs = sorted(p for p in CONFIGS.rglob("*.yaml") if "experiments" not in p.parts)
    assert len(configs) >= 10
    for path in configs:
        stack = {"presets": [DEFAULT], "paper": [PAPER / "base.yaml"]}.get(path.parent.name, [])
        printed = print_config(capsys, *stack, path)
        assert "adapter:" in printed and "tasks:" in printed, path


def contains(resolved: object, expected: object, where: str = "") -> list[str]:
    """Settings of ``expected`` that ``resolved`` lacks or sets otherwise (``resolved`` may have more keys).

    Our own callbacks are compared by class path and shared init arguments: their defaults are not
    set by the paper files and may grow new options.
    """
    if isinstance(expected, dict) and isinstance(resolved, dict):
        if str(expected.get("class_path", "")).startswith("mosld."):
            ours, theirs = expected.get("init_args") or {}, resolved.get("init_args") or {}
            expected = {
                "class_path": expected["class_path"],
                "init_args": {k: ours[k] for k in set(ours) & set(theirs)},
            }
            resolved = {"class_path": resolved.get("class_path"), "init_args": theirs}
        return [d for k in expected for d in contains(resolved.get(k), expected[k], f"{where}.{k}")]
    if isinstance(expected, list) and isinstance(resolved, list) and len(expected) == len(resolved):
        return [
            d for i, (r, e) in enumerate(zip(resolved, expected, strict=True)) for d in contains(r, e, f"{where}[{i}]")
        ]
    return [] if resolved == expected else [f"{where}: {resolved!r} instead of {expected!r}"]


@pytest.mark.parametrize("method", ["lora", "mola", "mosl", "mosld", "share_b"])
def test_paper_base_plus_method_equals_the_config_of_the_former_single_file(method, capsys):
    """tests/data/paper_configs/ holds each method's resolved config from before the split."""
    resolved = yaml.safe_load(print_config(capsys, PAPER / "base.yaml", PAPER / f"{method}.yaml"))
    expected = yaml.safe_load((REPO / "tests" / "data" / "paper_configs" / f"{method}.yaml").read_text())
    assert contains(resolved, expected) == []


@pytest.mark.parametrize(
    "override,message",
    [
        (["--model.adapter.method", "moe"], 'Parser key "method"'),
        (["--model.adapter.top_k", "9"], "model.adapter.top_k: 9 is more than"),
        (["--data.tasks", "[arc_easy, no_such_task]"], "data.tasks: 'no_such_task' is neither a known task"),
    ],
)
def test_bad_config_is_refused_before_any_model_loads(override, message, capsys, tmp_path):
    # The base model path does not exist: reaching model loading would fail with another message.
    args = ["fit", "--config", DEFAULT, "--model.model_name_or_path", str(tmp_path / "absent"), *override]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert message in err
    assert ("data.tasks" if "data.tasks" in message else "model.adapter") in err


@pytest.mark.slow
def test_fit_logs_exports_checkpoints_adapters_only_and_resumes(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = main(tiny_run_args(tiny_model_dir, tmp_path, "--trainer.max_steps", "3"))
    assert cli.trainer.global_step == 3
    run = Path(cli.trainer.log_dir)
    assert (run / "config.yaml").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    # TensorBoard holds router summaries, expert load (figures) and per-task accuracy (before and after);
    # no per-layer or per-expert scalars unless asked for.
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()["scalars"]
    task = "example_task"
    for prefix in ("router", "val_router"):
        assert {f"{prefix}/entropy", f"{prefix}/load_max", f"{prefix}/load_min"} <= set(tags)
    assert not [t for t in tags if t.startswith(("router/load/", "router/entropy/", "val_router/load/"))]
    assert f"val/{task}/acc" in tags and "val/acc_avg" in tags and "val/answer_loss" in tags
    assert [e.step for e in events.Scalars("val/answer_loss")] == [0, 3]  # before training, at the end
    assert "val_router/load_heatmap" in events.Tags()["images"]

    # The checkpoint holds adapter tensors and optimizer state only.
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 3
    assert checkpoint["state_dict"] and all(is_adapter_parameter(k) for k in checkpoint["state_dict"])
    adapter_numel = sum(v.numel() for v in checkpoint["state_dict"].values())
    base_numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert adapter_numel < base_numel / 2
    # ~ adapter + two Adam moments, in fp32, plus a little metadata
    assert last.stat().st_size < 3 * 4 * adapter_numel + 200_000

    resumed = main(tiny_run_args(tiny_model_dir, tmp_path, "--trainer.max_steps", "5", "--ckpt_path", str(last)))
    assert resumed.trainer.global_step == 5
    after = torch.load(Path(resumed.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert after["global_step"] == 5
    assert after["lr_schedulers"][0]["last_epoch"] == 5  # the schedule continued, not restarted
    changed = [k for k in after["state_dict"] if not torch.equal(after["state_dict"][k], checkpoint["state_dict"][k])]
    assert changed

    # predict answers a JSONL file of questions (labels optional) with the trained adapter.
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        '{"question": "Which animal says moo?", "choices": ["cow", "cat", "duck"], "label": 0}\n'
        '{"question": "What color is a clear sky?", "choices": ["green", "blue"]}\n'
    )
    predict_args = [a if a != "fit" else "predict" for a in tiny_run_args(tiny_model_dir, tmp_path)]
    predicted = main([*predict_args, "--ckpt_path", str(last), "--data.predict_file", str(questions)])
    rows = [
        json.loads(line) for line in (Path(predicted.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 and rows[0]["label"] == 0 and "label" not in rows[1]
    assert [len(r["logprob"]) for r in rows] == [3, 2]
    for row in rows:
        assert row["prediction"] == max(range(len(row["logprob"])), key=row["logprob_per_char"].__getitem__)


class BatchRecorder(Callback):
    """Keeps the input ids of every training batch, keyed by the optimizer step it trains."""

    def __init__(self) -> None:
        self.batches: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches[trainer.global_step] = batch["input_ids"].clone()


def recorded(cli) -> dict[int, torch.Tensor]:
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == "BatchRecorder").batches


@pytest.mark.slow
def test_resume_mid_epoch_continues_the_epoch_where_the_checkpoint_left_off(tiny_model_dir, tmp_path):
    # 40 samples per epoch in batches of 4: 10 batches an epoch. A 7-step run saves a checkpoint after
    # step 3 (as a preempted job would have); resuming from it must train steps 3-6 on the same batches.
    recorder = ["--trainer.callbacks+=test_training.BatchRecorder", "--data.max_eval_examples", "1"]
    every_3 = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_top_k=-1",
        f"--trainer.callbacks.dirpath={tmp_path / 'every_3'}",
    ]
    whole = main(tiny_run_args(tiny_model_dir, tmp_path, "--trainer.max_steps", "7", *recorder, *every_3))
    mid_epoch = tmp_path / "every_3" / "epoch=0-step=3.ckpt"
    assert mid_epoch.is_file(), sorted(p.name for p in (tmp_path / "every_3").iterdir())
    resumed = main(
        tiny_run_args(tiny_model_dir, tmp_path, "--trainer.max_steps", "7", *recorder, "--ckpt_path", str(mid_epoch))
    )
    expected, after = recorded(whole), recorded(resumed)
    assert sorted(expected) == list(range(7)) and sorted(after) == [3, 4, 5, 6]
    for step, batch in after.items():
        assert torch.equal(batch, expected[step]), f"step {step} trained on a different batch after resuming"


def test_loss_from_answer_position_logits_equals_the_models_own_loss_and_gradients():
    from types import SimpleNamespace

    import mosld
    from mosld.data.datamodule import TrainCollator
    from mosld.training.module import answer_logits_loss

    model = mosld.inject_adapters(
        tiny_model("llama"), mosld.AdapterConfig(method="mosld", num_experts=4, target_modules=("q_proj", "v_proj"))
    )
    for layer in mosld.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    rows = [  # (ids, labels): prompts masked with -100, answers of different lengths, then padding
        ([5, 6, 7, 8, 9, 10], [-100, -100, -100, -100, 9, 10]),
        ([11, 12, 13], [-100, -100, 13]),
        ([14, 15, 16, 17, 18, 19, 20, 21], [-100, -100, -100, 17, 18, 19, 20, 21]),
    ]
    batch = TrainCollator(pad_id=0)([(ids, labels, 0) for ids, labels in rows])

    sliced = answer_logits_loss(model, batch)
    grads_sliced = torch.autograd.grad(sliced, [p for p in model.parameters() if p.requires_grad])
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    grads_full = torch.autograd.grad(full, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(sliced, full.float(), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_sliced, grads_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)

    class FullLogitsOnly(torch.nn.Module):  # a model that ignores a 2-D logits_to_keep
        def forward(self, input_ids, attention_mask, logits_to_keep=0):
            return SimpleNamespace(logits=model(input_ids=input_ids, attention_mask=attention_mask).logits)

    torch.testing.assert_close(answer_logits_loss(FullLogitsOnly(), batch), full.float(), rtol=1e-6, atol=1e-6)
