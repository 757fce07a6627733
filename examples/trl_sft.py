"""MoSLD adapters trained by TRL's ``SFTTrainer``, offline, on the embedded SmolLM2-135M-Instruct and its chat template.

Reads a generation task's rows with the project's loader (chat rows, Alpaca rows or a bAbI task), hands them to
TRL as conversational prompt-completion rows (the loss on the completion: the last assistant turn, or the output),
trains a few steps, reloads the saved adapter into a fresh base with ``mosld.load_adapter`` and scores it with
``mosld.evaluate`` under the same chat template::

    pip install -e ".[trl]"                                   # TRL is an optional extra
    python examples/trl_sft.py                                # data/example_chat, 8 steps, -> out/trl_sft
    python examples/trl_sft.py --task data/example_instructions
    python examples/trl_sft.py --task babi_qa1 --steps 40 --limit 50    # needs $MOSLD_DATA_DIR

``MoSLDTrainerCallback`` works with ``SFTTrainer`` as with any ``Trainer``: it adds the balancing loss to the loss
TRL computes itself, keeps the routing statistics right under TRL's default gradient checkpointing, and writes
``adapter/`` in each checkpoint and in the output folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset

import mosld
from mosld.data.tasks import GenerationExample, load_task, task_name
from mosld.integrations.hf import ADAPTER_DIR, MoSLDTrainerCallback
from mosld.models import load_base_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def conversational(example: GenerationExample) -> dict[str, list[dict[str, str]]]:
    """One row as TRL's conversational prompt-completion: the history and the user turn (a passage before the
    question, as the project's chat prompts put it), then the target as the assistant's reply."""
    user = f"{example.context}\n\n{example.prompt}" if example.context else example.prompt
    prompt = [{"role": role, "content": content} for role, content in example.history]
    prompt.append({"role": "user", "content": user})
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": example.target}]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m", help="base model (with a chat template)")
    parser.add_argument("--task", default=str(REPO / "data" / "example_chat"), help="a generation task")
    parser.add_argument("--output_dir", default="out/trl_sft")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=None, help="score at most this many test items")
    args = parser.parse_args(argv)
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError as error:
        raise SystemExit(f"examples/trl_sft.py needs TRL: pip install -e '.[trl]' ({error})") from error

    examples = load_task(args.task, "train")
    if not isinstance(examples[0], GenerationExample):
        raise SystemExit(f"--task {args.task}: a generation task (chat, Alpaca, prompt/response rows, bAbI) is needed")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    if not tokenizer.chat_template:
        raise SystemExit(f"--model {args.model}: its tokenizer has no chat template, which SFTTrainer's chat rows need")
    cfg = mosld.AdapterConfig(
        method="mosld", r=8, alpha=16, target_modules=("q_proj", "v_proj"), num_experts=(8, 6, 4, 2), aux_loss_coef=0.01
    )
    name = task_name(args.task)
    chat = {name: {"template": "chat"}}  # score under the template SFTTrainer trains with
    model = load_base_model(args.model)
    base_scores = mosld.evaluate(model, tokenizer, [args.task], split="test", limit=args.limit, generation=chat)
    model = mosld.inject_adapters(model, cfg)  # in place; freezes the base

    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.steps,
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,  # TRL's default is bf16; fp32 runs the same everywhere, CPUs without native bf16 included
        max_length=512,
        seed=0,
    )  # gradient_checkpointing: TRL's default (True); the callback makes it count routing once
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list([conversational(e) for e in examples]),
        processing_class=tokenizer,
    )
    trainer.add_callback(MoSLDTrainerCallback(trainer))
    trainer.train()

    output = Path(args.output_dir)
    reloaded = mosld.load_adapter(load_base_model(args.model), output / ADAPTER_DIR)
    scores = mosld.evaluate(reloaded, tokenizer, [args.task], split="test", limit=args.limit, generation=chat)
    metric = scores["headlines"][name]
    items = scores["metrics"][name]["num_items"]
    score, base = scores["accuracy"][name], base_scores["accuracy"][name]
    print(f"reloaded adapter {output / ADAPTER_DIR}: {name} test {metric} {score:.3f} ({items} items; base {base:.3f})")
    return scores


if __name__ == "__main__":
    main()
