"""mosld adapters trained by Hugging Face's ``Trainer`` and TRL's ``SFTTrainer`` (``mosld.integrations.hf``).

Runs are a tiny random Llama, mostly in float64, on a few rows of ``data/example_task`` or ``data/example_chat``;
the models' own losses are float32 cross-entropies, so two computations of one step agree to about 1e-7, not 1e-15. DropConnect and dropout stay on: ``Reseed`` gives every training
forward a seed of its own, so that two trainers, or a run and its resumption, draw the same masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLE_TASK, REPO
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import mosld
from mosld.adapters.layer import is_adapter_parameter
from mosld.data.loaders import TrainCollator
from mosld.data.prompts import FAMILY_TEMPLATES, encode_examples
from mosld.data.tasks import load_task, task_family
from mosld.integrations.hf import ADAPTER_DIR, MoSLDTrainerCallback, is_checkpointing
from mosld.models import load_base_model, load_tokenizer

SEED_BASE = 1000


def adapter_config(aux_loss_coef: float = 0.05) -> mosld.AdapterConfig:
    return mosld.AdapterConfig(
        method="mosld",
        r=4,
        alpha=8,
        num_experts=(4, 3, 3, 2),
        target_modules=("q_proj", "v_proj", "up_proj"),
        adapter_dtype="float64",
        aux_loss_coef=aux_loss_coef,
    )


def adapted_tiny(model_dir: str, aux_loss_coef: float = 0.05, dtype: str = "float64") -> nn.Module:
    """The tiny base with MoSLD adapters whose B is not zero, so that every adapter tensor gets a gradient."""
    torch.manual_seed(0)
    cfg = adapter_config(aux_loss_coef)
    if dtype != "float64":
        cfg = mosld.AdapterConfig.from_dict(cfg.to_dict() | {"adapter_dtype": dtype})
    model = mosld.inject_adapters(load_base_model(model_dir, dtype=dtype), cfg)
    for layer in mosld.adapter_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.3)
    return model


class Reseed:
    """A forward pre-hook seeding torch before each training-mode forward: forward ``n`` (from ``start``) always
    draws the DropConnect and dropout masks of seed ``SEED_BASE + n``, whichever trainer runs it."""

    def __init__(self, model: nn.Module, start: int = 0) -> None:
        self.count = start
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if module.training and torch.is_grad_enabled():
            torch.manual_seed(SEED_BASE + self.count)
            self.count += 1


def example_batches(tokenizer, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """The 12 training rows of ``data/example_task`` in batches of ``batch_size``, padded by the project's
    collator (prompt masked with -100; answer and EOS trained)."""
    examples = load_task(EXAMPLE_TASK, "train")
    items = encode_examples(examples, tokenizer, FAMILY_TEMPLATES[task_family(EXAMPLE_TASK)], 256)
    collate = TrainCollator(tokenizer.pad_token_id)
    batches = []
    for start in range(0, len(items), batch_size):
        batch = collate(
            [(*item.train_sequence(tokenizer.eos_token_id), 0) for item in items[start : start + batch_size]]
        )
        del batch["task_ids"]  # the model's forward takes no task ids
        batches.append(batch)
    return batches


class BatchList(torch.utils.data.Dataset):
    """Ready batches as a dataset of one-batch items (``per_device_train_batch_size=1`` + ``unbatch``)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index]


def unbatch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    (batch,) = items
    return batch


def trainer_args(output_dir: Path, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=1,  # one ready batch per step
        train_sampling_strategy="sequential",
        max_steps=4,
        learning_rate=1e-2,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**(fields | overrides))


def hf_trainer(model: nn.Module, batches, output_dir: Path, **overrides) -> Trainer:
    trainer = Trainer(
        model=model, args=trainer_args(output_dir, **overrides), train_dataset=BatchList(batches), data_collator=unbatch
    )
    trainer.add_callback(MoSLDTrainerCallback(trainer))
    return trainer


def logs_by_step(trainer: Trainer) -> dict[int, dict]:
    """The trainer's ``log_history`` merged per step (the callback's routing log and the trainer's loss log of a
    step are two entries), without the end-of-training summary."""
    merged: dict[int, dict] = {}
    for entry in trainer.state.log_history:
        if "train_runtime" not in entry:
            merged.setdefault(entry["step"], {}).update(entry)
    return merged


