"""Never lose a run, never accept nonsense: NaN, SIGTERM, resume overrides, early clear errors.

See docs/reliability.md for what each case is guaranteed. Runs use the tiny random Llama of
``conftest.tiny_model_dir`` and the example task, on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import EXAMPLE_TASK, REPO, tiny_model, tiny_run_args
from safetensors.torch import load_file

import mosld
from mosld.training.cli import main
from mosld.training.safety import PREEMPTED_EXIT_CODE


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"not valid JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def versions(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs").glob("version_*"))


# ---------------------------------------------------------------------------------------------- NaN


@pytest.mark.slow
def test_a_diverging_fit_stops_at_the_step_naming_the_cause_and_exports_no_adapter(tiny_model_dir, tmp_path, capsys):
    args = tiny_run_args(tiny_model_dir, tmp_path, "--trainer.max_steps", "10", "--model.learning_rate", "1e6")
    assert run_cli([*args, "--model.warmup", "0"]) == 1
    err = capsys.readouterr().err
    assert "error: training step " in err and ("the training loss is nan" in err or "gradients hold NaN" in err)
    assert "model.learning_rate = 1000000.0" in err and "no adapter was exported" in err
    assert "Traceback" not in err
    (run,) = versions(tmp_path)
    assert not (run / "adapter").exists()
    for file in run.rglob("*.json"):
        strict_json(file.read_text())


class LossOf(L.LightningModule):
    """A one-layer model whose loss is multiplied by ``scale`` from step ``at`` on."""

    def __init__(self, scale: float, at: int) -> None:
        super().__init__()
        self.layer, self.scale, self.at = torch.nn.Linear(4, 1), scale, at

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        return loss * self.scale if self.global_step >= self.at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_training_before_the_step_that_would_use_it(scale):
    from mosld.training.safety import FiniteGuard, NonFiniteError

    model = LossOf(scale, at=2)
    trainer = L.Trainer(max_steps=5, callbacks=[FiniteGuard()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with pytest.raises(NonFiniteError, match=rf"training step 3: the training loss is {scale}; training stopped"):
        trainer.fit(model, torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=2))
    assert trainer.global_step == 2 and all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_json_written_by_the_callbacks_is_valid_even_with_nan():
    from mosld.training.callbacks import json_safe

    history = [{"val/acc": 0.5, "val/answer_loss": float("nan"), "scores": [float("-inf"), 1.0]}]
    text = json.dumps(json_safe(history), allow_nan=False)
    assert strict_json(text) == [{"val/acc": 0.5, "val/answer_loss": None, "scores": [None, 1.0]}]


# ------------------------------------------------------------------------------------------ SIGTERM


class WaitForSigterm(L.Callback):
    """After training step ``at_step``, writes ``marker`` and waits (at most a minute) for a SIGTERM."""

    def __init__(self, at_step: int, marker: str) -> None:
        self.at_step, self.marker = at_step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.at_step:
            return
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resuming_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    steps = ["--trainer.max_steps", "7", "--data.max_eval_examples", "2"]
    whole = main(tiny_run_args(tiny_model_dir, tmp_path / "whole", *steps))
    expected = load_file(Path(whole.trainer.log_dir) / "adapter" / "adapter_model.safetensors")

    # A real process, killed from outside while it trains (after step 3 of 7).
    root, marker = tmp_path / "preempted", tmp_path / "marker"
    waiter = ["--trainer.callbacks+=test_robustness.WaitForSigterm", "--trainer.callbacks.at_step=3"]
    cmd = [sys.executable, str(REPO / "main.py"), *tiny_run_args(tiny_model_dir, root, *steps), *waiter]
    cmd.append(f"--trainer.callbacks.marker={marker}")
    # as many threads as this process: another count sums in another order, which is not bit-identical
    threads = str(torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": threads}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    (run,) = versions(root)
    checkpoint = run / "checkpoints" / "preempted.ckpt"
    assert checkpoint.is_file() and f"--ckpt_path {checkpoint}" in err
    assert f"--config {run / 'config.yaml'}" in err and "stopped after training step 3" in err
    assert not (run / "adapter").exists()  # a preempted run is not a finished one
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3

    resumed = main(tiny_run_args(tiny_model_dir, root, *steps, "--ckpt_path", str(checkpoint)))
    assert resumed.trainer.global_step == 7
    got = load_file(Path(resumed.trainer.log_dir) / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ after resuming, e.g. {different[:3]}"


# ------------------------------------------------------------------------------------- --ckpt_path


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A 2-step MoSLD run of the default config (its run folder)."""
    root = tmp_path_factory.mktemp("trained")
    cli = main(tiny_run_args(tiny_model_dir, root, "--trainer.max_steps", "2", "--data.max_eval_examples", "2"))
    return Path(cli.trainer.log_dir)


