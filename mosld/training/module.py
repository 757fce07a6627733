"""The LightningModule: a base causal LM with MoSLD adapters, trained on the answer tokens.

It knows nothing of files or task formats: it receives batches from the data module
(``mosld.data``) and scores evaluation batches with ``mosld.evaluation.run.eval_step``, the step ``mosld.evaluate``
runs too (``score_batch`` for multiple choice; decoding and a metric for a generation batch, which has
``references``).
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat
from torch import Tensor

from ..adapters import AdapterConfig, adapter_layers, aux_loss, count_parameters, inject_adapters, set_aux_loss
from ..adapters.checkpointing import enable_gradient_checkpointing
from ..adapters.inject import clean_name
from ..adapters.layer import is_adapter_parameter
from ..evaluation import answer_logits, score_batch, supports_prompt_sharing
from ..evaluation.generation_scoring import generate_batch
from ..evaluation.run import eval_step, is_generation_batch
from ..evaluation.sums import eval_metrics, headline_key, new_sums
from ..models import load_base_model
from ..options import builtin_arguments
from ..quantization import QuantizationConfig
from .resume import adopt_optimizer_options


def answer_logits_loss(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over the answer tokens, from logits at the answer positions only.

    ``mosld.evaluation.answer_logits`` (the same helper evaluation scores with) asks the model for
    those positions only; the loss equals the model's own ``labels=`` loss.
    """
    logits, targets, _ = answer_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), targets)  # fp32 like the models' own loss


