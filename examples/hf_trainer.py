"""MoSLD adapters trained by Hugging Face's ``transformers.Trainer``, offline, on the embedded SmolLM2-135M.

Trains a few steps on a multiple-choice task's gold answers (the loss on the answer tokens, as ``main.py fit``
trains), saves through the Trainer (checkpoints and ``<output_dir>/adapter`` hold the adapter only), reloads the
adapter into a fresh base with ``mosld.load_adapter`` and scores it with ``mosld.evaluate``::

    python examples/hf_trainer.py                                  # data/example_task, 8 steps, -> out/hf_trainer
    python examples/hf_trainer.py --task arc_easy --limit 100 --steps 30   # a benchmark task (needs $MOSLD_DATA_DIR)
    tensorboard --logdir out/hf_trainer/runs                       # loss, router/entropy, router/load_*, aux_loss

The model, the data and the scoring are the project's; the training loop is the Trainer's, with
``MoSLDTrainerCallback`` adding the balancing loss, the routing logs and the adapter exports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import mosld
from mosld.data.loaders import TrainCollator
from mosld.data.prompts import FAMILY_TEMPLATES, encode_examples
from mosld.data.tasks import load_task, task_family
from mosld.integrations.hf import ADAPTER_DIR, MoSLDTrainerCallback
from mosld.models import load_base_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


class AnswerSequences(Dataset):
    """A multiple-choice task's training items as (prompt + gold answer + EOS, labels on the answer and EOS)."""

    def __init__(self, task: str, tokenizer, max_length: int = 512) -> None:
        examples = load_task(task, "train")
        items = encode_examples(examples, tokenizer, FAMILY_TEMPLATES[task_family(task)], max_length)
        self.rows = [item.train_sequence(tokenizer.eos_token_id) for item in items]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[list[int], list[int], int]:
        return (*self.rows[index], 0)  # the project's collator takes a task id too


class Collator(TrainCollator):
    """The project's right-padding collator, without the task ids the model's forward does not take."""

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        out = super().__call__(batch)
        del out["task_ids"]
        return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m", help="base model: embedded key, hub id or folder")
    parser.add_argument("--task", default=str(REPO / "data" / "example_task"), help="a multiple-choice task")
    parser.add_argument("--output_dir", default="out/hf_trainer")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=None, help="score at most this many test items")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    cfg = mosld.AdapterConfig(
        method="mosld", r=8, alpha=16, target_modules=("q_proj", "v_proj"), num_experts=(8, 6, 4, 2), aux_loss_coef=0.01
    )
    model = load_base_model(args.model)
    base_scores = mosld.evaluate(model, tokenizer, [args.task], split="test", limit=args.limit)
    model = mosld.inject_adapters(model, cfg)  # in place; freezes the base
    trainable, total = mosld.count_parameters(model)
    print(f"trainable {trainable:,} of {total:,} parameters")

    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.steps,  # one checkpoint, at the end: adapter and optimizer state, no base weights
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=AnswerSequences(args.task, tokenizer),
        data_collator=Collator(tokenizer.pad_token_id),
    )
    trainer.add_callback(MoSLDTrainerCallback(trainer))
    trainer.train()

    output = Path(args.output_dir)
    checkpoint = output / f"checkpoint-{args.steps}"
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    print(f"{checkpoint}: {size / 1e6:.1f} MB ({', '.join(sorted(p.name for p in checkpoint.iterdir()))})")

    # A fresh base, the saved adapter: what a user of the trained adapter gets.
    reloaded = mosld.load_adapter(load_base_model(args.model), output / ADAPTER_DIR)
    scores = mosld.evaluate(reloaded, tokenizer, [args.task], split="test", limit=args.limit)
    name, accuracy = next(iter(scores["accuracy"].items()))
    items = scores["metrics"][name]["num_items"]
    base = base_scores["accuracy"][name]
    print(
        f"reloaded adapter {output / ADAPTER_DIR}: {name} test accuracy {accuracy:.3f} ({items} items; base {base:.3f})"
    )
    return scores


if __name__ == "__main__":
    main()