@pytest.mark.slow
def test_resuming_under_another_adapter_structure_is_refused_field_by_field(trained_run, tiny_model_dir, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    lora = ["--model.adapter.method=lora", "--model.adapter.r=4", "--model.adapter.target_modules=[q_proj]"]
    lora += ["--model.adapter.num_experts=1", "--model.adapter.top_k=1", "--model.adapter.share=null"]
    root = trained_run / "lora_resume"
    assert run_cli([*tiny_run_args(tiny_model_dir, root, *lora), "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    for line in (
        "model.adapter.method: checkpoint 'mosld', given 'lora'",
        "model.adapter.r: checkpoint 8, given 4",
        "model.adapter.num_experts: checkpoint [8, 6, 4, 2], given 1",
        "model.adapter.top_k: checkpoint 2, given 1",
        "model.adapter.share: checkpoint 'A', given None",
        "model.adapter.target_modules: checkpoint ['q_proj', 'v_proj'], given ['q_proj']",
    ):
        assert line in err, err
    assert "config.yaml" in err and "without --ckpt_path" in err  # what to do
    assert not root.exists()  # refused before anything was built

    other_base = [*tiny_run_args(tiny_model_dir, root), "--model.model_name_or_path", str(trained_run / "absent")]
    assert run_cli([*other_base, "--ckpt_path", str(ckpt)]) == 2
    assert "model.model_name_or_path: checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_resuming_with_another_batch_size_is_refused_before_anything_loads(trained_run, tiny_model_dir, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    root = trained_run / "batch_resume"
    assert run_cli([*tiny_run_args(tiny_model_dir, root, "--data.batch_size", "2"), "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"data.batch_size: {ckpt} was trained with batch size 4, the config gives 2" in err
    assert "--data.batch_size 4" in err and "Traceback" not in err
    assert not root.exists()


class RecordLearningRate(L.Callback):
    """The learning rate each training step runs with, by step."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.slow
def test_options_given_with_ckpt_path_take_effect_and_are_listed(trained_run, tiny_model_dir, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    root = trained_run / "resumed"
    overrides = ["--model.learning_rate", "0.123", "--model.adapter.shared_dropout", "0.5", "--trainer.max_steps", "4"]
    overrides += ["--data.max_eval_examples", "2", "--trainer.callbacks+=test_robustness.RecordLearningRate"]
    cli = main([*tiny_run_args(tiny_model_dir, root, *overrides), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert "model.learning_rate: checkpoint 0.001, given 0.123" in err
    assert "model.adapter.shared_dropout: checkpoint 0.1, given 0.5" in err
    assert cli.trainer.global_step == 4
    assert {layer.shared_dropout for layer in mosld.adapter_layers(cli.model.base).values()} == {0.5}
    (group,) = cli.trainer.optimizers[0].param_groups
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert group["initial_lr"] == 0.123 and scheduler.base_lrs == [0.123]
    # steps 2 and 3 run at the new peak rate on the new 4-step cosine (0.5 and ~0.15 of it), not at
    # the rate the 2-step checkpoint's schedule had reached (0)
    rates = next(c for c in cli.trainer.callbacks if isinstance(c, RecordLearningRate)).rates
    assert sorted(rates) == [2, 3]
    assert rates[2] == pytest.approx(0.123 * 0.5) and rates[3] == pytest.approx(0.123 * scheduler.lr_lambdas[0](3))
    after = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["hyper_parameters"]["learning_rate"] == 0.123


@pytest.mark.parametrize("content", [None, b"", b"not a checkpoint"])
def test_a_missing_or_unreadable_ckpt_path_is_refused_before_anything_loads(content, tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    if content is not None:
        ckpt.write_bytes(content)
    args = ["fit", "--config", str(REPO / "configs" / "mosld.yaml"), "--model.model_name_or_path", str(tmp_path / "x")]
    assert run_cli([*args, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"ckpt_path: {ckpt} is not " in err
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
def test_test_without_ckpt_path_says_it_evaluates_the_base_model_and_lists_the_checkpoints(trained_run, capsys):
    config = trained_run / "config.yaml"
    cli = main(["test", "--config", str(config), "--trainer.default_root_dir", str(trained_run / "tested")])
    err = capsys.readouterr().err
    assert "test: no --ckpt_path given: evaluating the untrained adapter, i.e. the base model" in err
    listed = next(line for line in err.splitlines() if line.startswith("checkpoints of this run: "))
    assert str(trained_run / "checkpoints" / "last.ckpt") in listed
    assert cli.trainer.global_step == 0


# ------------------------------------------------------------------------------- options, at once

DEFAULT_CONFIG = str(REPO / "configs" / "mosld.yaml")
KEY = 'Parser key "{}":\n  Not of type {} does not conform to restriction {}'
OPTIONAL = (
    'Parser key "{0}":\n  Does not validate against any of the Union subtypes\n'
    "  Subtypes: [<class 'jsonargparse.typing.{1}'>, <class 'NoneType'>]\n"
    "  Errors:\n    - Not of type {1}: does not conform to restriction {2}"
)


@pytest.mark.parametrize(
    "subcommand,override,message",
    [
        ("fit", ["--data.setting", "single"], "data.setting: 'single' trains on exactly one task"),
        # ranges are the options' types: jsonargparse names the option, the type and its restriction
        ("fit", ["--data.temperature", "0"], KEY.format("data.temperature", "PositiveFloat: 0", "v>0")),
        ("fit", ["--data.batch_size", "0"], KEY.format("data.batch_size", "PositiveInt: 0", "v>0")),
        ("fit", ["--data.eval_batch_size=-1"], KEY.format("data.eval_batch_size", "PositiveInt: -1", "v>0")),
        ("fit", ["--data.max_eval_examples", "0"], OPTIONAL.format("data.max_eval_examples", "PositiveInt", "v>0")),
        ("fit", ["--data.max_train_examples", "0"], OPTIONAL.format("data.max_train_examples", "PositiveInt", "v>0")),
        (
            "fit",
            ["--data.num_samples_per_epoch", "0"],
            OPTIONAL.format("data.num_samples_per_epoch", "PositiveInt", "v>0"),
        ),
        ("fit", ["--data.max_length", "4"], KEY.format("data.max_length", "TokenBudget: 4", "v>=8")),
        ("fit", ["--data.num_workers=-2"], KEY.format("data.num_workers", "NonNegativeInt: -2", "v>=0")),
        ("fit", ["--data.length_group_batches", "0"], KEY.format("data.length_group_batches", "PositiveInt: 0", "v>0")),
        ("fit", ["--data.eval_examples_by_task", "{arc_easy: 0}"], 'key "data.eval_examples_by_task"'),
        ("fit", ["--model.learning_rate=-1e-3"], KEY.format("model.learning_rate", "PositiveFloat: -1e-3", "v>0")),
        ("fit", ["--model.weight_decay=-1"], KEY.format("model.weight_decay", "NonNegativeFloat: -1", "v>=0")),
        ("fit", ["--model.warmup=-5"], KEY.format("model.warmup", "NonNegativeFloat: -5", "v>=0")),
        ("fit", ["--model.adapter.r", "0"], "model.adapter.r: expected an integer >= 1"),
        ("fit", ["--model.adapter.shared_dropout", "1.0"], "model.adapter.shared_dropout: expected a probability"),
        ("fit", ["--model.adapter.top_k", "3", "--model.adapter.num_experts", "2"], "model.adapter.top_k: 3 is more"),
        ("fit", ["--model.adapter.alpha", "0"], "model.adapter.alpha: expected a positive number"),
        ("fit", ["--model.adapter.adapter_dtype", "int8"], "model.adapter.adapter_dtype: expected one of"),
        ("fit", ["--data.tasks", "[]"], "data.tasks: expected at least one task"),
        ("predict", [], "data.predict_file: predict needs a JSONL file"),
        ("predict", ["--data.predict_file", "/nonexistent/q.jsonl"], "data.predict_file: /nonexistent/q.jsonl is not"),
    ],
)
def test_option_mistakes_are_one_usage_error_before_anything_loads(subcommand, override, message, tmp_path, capsys):
    # The base model does not exist: getting as far as loading it would fail with another message.
    args = [subcommand, "--config", DEFAULT_CONFIG, "--model.model_name_or_path", str(tmp_path / "absent")]
    assert run_cli([*args, "--trainer.default_root_dir", str(tmp_path), *override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err[-1500:]
    assert not (tmp_path / "lightning_logs").exists()


def test_target_modules_matching_nothing_are_refused_before_the_weights_load(tiny_model_dir, tmp_path, capsys):
    # the module names come from the model's config on the meta device
    args = ["fit", "--config", DEFAULT_CONFIG, "--model.model_name_or_path", tiny_model_dir]
    override = ["--model.adapter.target_modules", "[q_proj, attn_qkv]", "--trainer.default_root_dir", str(tmp_path)]
    assert run_cli([*args, *override]) == 2
    err = capsys.readouterr().err
    assert "model.adapter.target_modules: 'attn_qkv' matches no module of this LlamaForCausalLM" in err, err[-1500:]
    assert "q_proj" in err and "Traceback" not in err
    assert not (tmp_path / "lightning_logs").exists()


# ------------------------------------------------------------------------------------ data files


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"question": "Which animal says moo?", "choices": ["cow", "cat", "duck"], "label": 0}


@pytest.mark.parametrize(
    "choices",
    [["cow", "cat", "cow"], ["cow ", "cat", "cow"], [" cow", "cow\t", "duck"]],
    ids=["exact", "trailing-space", "both-padded"],
)
def test_duplicate_choices_are_refused_with_file_line_and_field(choices, tmp_path):
    from mosld.data import TaskDataError, load_task
    from mosld.data.tasks import load_predict_examples

    path = write_jsonl(tmp_path / "quiz" / "train.jsonl", [GOOD, {**GOOD, "choices": choices, "label": 2}])
    for load in (lambda: load_task(path, "train"), lambda: load_predict_examples(path)):
        with pytest.raises(TaskDataError) as err:
            load()
        assert f"{path}:2: field 'choices' holds" in str(err.value) and "more than once" in str(err.value)


def test_a_benchmark_item_with_a_repeated_choice_is_kept_with_a_warning(tmp_path, caplog):
    from mosld.data import load_task

    row = {"question": "Q?", "choices": {"text": ["a", "b", "a "], "label": ["A", "B", "C"]}, "answerKey": "C"}
    folder = tmp_path / "allenai__ai2_arc" / "ARC-Easy"
    for split in ("train", "validation", "test"):
        write_jsonl(
            folder / f"{split}.jsonl", [row, {**row, "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}}]
        )
    with caplog.at_level("WARNING"):
        examples = load_task("arc_easy", "test", tmp_path)
    assert len(examples) == 2  # as published, comparable with reported scores
    assert f"1 items repeat a choice (first at {folder / 'test.jsonl'}:1)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert len(load_task("arc_easy", "test", tmp_path)) == 2  # read again: kept again, not said again
    assert "repeat a choice" not in caplog.text


def test_max_length_that_would_cut_questions_or_answers_names_option_task_count_and_length(tokenizer):
    from mosld.data import TaskDataError, encode_examples
    from mosld.data.tasks import Example

    long_question = Example("quiz", None, "Which of these " + "very " * 30 + "long choices is right?", ["a", "b"], 0)
    long_answer = Example("quiz", None, "Q?", ["the first" + " word" * 40, "the first word"], 1)
    short = Example("quiz", "A passage " * 50, "Q?", ["yes", "no"], 0)
    with pytest.raises(TaskDataError) as err:
        encode_examples([long_question, long_answer, short], tokenizer, "passage", 24)
    message = str(err.value)
    assert message.startswith("data.max_length = 24 is too small for task 'quiz': 2 of 3 items do not fit")
    need = int(message.rsplit(" ", 1)[1])
    assert need > 40 and f"raise data.max_length to at least {need}" in message
    items = encode_examples([long_question, long_answer, short], tokenizer, "passage", need)
    assert len(items) == 3 and max(len(i) for i in items) <= need  # the passage was cut, nothing else
    assert tokenizer.decode(items[1].choices[0]) == " the first" + " word" * 40


@pytest.mark.slow
def test_fit_with_too_small_max_length_is_a_one_line_error_naming_the_option(tiny_model_dir, tmp_path, capsys):
    assert run_cli(tiny_run_args(tiny_model_dir, tmp_path, "--data.max_length", "8")) == 1
    err = capsys.readouterr().err
    assert "error: data.max_length = 8 is too small for task 'example_task'" in err and "Traceback" not in err
    assert not (tmp_path / "lightning_logs").exists()  # found in prepare_data, before the run folder exists


# ---------------------------------------------------------------------------------- adapter files


def small_adapted(seed: int = 0) -> torch.nn.Module:
    config = mosld.AdapterConfig(method="mosld", r=4, num_experts=(4, 2), target_modules=("q_proj", "v_proj"))
    model = mosld.inject_adapters(tiny_model("llama"), config)
    torch.manual_seed(seed)
    for layer in mosld.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    return model


def resave(folder: Path, tensors: dict) -> None:
    """Rewrite the weights and record their checksum, as a tool that knows the format would."""
    import hashlib

    from safetensors.torch import save

    data = save(tensors)
    (folder / "adapter_model.safetensors").write_bytes(data)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "adapter_config.json").write_text(json.dumps(meta))


def edit_config(folder: Path, change) -> None:
    meta = json.loads((folder / "adapter_config.json").read_text())
    change(meta)
    (folder / "adapter_config.json").write_text(json.dumps(meta))


WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
BAD_ADAPTERS = {
    "truncated": (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-100]), ValueError, WEIGHTS,
                  "truncated, corrupt or altered"),
    "one byte changed": (lambda f: (f / WEIGHTS).write_bytes(bytes([(f / WEIGHTS).read_bytes()[0] ^ 1])
                         + (f / WEIGHTS).read_bytes()[1:]), ValueError, WEIGHTS, "SHA-256 differs"),
    "weights missing": (lambda f: (f / WEIGHTS).unlink(), FileNotFoundError, WEIGHTS, "no adapter weights"),
    "config missing": (lambda f: (f / CONFIG).unlink(), FileNotFoundError, CONFIG, "no adapter config"),
    "config not JSON": (lambda f: (f / CONFIG).write_text("{"), ValueError, CONFIG, "not valid JSON"),
    "config a list": (lambda f: (f / CONFIG).write_text("[]"), ValueError, CONFIG, "expected a JSON object"),
    "no modules field": (lambda f: edit_config(f, lambda m: m.pop("modules")), ValueError, CONFIG, "'modules'"),
    "no checksum": (lambda f: edit_config(f, lambda m: m.pop("weights_sha256")), ValueError, CONFIG,
                    "'weights_sha256' is missing"),
    "newer format": (lambda f: edit_config(f, lambda m: m.update(format_version=99)), ValueError, CONFIG,
                     "format_version 99"),
    "other format": (lambda f: edit_config(f, lambda m: m.update(format="peft")), ValueError, CONFIG,
                     "format is 'peft'"),
    "unknown adapter field": (lambda f: edit_config(f, lambda m: m["adapter"].update(rank=4)), ValueError, CONFIG,
                              "field 'adapter': adapter config: unknown field(s) ['rank']"),
    "invalid adapter value": (lambda f: edit_config(f, lambda m: m["adapter"].update(top_k=5)), ValueError, CONFIG,
                              "field 'adapter': top_k: 5 is more than"),
    "config r altered": (lambda f: edit_config(f, lambda m: m["adapter"].update(r=2)), ValueError, WEIGHTS,
                         "has shape ("),
    "other experts": (lambda f: edit_config(f, lambda m: m["adapter"].update(num_experts=[2, 2])), ValueError,
                      WEIGHTS, "has shape"),
    "wrong dtype": (lambda f: resave(f, {k: v.double() for k, v in load_file(f / WEIGHTS).items()}), ValueError,
                    WEIGHTS, "has dtype torch.float64, expected torch.float32"),
    "extra tensor": (lambda f: resave(f, {**load_file(f / WEIGHTS), "model.extra": torch.zeros(2)}), ValueError,
                     WEIGHTS, "unexpected ['model.extra']"),
    "tensor missing": (lambda f: resave(f, dict(list(load_file(f / WEIGHTS).items())[1:])), ValueError, WEIGHTS,
                       "missing ["),
    "NaN in a tensor": (lambda f: resave(f, {k: v * float("nan") for k, v in load_file(f / WEIGHTS).items()}),
                        ValueError, WEIGHTS, "hold NaN or infinity"),
    "not safetensors": (lambda f: resave_bytes(f, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}"), ValueError, WEIGHTS,
                        "not a readable safetensors file"),
}  # fmt: skip


def resave_bytes(folder: Path, data: bytes) -> None:
    import hashlib

    (folder / WEIGHTS).write_bytes(data)
    edit_config(folder, lambda m: m.update(weights_sha256=hashlib.sha256(data).hexdigest()))


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_a_bad_adapter_folder_is_named_and_leaves_the_model_unchanged(case, tmp_path):
    mosld.save_adapter(small_adapted(), tmp_path / "adapter")
    damage, error, file, message = BAD_ADAPTERS[case]
    damage(tmp_path / "adapter")
    base = tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(error) as err:
        mosld.load_adapter(base, tmp_path / "adapter")
    assert str(tmp_path / "adapter" / file) in str(err.value) and message in str(err.value), str(err.value)
    assert not mosld.adapter_layers(base) and base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_loading_into_a_model_that_has_adapters_is_refused(tmp_path):
    mosld.save_adapter(small_adapted(), tmp_path / "adapter")
    with pytest.raises(ValueError, match="already has adapters"):
        mosld.load_adapter(small_adapted(), tmp_path / "adapter")


def test_an_adapter_of_format_1_without_checksum_still_loads(tmp_path):
    model = small_adapted()
    mosld.save_adapter(model, tmp_path / "adapter")
    edit_config(tmp_path / "adapter", lambda m: (m.pop("weights_sha256"), m.update(format_version=1)))
    loaded = mosld.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_save_leaves_the_previous_adapter_intact_and_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    mosld.save_adapter(small_adapted(seed=0), target)
    previous = folder_bytes(target)

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)  # the JSON, written after the weights
    with pytest.raises(OSError, match="No space left"):
        mosld.save_adapter(small_adapted(seed=1), target)
    monkeypatch.undo()
    assert folder_bytes(target) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind

    mosld.save_adapter(small_adapted(seed=1), target)  # and a save that succeeds replaces it whole
    assert folder_bytes(target) != previous and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_non_finite_adapter_is_never_saved(tmp_path):
    target = tmp_path / "adapter"
    mosld.save_adapter(small_adapted(), target)
    previous = folder_bytes(target)
    model = small_adapted()
    next(iter(mosld.adapter_layers(model).values())).lora_B.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"save_adapter: 1 of \d+ adapter tensors hold NaN or infinity"):
        mosld.save_adapter(model, target)
    assert folder_bytes(target) == previous


def test_saving_into_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other files \(notes.txt\)"):
        mosld.save_adapter(small_adapted(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_checked_options_reach_the_classes_as_builtin_numbers(tmp_path):
    # jsonargparse hands checked options over as their types (PositiveInt, ...), which a checkpoint must not hold:
    # torch.load(weights_only=True) refuses them
    from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

    from mosld.data import MultiTaskDataModule
    from mosld.training.module import MoSLDModule

    dm = MultiTaskDataModule(
        [EXAMPLE_TASK],
        batch_size=PositiveInt(3),
        temperature=PositiveFloat(2),
        eval_examples_by_task={"a": PositiveInt(5)},
    )
    module = MoSLDModule(learning_rate=PositiveFloat(1e-3), warmup=NonNegativeFloat(10))
    assert type(dm.batch_size) is int and type(dm.eval_examples_by_task["a"]) is int and type(dm.temperature) is float
    assert type(module.hparams.learning_rate) is float and type(module.hparams.warmup) is float
    state = {"data": dict(dm.hparams), "model": dict(module.hparams), "loader": {"batch_size": dm.batch_size}}
    torch.save(state, tmp_path / "x.ckpt")
    assert torch.load(tmp_path / "x.ckpt", weights_only=True) == state
