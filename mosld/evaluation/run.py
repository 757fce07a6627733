"""One evaluation step per batch (``eval_step``), and ``mosld.evaluate``: that step looped over the data module's
evaluation loaders without Lightning.

The Lightning module's ``validate`` / ``test`` (``mosld.training.module``) and ``evaluate`` run the same step: a
multiple-choice batch is scored by ``score_batch`` (``multiple_choice``), a generation batch decoded and scored
by ``score_generation_batch`` (``generation_scoring``), and either is added to the per-task sums of ``sums``,
whose ``eval_metrics`` makes the figures. The batches come from ``MultiTaskDataModule``, which alone resolves
how each task is prompted, decoded and scored (templates, ``GenerationSpec`` defaults and options, the chat ->
plain fallback).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mosld.data.datamodule import MultiTaskDataModule
from mosld.data.prompts import get_template
from mosld.data.tasks import EVAL_SAMPLE_SEED

from .generation_scoring import score_generation_batch
from .multiple_choice import generate_choices, score_batch, supports_prompt_sharing
from .sums import (
    GENERATE_HEADLINE,
    HEADLINE,
    MC_SCORINGS,
    SCORINGS,
    add_generation,
    add_multiple_choice,
    eval_metrics,
    new_sums,
)

# score_batch's per-item outputs that an evaluation step hands on (to callbacks that keep per-item records)
ITEM_OUTPUTS = ("pred", "correct", *(s.key for s in MC_SCORINGS))


def is_generation_batch(batch: dict) -> bool:
    """A generation task's evaluation batch (prompts and references) rather than a multiple-choice one."""
    return "references" in batch


def eval_step(
    model: torch.nn.Module,
    batch: dict,
    tokenizer: PreTrainedTokenizerBase,
    sums: dict[str, Tensor],
    task: int,
    share_prompt: bool = False,
) -> tuple[dict[str, Any], str | None]:
    """Score one evaluation batch and add it to task ``task``'s sums (``sums.new_sums``).

    Returns the per-item outputs (a multiple-choice batch's ``ITEM_OUTPUTS``; a generation batch's ``generated``
    texts and their ``score``) and the generation batch's metric name (``None`` for multiple choice).
    """
    if is_generation_batch(batch):
        texts, scores = score_generation_batch(model, batch, tokenizer)
        scores = scores.to(sums["score"].device)
        add_generation(sums, task, scores)
        return {"generated": texts, "score": scores}, batch["generation"].metric
    scores = score_batch(model, batch, share_prompt=share_prompt)
    add_multiple_choice(sums, task, scores)
    return {key: scores[key] for key in ITEM_OUTPUTS}, None


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    split: str = "test",
    data_dir: str | None = None,
    limit: int | None = None,
    *,
    batch_size: int = 8,
    max_length: int = 512,
    method: Literal["loglik", "generate"] = "loglik",
    templates: dict[str, str] | None = None,
    max_new_tokens: int = 32,
    share_prompt: bool | None = None,
    generation: dict[str, dict[str, Any]] | None = None,
    verbose: bool = False,
    item_scores: bool = False,
) -> dict[str, Any]:
    """Zero-shot (or fine-tuned) accuracy of a causal LM on multiple-choice and generation tasks, without Lightning.

    The tasks' items and batches are those of ``MultiTaskDataModule`` (the same sample, templates and generation
    settings as ``--data.max_eval_examples``, ``--data.templates`` and ``--data.generation``), scored by the
    evaluation step of ``validate`` / ``test`` (``eval_step``). A generation task (its examples carry
    ``references``) is decoded greedily and scored by its spec's metric; the others are multiple choice.

    Args:
        model: Causal LM (any device); put in eval mode for the call and restored afterwards.
        tokenizer: Its tokenizer (``mosld.models.load_tokenizer``).
        tasks: Registry names or user task paths.
        split: ``train``, ``validation`` or ``test`` (the paper's splits, see ``docs/data.md``).
        data_dir: Local data directory; default ``$MOSLD_DATA_DIR``, else the Hugging Face Hub.
        limit: At most this many items per task, a fixed seeded sample (the same as the DataModule's
            ``max_eval_examples``).
        batch_size: Items per forward pass (all choices of an item go in the same pass).
        max_length: Token budget per sequence; long passages are truncated.
        method: How multiple-choice tasks are answered: ``loglik`` scores each choice's log-likelihood;
            ``generate`` decodes greedily and maps the first line of the text to a choice (the paper's way; needs
            a model trained on the prompts, or a lettered template).
        templates: Prompt template per task name, overriding the registry's choice (a generation task's:
            ``plain`` or ``chat``).
        max_new_tokens: Most tokens generated per multiple-choice item with ``method="generate"``. A generation
            task's is its spec's, set with ``generation`` like any of its fields.
        share_prompt: Score choices on a shared prompt KV cache (see ``score_batch``); default: when the model
            supports it.
        generation: Per generation task name, ``GenerationSpec`` fields overriding the task's defaults
            (e.g. ``{"my_task": {"metric": "token_f1", "max_new_tokens": 64}}``), as ``--data.generation``.
        verbose: Print one line per task as it finishes.
        item_scores: Also return each item's headline score, for paired comparisons of two models (or two
            settings of one) on the same items.

    Returns:
        ``{"accuracy": {task: headline accuracy}, "macro_accuracy": float, "metrics": {task: {"accuracy_sum",
        "accuracy_norm", "accuracy_token_norm", "num_items", "seconds"}}, "macro": {variant: float},
        "headline": str, "split": str}``. With ``method="generate"`` the headline is ``accuracy_generate``.
        A generation task's metrics are ``{metric: mean score, "num_items", "seconds"}``, its accuracy the
        mean score; with any generation task the result also has ``"headlines": {task: metric}``, and
        ``macro_accuracy`` is the mean of the tasks' headlines (``macro``: each variant over the tasks having it).
        With ``item_scores``, ``"item_scores": {task: [score per item]}`` in the data module's item order (0/1 for
        multiple choice, the metric's score in [0, 1] for generation); their mean is the task's accuracy.
    """
    if method not in ("loglik", "generate"):
        raise ValueError(f"method: expected 'loglik' or 'generate', got {method!r}")
    datamodule = MultiTaskDataModule.for_tokenizer(
        tokenizer, tasks, data_dir=data_dir, max_eval_examples=limit, eval_batch_size=batch_size,
        max_length=max_length, templates=templates, generation=generation,
        max_train_examples=limit, seed=EVAL_SAMPLE_SEED,  # split="train": the same fixed sample as the others
    )  # fmt: skip
    names = datamodule.task_names
    share = supports_prompt_sharing(model) if share_prompt is None else share_prompt
    sums = new_sums(len(names))
    metric_names: dict[int, str] = {}  # task -> its metric: a generation task's, or accuracy_generate
    seconds: dict[int, float] = {}
    per_item: dict[int, list[float]] = {task: [] for task in range(len(names))}
    was_training = model.training
    model.eval()
    try:
        for task in range(len(names)):
            started = time.perf_counter()
            if datamodule.generation_spec(task) is None and method == "generate":
                metric_names[task] = GENERATE_HEADLINE
                correct = _generated_choices_correct(model, datamodule, task, split, max_new_tokens)
                add_generation(sums, task, correct)
                if item_scores:
                    per_item[task] += correct.tolist()
            else:
                with torch.inference_mode():
                    for batch in datamodule.eval_dataloader(task, split):
                        outputs, metric = eval_step(model, batch, tokenizer, sums, task, share)
                        if item_scores:  # "correct" is the headline scoring's (HEADLINE) per-item result
                            per_item[task] += outputs["correct" if metric is None else "score"].double().tolist()
                        if metric is not None:
                            metric_names[task] = metric
            seconds[task] = time.perf_counter() - started
            if verbose:
                line = _task_metrics(names, sums, metric_names, task) | {"seconds": seconds[task]}
                print(f"{names[task]}: " + ", ".join(f"{k}={v:.4f}" for k, v in line.items()), flush=True)
    finally:
        model.train(was_training)
    metrics = {
        name: _task_metrics(names, sums, metric_names, i) | {"seconds": seconds[i]} for i, name in enumerate(names)
    }
    generation_metric = {names[i]: m for i, m in metric_names.items() if m != GENERATE_HEADLINE}
    headline = GENERATE_HEADLINE if method == "generate" else HEADLINE
    headlines = {name: generation_metric.get(name, headline) for name in metrics}  # each task's own
    accuracy = {name: metrics[name][headlines[name]] for name in metrics}
    macro = {}
    for variant in [*([headline] if method == "generate" else SCORINGS), *dict.fromkeys(generation_metric.values())]:
        values = [m[variant] for m in metrics.values() if variant in m]
        if values:
            macro[variant] = sum(values) / len(values)
    result = {"accuracy": accuracy, "macro_accuracy": sum(accuracy.values()) / len(accuracy), "metrics": metrics,
              "macro": macro, "headline": headline}  # fmt: skip
    if item_scores:
        result["item_scores"] = {names[task]: scores for task, scores in per_item.items()}
    return result | ({"headlines": headlines} if generation_metric else {}) | {"split": split}