class MoSLDModule(L.LightningModule):
    """Fine-tune a causal LM with mixture-of-LoRA adapters on multiple-choice tasks.

    Args:
        model_name_or_path: Base model: hub id, local folder, or ``embedded:smollm2-135m``.
        adapter: The adapters to inject (method, r, alpha, experts, ...); default MoSLD.
        dtype: Dtype of the frozen base weights (``float32``, ``bfloat16``, ...). Mixed
            precision is the trainer's ``precision`` option.
        learning_rate: Peak learning rate of AdamW (paper: 3e-4).
        weight_decay: AdamW weight decay.
        warmup: Warm-up length: a fraction of the total optimizer steps if < 1, else a step count.
        lr_schedule: Shape after warm-up: ``cosine`` or ``linear`` decay to 0, or ``constant``.
        compile: Run the model under ``torch.compile``.
        trust_remote_code: Passed to ``from_pretrained``.
        quantization: Quantize the frozen base at load (bitsandbytes 4-bit NF4/FP4 or 8-bit); the
            adapters wrap the quantized projections (``mosld.quantization``).
        gradient_checkpointing: Recompute each decoder layer's activations in backward instead of
            keeping them (transformers' non-reentrant checkpointing; routing counted once).
    """

    @builtin_arguments  # the ranges are the options' types (mosld.options)
    def __init__(
        self,
        model_name_or_path: str = "embedded:smollm2-135m",
        adapter: AdapterConfig | None = None,
        dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32",
        learning_rate: PositiveFloat = 3e-4,
        weight_decay: NonNegativeFloat = 0.0,
        warmup: NonNegativeFloat = 0.06,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        compile: bool = False,
        trust_remote_code: bool = False,
        quantization: QuantizationConfig | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(adapter, dict):  # hparams of a checkpoint
            adapter = AdapterConfig.from_dict(adapter)
        self.quantization = QuantizationConfig.from_value(quantization)
        # None: the method defaults of AdapterConfig (MoSLD). Fields left out of a config take
        # the defaults of the method given, so `--model.adapter.method lora` alone is LoRA.
        self.adapter_config = adapter if adapter is not None else AdapterConfig()
        self.save_hyperparameters(ignore=["adapter", "quantization"])
        self.hparams["adapter"] = self.adapter_config.to_dict()
        self.hparams["quantization"] = self.quantization.to_dict()
        self.model: torch.nn.Module | None = None
        # Checkpoints hold only adapter tensors, so the frozen base keys are absent on load.
        self.strict_loading = False
        self._sums: dict[str, Tensor] = {}  # per-task sums of an evaluation epoch (mosld.evaluation.sums)
        self._metric_names: dict[int, str] = {}  # generation task index -> metric name, from the batches seen

    def configure_model(self) -> None:
        """Load the base and inject adapters; runs once, inside the strategy's context (FSDP)."""
        if self.model is not None:
            return
        model = load_base_model(
            self.hparams.model_name_or_path,
            dtype=self.hparams.dtype,
            trust_remote_code=self.hparams.trust_remote_code,
            quantization=self.quantization,
        )
        model.config.use_cache = False
        if self.hparams.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        # from_pretrained returns eval mode and Lightning keeps module modes as it finds them:
        # without this, DropConnect and LoRA dropout would never be active in training.
        model.train()
        inject_adapters(model, self.adapter_config)
        set_aux_loss(model, self.adapter_config.aux_loss_coef > 0)
        self.model = torch.compile(model) if self.hparams.compile else model

    @property
    def base(self) -> torch.nn.Module:
        """The adapted HF model (unwrapped from ``torch.compile``)."""
        return getattr(self.model, "_orig_mod", self.model)

    def parameter_counts(self) -> tuple[int, int]:
        return count_parameters(self.base)

    # ------------------------------------------------------------------ training
    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        lm_loss = answer_logits_loss(self.model, batch)
        loss = lm_loss
        balance = aux_loss(self.base) if self.adapter_config.aux_loss_coef > 0 else None
        if balance is not None:
            loss = loss + self.adapter_config.aux_loss_coef * balance
            self.log("train/aux_loss", balance.detach(), on_step=True, on_epoch=False)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", lm_loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log(
            "train/answer_tokens",
            (batch["labels"] != -100).sum().float(),
            on_step=True,
            on_epoch=False,
            reduce_fx="sum",
            batch_size=batch_size,
        )
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Lightning validates at epoch ends and on should_stop, not when max_steps ends a run
        # mid-epoch; asking to stop makes every run end with a validation (the "after" point).
        max_steps = self.trainer.max_steps
        if max_steps is not None and max_steps > 0 and self.global_step >= max_steps:
            self.trainer.should_stop = True

    def on_train_start(self) -> None:
        # A resumed fit restores the rate the checkpoint's schedule had reached; this run's schedule
        # (its peak rate and length may differ) decides the rate of the first step too.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, factor in zip(
                    scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
                ):
                    group["lr"] = base * factor(scheduler.last_epoch)

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: were the adapters injected?")
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.hparams.warmup
        warmup_steps = int(round(warmup * total)) if warmup < 1 else int(warmup)
        schedule = self.hparams.lr_schedule

        # By hand, not transformers.get_scheduler: its warm-up is step / warmup (the first step runs at rate 0,
        # ours at 1 / (warmup + 1)) and its cosine rises again past the end; torch's chained schedulers
        # compute rates recursively, and on_train_start needs the closed form (lr_lambdas) to re-plan a resume.
        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / (warmup_steps + 1)
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _task_names(self) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "task_names", None)
        if not names:
            raise RuntimeError("the data module must provide task_names (one per evaluation dataloader)")
        return list(names)

    def _reset_sums(self) -> None:
        self._sums = new_sums(len(self._task_names()), self.device)

    def generation_metrics(self) -> dict[int, str]:
        """Task index -> metric name of the generation tasks (the data module's specs; else the batches seen)."""
        names = dict(self._metric_names)
        spec_of = getattr(getattr(self.trainer, "datamodule", None), "generation_spec", None)
        if callable(spec_of):
            for i in range(len(self._task_names())):
                spec = spec_of(i)
                if spec is not None:
                    names[i] = spec.metric
        return names

    def on_validation_epoch_start(self) -> None:
        self._reset_sums()
        # Score each item's choices on one KV cache of its prompt when the model allows it.
        self._share_prompt = supports_prompt_sharing(self.base)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def generate(self, batch: dict) -> list[str]:
        """Greedy continuations of a generation batch's prompts (``mosld.evaluation.generation_scoring``)."""
        return generate_batch(self.model, batch, self.trainer.datamodule.tokenizer)

    def _eval_step(self, batch: dict, dataloader_idx: int) -> dict:
        """Adds the batch to the per-task sums; returns the per-item scores (for callbacks that keep them):
        a multiple-choice batch's predictions and correctness, a generation batch's texts and scores."""
        tokenizer = self.trainer.datamodule.tokenizer
        outputs, metric = eval_step(self.model, batch, tokenizer, self._sums, dataloader_idx, self._share_prompt)
        if metric is not None:
            self._metric_names[dataloader_idx] = metric
        return outputs

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._eval_step(batch, dataloader_idx)

    def eval_metrics(self, stage: str) -> dict[str, float]:
        """Per-task metrics reduced over all ranks (``mosld.evaluation.sums.eval_metrics``): multiple-choice
        accuracy under each scoring with its 95% interval and the answer-token loss, a generation task's metric
        with its interval; keys are identical on every rank."""
        # Not torchmetrics' SumMetric: it sums to one float32 scalar, where each sum is a float64 vector over tasks
        # that mosld.evaluate (no Lightning) fills too; the strategy's reduce syncs it in one call.
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._sums.items()}
        return eval_metrics(stage, self._task_names(), sums, self.generation_metrics())

    def _log_eval(self, stage: str) -> None:
        metrics = self.eval_metrics(stage)
        self.last_eval_metrics = metrics
        # Written to the loggers at the optimizer step reached (Lightning's own step counter lags
        # by one when validation runs from on_train_batch_end). The sanity check runs a full
        # validation before training (num_sanity_val_steps=-1): the "before" point, at step 0.
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        if not self.trainer.sanity_checking:  # Lightning drops self.log there
            for key, value in metrics.items():  # for checkpoint monitors and the progress bar
                self.log(key, value, prog_bar=key == headline_key(stage, metrics), logger=False)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """One row per question: the predicted choice (headline scoring) and every choice's scores; for a
        generation batch, the generated text (and the references, when the row came with some)."""
        if is_generation_batch(batch):
            return [{"generated": text, "references": list(refs)} if refs else {"generated": text}
                    for text, refs in zip(self.generate(batch), batch["references"], strict=True)]  # fmt: skip
        scores = score_batch(self.model, batch, share_prompt=supports_prompt_sharing(self.base))
        rows = [{"prediction": int(p), "label": int(g), "logprob": [], "logprob_per_char": []}
                for p, g in zip(scores["pred"].tolist(), batch["gold"].tolist(), strict=True)]  # fmt: skip
        for item, logprob, norm in zip(
            batch["item_index"].tolist(),
            scores["choice_logprob"].tolist(),
            scores["choice_logprob_norm"].tolist(),
            strict=True,
        ):
            rows[item]["logprob"].append(logprob)
            rows[item]["logprob_per_char"].append(norm)
        for row in rows:
            if row["label"] < 0:  # the question came without an answer
                del row["label"]
        return rows

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only adapter and router tensors: the frozen base is reloaded from its source."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter_parameter(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        # the options given take effect over the optimizer state saved (see mosld.training.resume)
        adopt_optimizer_options(checkpoint, self.hparams.learning_rate, self.hparams.weight_decay)
        if "state_dict" not in checkpoint:  # FSDP loads the weights itself, before this hook
            return
        expected = {clean_name(k) for k in self.state_dict() if is_adapter_parameter(k)}
        got = {clean_name(k) for k in checkpoint["state_dict"]}
        if expected != got:
            missing, unexpected = sorted(expected - got)[:3], sorted(got - expected)[:3]
            raise ValueError(
                f"checkpoint does not match this model's adapters (method {self.adapter_config.method!r}): "
                f"missing {missing}, unexpected {unexpected}"
            )

    def adapter_layer_names(self) -> list[str]:
        return list(adapter_layers(self.base))