def where(name: str):
    """``assert_close``'s message with the tensor's name in front."""
    return lambda message: f"{name}: {message}"


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mosld.adapter_state_dict(model).items()}


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    return example_batches(load_tokenizer(tiny_model_dir))


# ---------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("aux_loss_coef", [0.0, 0.05])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_trainer_optimises_the_lm_loss_plus_the_coefficient_times_the_balancing_loss(
    aux_loss_coef, accumulation, tiny_model_dir, batches, tmp_path
):
    # One SGD step of rate 1 without clipping moves each adapter tensor by minus the gradient of the loss the
    # Trainer back-propagated; it must be the gradient of (LM loss over the step's answer tokens) + coef * (mean
    # balancing loss of the step's micro-batches), computed here by hand on the same masks.
    model = adapted_tiny(tiny_model_dir, aux_loss_coef)
    step_batches = batches[:accumulation]
    before = adapter_tensors(model)
    model.train()
    mosld.set_aux_loss(model, aux_loss_coef > 0)  # as the callback (and the Lightning module) do
    reseed = Reseed(model)
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in step_batches)
    lm_losses, balances = [], []
    for batch in step_batches:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.float()  # as HF's loss
        lm_losses.append(
            nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
            )
            / tokens
        )
        balance = mosld.aux_loss(model)
        if balance is not None:
            balances.append(balance)
    expected_loss = torch.stack(lm_losses).sum()
    if balances:
        assert float(torch.stack(balances).mean()) > 0.5  # the term is not negligible: the test can fail
        expected_loss = expected_loss + aux_loss_coef * torch.stack(balances).mean()
    parameters = dict(model.named_parameters())
    names = [n for n, p in parameters.items() if p.requires_grad]
    wrt = [parameters[n] for n in names]
    if balances:  # the balancing term moves the adapter far more than the tolerance below: the test can fail
        balance_grads = torch.autograd.grad(
            aux_loss_coef * torch.stack(balances).mean(), wrt, retain_graph=True, allow_unused=True
        )
        assert max(float(g.abs().max()) for g in balance_grads if g is not None) > 1e-4
    expected = dict(zip(names, torch.autograd.grad(expected_loss, wrt), strict=True))

    reseed.count = 0
    trainer = hf_trainer(
        model,
        step_batches,
        tmp_path,
        max_steps=1,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    trainer.train()
    assert reseed.count == accumulation  # one training forward per micro-batch, none extra
    after = adapter_tensors(model)
    assert set(expected) == set(after)
    for name, gradient in expected.items():
        # the model's loss is float32 (HF's loss casts the logits), the rest float64
        torch.testing.assert_close(before[name] - after[name], gradient, rtol=1e-6, atol=1e-9, msg=where(name))
    logged = logs_by_step(trainer)[1]
    assert logged["loss"] == pytest.approx(float(expected_loss), rel=1e-6)
    assert ("aux_loss" in logged) == (aux_loss_coef > 0)
    if balances:
        assert logged["aux_loss"] == pytest.approx(float(torch.stack(balances).mean()), rel=1e-6)
    assert {"router/entropy", "router/load_max", "router/load_min"} <= set(logged)


# ------------------------------------------------------------------------------ Trainer against Lightning


def test_trainer_and_the_lightning_fit_train_the_same_adapter(tiny_model_dir, batches, tmp_path):
    """The same batches, seed, AdamW settings, linear schedule, clipping and balancing loss: after 5 steps (two
    passes over three batches, cut short) the HF Trainer's adapter equals the project's Lightning module's."""
    import lightning as L

    from mosld.training.module import MoSLDModule

    steps = 5
    module = MoSLDModule(
        model_name_or_path=tiny_model_dir,
        adapter=adapter_config(0.05),
        dtype="float64",
        learning_rate=1e-2,
        weight_decay=0.01,
        warmup=0,
        lr_schedule="linear",
    )
    module.configure_model()  # now, so the two start from the same adapter weights
    for layer in mosld.adapter_layers(module.base).values():
        nn.init.normal_(layer.lora_B, std=0.3)
    start = adapter_tensors(module.base)
    lightning_seeds = Reseed(module.base)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision="64-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path / "lightning",
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(BatchList(batches), batch_size=None))
    assert trainer.global_step == steps and lightning_seeds.count == steps

    model = mosld.inject_adapters(load_base_model(tiny_model_dir, dtype="float64"), adapter_config(0.05))
    missing = model.load_state_dict(start, strict=False).missing_keys
    assert not [k for k in missing if is_adapter_parameter(k)]
    hf_seeds = Reseed(model)
    hf = hf_trainer(model, batches, tmp_path / "hf", max_steps=steps)
    hf.train()
    assert hf.state.global_step == steps and hf_seeds.count == steps

    trained, reference = adapter_tensors(model), adapter_tensors(module.base)
    assert set(trained) == set(reference) == set(start)
    moved = max(float((reference[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # both trained
    for name in reference:
        # float32 noise only (both losses are float32 cross-entropies of float64 logits, summed in another order),
        # three orders of magnitude below how far the weights moved
        torch.testing.assert_close(trained[name], reference[name], rtol=1e-5, atol=1e-6, msg=where(name))


# ------------------------------------------------------------------------------------- checkpoints, resume


def test_checkpoints_hold_only_the_adapter_and_a_resumed_run_ends_where_an_uninterrupted_one_does(
    tiny_model_dir, batches, tmp_path
):
    whole = adapted_tiny(tiny_model_dir)
    Reseed(whole)
    trainer = hf_trainer(whole, batches, tmp_path / "whole", max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    expected = adapter_tensors(whole)

    checkpoint = tmp_path / "whole" / "checkpoint-2"
    weights = load_file(checkpoint / "model.safetensors")
    assert weights and all(is_adapter_parameter(k) for k in weights)
    assert set(weights) == set(expected)
    adapter_bytes = sum(v.numel() * v.element_size() for v in weights.values())
    base_bytes = sum(v.numel() * v.element_size() for v in whole.state_dict().values()) - adapter_bytes
    folder_bytes = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    # four copies of the adapter (transformers' weights, adapter/, Adam's two moments) and small files
    assert folder_bytes < 4 * adapter_bytes + 100_000, sorted(p.name for p in checkpoint.rglob("*"))
    assert folder_bytes < base_bytes  # and the tiny base is not much larger than its adapter
    # adapter/ in mosld's format, loadable into a fresh base, with checkpoint-2's weights
    loaded = mosld.load_adapter(load_base_model(tiny_model_dir, dtype="float64"), checkpoint / ADAPTER_DIR)
    for name, value in adapter_tensors(loaded).items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    final = mosld.load_adapter(load_base_model(tiny_model_dir, dtype="float64"), tmp_path / "whole" / ADAPTER_DIR)
    for name, value in adapter_tensors(final).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    # save_model writes the adapter only, too
    trainer.save_model(tmp_path / "saved")
    assert set(load_file(tmp_path / "saved" / "model.safetensors")) == set(expected)

    # Resume a fresh injection (other initial weights) from checkpoint-2: steps 3 and 4 again, same masks.
    resumed = mosld.inject_adapters(load_base_model(tiny_model_dir, dtype="float64"), adapter_config())
    Reseed(resumed, start=2)
    again = hf_trainer(resumed, batches, tmp_path / "whole", max_steps=4, save_strategy="steps", save_steps=2)
    again.train(resume_from_checkpoint=str(checkpoint))
    assert again.state.global_step == 4
    for name, value in adapter_tensors(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12, msg=where(name))


class TokenCounter(TrainerCallback):
    """Reads, at each step's end and before ``MoSLDTrainerCallback`` logs and resets them, how many tokens each
    routed layer's statistics counted in that step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tokens: list[set[int]] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        stats = mosld.router_stats(self.model, reset=False)
        self.tokens.append({int(s["tokens"]) for s in stats.values()})


def test_peft_gate_batches_add_a_fixed_gate_peft_export_that_peft_loads(tiny_model_dir, batches, tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted_tiny(tiny_model_dir)
    args = trainer_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=BatchList(batches), data_collator=unbatch)
    trainer.add_callback(MoSLDTrainerCallback(trainer, peft_gate_batches=batches[:2]))
    trainer.train()
    for folder in (tmp_path / "checkpoint-1", tmp_path / "checkpoint-2", tmp_path):
        assert (folder / "peft" / "adapter_config.json").is_file(), folder
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".peft")]  # no staging folder left
    # The final export is the trained mixture with its gates fixed at their mean over those batches.
    model.eval()
    inputs = {k: batches[2][k] for k in ("input_ids", "attention_mask")}
    mosld.set_static_gates(model, mosld.mean_gates(model, batches[:2]))
    with torch.no_grad():
        expected = model(**inputs).logits
        stock = load_base_model(tiny_model_dir, dtype="float64")
        base_only = stock(**inputs).logits
        got = peft.PeftModel.from_pretrained(stock, str(tmp_path / "peft")).eval()(**inputs).logits
    assert (expected - base_only).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_counts_routing_once_and_trains_the_same_adapter(tiny_model_dir, batches, tmp_path):
    runs = {}
    for checkpointing in (False, True, "every_2"):  # every_2: every second decoder layer (transformers' option)
        model = adapted_tiny(tiny_model_dir)
        Reseed(model)
        options = {"gradient_checkpointing_kwargs": {"every_n_layers": 2}} if checkpointing == "every_2" else {}
        args = trainer_args(
            tmp_path / str(checkpointing), max_steps=3, gradient_checkpointing=bool(checkpointing), **options
        )
        trainer = Trainer(model=model, args=args, train_dataset=BatchList(batches), data_collator=unbatch)
        counter = TokenCounter(model)
        trainer.add_callback(counter)  # before the mosld callback, which resets the statistics when it logs them
        trainer.add_callback(MoSLDTrainerCallback(trainer))
        trainer.train()
        assert is_checkpointing(model) == bool(checkpointing)
        # every layer counted each real token of the step's batch once, recomputed or not
        assert counter.tokens == [{int(b["attention_mask"].sum())} for b in batches[:3]]
        runs[checkpointing] = (adapter_tensors(model), list(logs_by_step(trainer).values()))
    plain, plain_logs = runs[False]
    for recomputed, recomputed_logs in (runs[True], runs["every_2"]):
        assert len(plain_logs) == len(recomputed_logs) == 3
        for a, b in zip(plain_logs, recomputed_logs, strict=True):
            for key in ("router/entropy", "router/load_max", "router/load_min", "aux_loss", "loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-9), key
        for name in plain:
            torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-9, atol=1e-12, msg=where(name))


@pytest.mark.parametrize(
    "options,message",
    [({"use_reentrant": True}, "use_reentrant=True"), ({"preserve_rng_state": False}, "preserve_rng_state")],
)
def test_checkpointing_options_mosld_cannot_honour_are_refused_naming_them(
    options, message, tiny_model_dir, batches, tmp_path
):
    model = adapted_tiny(tiny_model_dir)
    args = trainer_args(tmp_path, max_steps=1, gradient_checkpointing=True, gradient_checkpointing_kwargs=options)
    trainer = Trainer(model=model, args=args, train_dataset=BatchList(batches), data_collator=unbatch)
    trainer.add_callback(MoSLDTrainerCallback(trainer))
    with pytest.raises(ValueError, match=f"gradient_checkpointing_kwargs: .*{message}"):
        trainer.train()


def test_an_evaluation_during_training_leaves_the_training_routing_statistics_alone(tiny_model_dir, batches, tmp_path):
    # Logged once, at the epoch's end; one run evaluates after every step, the other never.
    logged = {}
    for evaluating in (False, True):
        model = adapted_tiny(tiny_model_dir)
        Reseed(model)
        evaluation = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=1) if evaluating else {}
        args = trainer_args(tmp_path / str(evaluating), max_steps=3, logging_strategy="epoch", **evaluation)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=BatchList(batches),
            eval_dataset=BatchList(batches[:1]) if evaluating else None,
            data_collator=unbatch,
        )
        trainer.add_callback(MoSLDTrainerCallback(trainer))
        trainer.train()
        history = trainer.state.log_history
        assert len([h for h in history if "eval_loss" in h]) == (3 if evaluating else 0)
        (logged[evaluating],) = [h for h in history if "router/entropy" in h]
    for key in ("router/entropy", "router/load_max", "router/load_min", "aux_loss"):
        assert logged[True][key] == pytest.approx(logged[False][key], rel=1e-12), key


def test_the_callback_refuses_a_model_without_adapters_and_trainable_base_tensors(tiny_model_dir, batches, tmp_path):
    bare = load_base_model(tiny_model_dir, dtype="float64")
    trainer = Trainer(model=bare, args=trainer_args(tmp_path), train_dataset=BatchList(batches), data_collator=unbatch)
    with pytest.raises(ValueError, match="no mosld adapters"):
        MoSLDTrainerCallback(trainer)
    model = adapted_tiny(tiny_model_dir)
    model.lm_head.weight.requires_grad_(True)
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=BatchList(batches), data_collator=unbatch)
    with pytest.raises(ValueError, match="outside the adapters require grad"):
        MoSLDTrainerCallback(trainer)


def test_a_4bit_base_trains_inside_allow_quantized_base_and_its_adapter_loads(tiny_model_dir, batches, tmp_path):
    pytest.importorskip("bitsandbytes")
    from mosld.integrations.hf import allow_quantized_base
    from mosld.quantization import QuantizationConfig, is_quantized_layer

    nf4 = QuantizationConfig(bits=4, quant_type="nf4")
    model = mosld.inject_adapters(load_base_model(tiny_model_dir, quantization=nf4), adapter_config())
    assert all(is_quantized_layer(layer.base_layer) for layer in mosld.adapter_layers(model).values())
    args = trainer_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    with pytest.raises(ValueError, match="quantized"):  # transformers' own refusal, without the block
        Trainer(model=model, args=args, train_dataset=BatchList(batches), data_collator=unbatch)
    with allow_quantized_base(model):
        trainer = Trainer(model=model, args=args, train_dataset=BatchList(batches), data_collator=unbatch)
    assert model.is_quantized  # restored: it keeps guarding .half() and .float()
    trainer.add_callback(MoSLDTrainerCallback(trainer))
    start = adapter_tensors(model)
    trainer.train()
    trained = adapter_tensors(model)
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-4
    assert set(load_file(tmp_path / "checkpoint-2" / "model.safetensors")) == set(trained)
    loaded = mosld.load_adapter(load_base_model(tiny_model_dir, quantization=nf4), tmp_path / ADAPTER_DIR)
    for name, value in adapter_tensors(loaded).items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=where(name))


# ------------------------------------------------------------------------------------------------- TRL


def chat_rows(split: str) -> list[dict]:
    """``data/example_chat`` as TRL's conversational prompt-completion rows: the last assistant turn is the
    completion (the one trained), as the project's own chat format has it."""
    rows = []
    for line in (REPO / "data" / "example_chat" / f"{split}.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def test_trl_sft_trainer_with_a_chat_template_trains_and_its_adapter_loads(tiny_model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.chat_template  # SmolLM2-Instruct's
    model = adapted_tiny(tiny_model_dir, dtype="float32")
    start = adapter_tensors(model)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_length=128,
    )  # gradient_checkpointing: TRL's default, True
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(chat_rows("train")), processing_class=tokenizer
    )
    trainer.add_callback(MoSLDTrainerCallback(trainer))
    trainer.train()
    trained = adapter_tensors(model)
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-4
    logged = logs_by_step(trainer)
    assert sorted(logged) == [1, 2, 3]
    assert all({"loss", "aux_loss", "router/entropy", "router/load_max"} <= set(h) for h in logged.values())

    for folder in (tmp_path / ADAPTER_DIR, tmp_path / "checkpoint-3" / ADAPTER_DIR):
        loaded = mosld.load_adapter(load_base_model(tiny_model_dir), folder)
        for name, value in adapter_tensors(loaded).items():
            torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=where(name))
    assert set(load_file(tmp_path / "checkpoint-3" / "model.safetensors")) == set(trained)


# --------------------------------------------------------------------------------------------- examples


def run_example(name: str, argv: list[str]) -> dict:
    """``main(argv)`` of ``examples/<name>.py`` (a script, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize("name", ["hf_trainer", "trl_sft"])
def test_the_examples_train_save_reload_and_score(name, tiny_model_dir, tmp_path, capsys):
    if name == "trl_sft":
        pytest.importorskip("trl")
    scores = run_example(name, ["--model", tiny_model_dir, "--steps", "2", "--output_dir", str(tmp_path)])
    assert (tmp_path / "checkpoint-2" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert set(load_file(tmp_path / "checkpoint-2" / "model.safetensors")) == set(
        load_file(tmp_path / ADAPTER_DIR / "adapter_model.safetensors")
    )
    (task,) = scores["accuracy"]
    assert 0 <= scores["accuracy"][task] <= 1 and scores["metrics"][task]["num_items"] > 0
    assert f"reloaded adapter {tmp_path / ADAPTER_DIR}: {task} test" in capsys.readouterr().out