def _generated_choices_correct(
    model: torch.nn.Module, datamodule: MultiTaskDataModule, task: int, split: str, max_new_tokens: int
) -> Tensor:
    """Per item of a multiple-choice task, 1.0 when the choice its generated answer names is the gold one.

    Mapping text to a choice needs the choices' texts, which the multiple-choice batches (token ids) do not
    carry: the items and examples come from the data module, decoded by ``generate_choices``."""
    examples, items = datamodule.examples(task, split), datamodule.encoded(task, split)
    lettered = "{letter}" in get_template(datamodule.templates[task]).answer
    preds = generate_choices(model, datamodule.tokenizer, items, [e.choices for e in examples], lettered,
                             datamodule.eval_batch_size, max_new_tokens)  # fmt: skip
    return torch.tensor([float(p == e.label) for p, e in zip(preds, examples, strict=True)], dtype=torch.float64)


def _task_metrics(names: list[str], sums: dict[str, Tensor], metric_names: dict[int, str], task: int) -> dict:
    """One task's entry of ``evaluate``'s ``metrics``, from ``eval_metrics``' figures: a multiple-choice task's
    accuracy under each scoring, a generation task's metric (or ``accuracy_generate``), and its item count."""
    one = {k: v[task : task + 1] for k, v in sums.items()}
    metric = metric_names.get(task)
    figures = eval_metrics("eval", [names[task]], one, {} if metric is None else {0: metric})
    prefix = f"eval/{names[task]}/"
    scores = (
        {metric: figures[prefix + metric]} if metric else {s.result: figures[prefix + s.logged] for s in MC_SCORINGS}
    )
    return scores | {"num_items": int(figures[prefix + "items"])}
