"""LightningDataModule mixing several tasks, multiple-choice and generation ones (its datasets, loaders and
collators are in ``mosld.data.loaders``), and the on-disk cache of tokenised splits."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import astuple
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from mosld.data.formats import CHAT, GENERATION, detect_format, read_jsonl
from mosld.data.generation import (
    GENERATION_TEMPLATES,
    GenerationCollator,
    GenerationItem,
    GenerationSpec,
    encode_generation_examples,
    plain_without_chat_template,
    user_task_defaults,
)
from mosld.data.loaders import (  # noqa: F401 -- re-exported: mosld imports them from here
    EvalCollator,
    Item,
    ResumableLoader,
    TrainCollator,
    TrainDataset,
    eval_loader,
    item_ids,
)
from mosld.data.prompts import FAMILY_TEMPLATES, EncodedItem, encode_examples, get_template
from mosld.data.sampling import TemperatureSampler
from mosld.data.tasks import (
    EVAL_SAMPLE_SEED,
    PAPER_TASKS,
    Example,
    GenerationExample,
    generation_defaults,
    is_eval_only,
    load_predict_examples,
    load_task,
    seeded_sample,
    task_family,
    task_kind,
    task_name,
)
from mosld.models import cache_root, load_tokenizer
from mosld.options import TokenBudget, builtin_arguments

log = logging.getLogger(__name__)
# Bump when the encoding changes, so stale cached token ids are never reused (2: items whose question or
# answers do not fit max_length are refused, no longer cut; 3: choice_chars without the leading space; 4: generation
# items, keyed by their template).
CACHE_VERSION = 4


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """What determines token ids: the tokenizer's class, source and vocabulary size."""
    return f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}"


def _encode(examples, tokenizer, template: str | GenerationSpec, max_length: int) -> list[Item]:
    if isinstance(template, GenerationSpec):
        return encode_generation_examples(examples, tokenizer, template, max_length)
    return encode_examples(examples, tokenizer, template, max_length)


def encode_cached(
    examples: Sequence[Example] | Sequence[GenerationExample],
    tokenizer: PreTrainedTokenizerBase,
    template: str | GenerationSpec,
    max_length: int,
    cache_dir: Path | None,
) -> list[Item]:
    """``encode_examples`` (a template name) or ``encode_generation_examples`` (a ``GenerationSpec``) with an
    on-disk cache keyed by the examples' content, tokenizer, template and length."""
    if cache_dir is None:
        return _encode(examples, tokenizer, template, max_length)
    digest = hashlib.sha256()
    if isinstance(template, GenerationSpec):  # the metric and decoding settings do not change the tokens
        chat = tokenizer.chat_template if template.template == "chat" else None
        header = [CACHE_VERSION, tokenizer_identity(tokenizer), "generation", template.template, chat, max_length]
        build = GenerationItem
    else:
        header = [CACHE_VERSION, tokenizer_identity(tokenizer), astuple(get_template(template)), max_length]
        build = EncodedItem
    digest.update(json.dumps(header).encode())
    for e in examples:
        digest.update(json.dumps(astuple(e)).encode())
    name = examples[0].task.replace(os.sep, "_") if examples else "empty"
    path = cache_dir / f"{name}-{digest.hexdigest()[:24]}.pt"
    if path.is_file():
        return [build(*fields) for fields in torch.load(path)]
    items = _encode(examples, tokenizer, template, max_length)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save([astuple(item) for item in items], tmp)
    tmp.replace(path)  # atomic, so concurrent ranks never read a half-written file
    return items


def _eval_caps(caps: dict[str, int] | None) -> dict[str, int]:
    """Check ``eval_examples_by_task``: caps of at least 1 item. Names of tasks not being run are allowed: a
    protocol's caps stay the same whichever of its tasks a test pass runs."""
    caps = dict(caps or {})
    bad = {name: n for name, n in caps.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1}
    if bad:
        raise ValueError(f"eval_examples_by_task: expected task name -> an integer >= 1, got {bad}")
    return caps


class MultiTaskDataModule(L.LightningDataModule):
    """Multi-task data: temperature-mixed training batches, one eval loader per task.

    A task is multiple choice or generation (``mosld.data.tasks.task_kind``); a mixture may hold both. Both kinds
    train on prompt + gold answer/target + EOS; their eval loaders give ``EvalCollator`` (multiple choice) or
    ``GenerationCollator`` batches (generation: left-padded prompts, ``references`` and the task's
    ``GenerationSpec``).

    Args:
        tasks: Registry names (``mosld.data.KNOWN_TASKS``) or paths to user tasks; their order defines task ids.
        model_name_or_path: Base model whose tokenizer is used (``mosld.models.load_tokenizer``).
        setting: ``mixture`` (all tasks in one run) or ``single`` (exactly one task).
        temperature: Task sampling temperature T: task i is drawn with probability proportional to n_i^(1/T).
        max_train_examples: Per-task cap on training examples (subsample seeded with ``seed``).
        max_eval_examples: Per-task cap on validation/test items (fixed seeded sample, the same in every run).
        eval_examples_by_task: The cap for named tasks instead (task name -> items), e.g. ``{"mmlu": 1000}``.
        batch_size: Training sequences per batch.
        eval_batch_size: Multiple-choice items per eval batch (all their choices go in the same batch).
        max_length: Token budget of a sequence; long passages are truncated to fit.
        data_dir: Local data directory; default ``$MOSLD_DATA_DIR``, else the Hugging Face Hub.
        num_samples_per_epoch: Training sequences per epoch over all ranks; default: all training examples.
        seed: Seed of the training subsample and the sampler.
        num_workers: DataLoader workers.
        cache_dir: Tokenised-dataset cache; default ``<mosld cache>/tokenized`` (``$MOSLD_CACHE_DIR`` honoured).
        templates: Prompt template per task (task name -> template name), overriding the registry's choice; for a
            generation task ``plain`` or ``chat`` (the tokenizer's chat template).
        generation: Per generation task (task name -> fields of ``GenerationSpec``), overriding its defaults, e.g.
            ``{"my_task": {"metric": "token_f1", "max_new_tokens": 64}}``. A user generation task's defaults:
            ``rouge_l``, 128 new tokens, no stop string, ``chat`` for chat rows when the tokenizer has a chat
            template, else ``plain``.
        train_eval_only: Also train on evaluation-only tasks (BoolQ, whose local train split has no passages).
        length_group_batches: Training batches per pool that is sorted by sequence length before it is cut
            into batches (far less padding; the batches of a pool are then shuffled); 1 keeps the sampled order.
        predict_file: JSONL items for ``predict`` in a user-task row format, targets optional: multiple-choice
            rows are scored in file order with the template of the first multiple-choice task, generation rows
            generated with the spec of the first generation task.
    """

    @builtin_arguments  # the ranges are the options' types (mosld.options); the checks below, what types cannot say
    def __init__(
        self,
        tasks: list[str] = list(PAPER_TASKS),  # noqa: B006 -- shown as the default by jsonargparse; never mutated
        model_name_or_path: str = "embedded:smollm2-135m",
        setting: Literal["mixture", "single"] = "mixture",
        temperature: PositiveFloat = 1.0,
        max_train_examples: PositiveInt | None = None,
        max_eval_examples: PositiveInt | None = None,
        eval_examples_by_task: dict[str, PositiveInt] | None = None,
        batch_size: PositiveInt = 8,
        eval_batch_size: PositiveInt = 8,
        max_length: TokenBudget = 512,
        data_dir: str | None = None,
        num_samples_per_epoch: PositiveInt | None = None,
        seed: int = 0,
        num_workers: NonNegativeInt = 0,
        cache_dir: str | None = None,
        templates: dict[str, str] | None = None,
        train_eval_only: bool = False,
        length_group_batches: PositiveInt = 16,
        predict_file: str | None = None,
        generation: dict[str, dict] | None = None,
    ):
        super().__init__()
        if setting not in ("mixture", "single"):
            raise ValueError(f"setting: expected 'mixture' or 'single', got {setting!r}")
        if not tasks:
            raise ValueError("tasks: expected at least one task")
        if setting == "single" and len(tasks) != 1:
            raise ValueError(f"setting='single' trains on exactly one task; got {len(tasks)} tasks: {list(tasks)}")
        self.save_hyperparameters()
        self.tasks = list(tasks)
        self.task_names = [task_name(t) for t in self.tasks]
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"tasks: task names must be distinct, got {self.task_names} from {self.tasks}")
        templates = dict(templates or {})
        unknown = set(templates) - set(self.task_names)
        if unknown:
            raise ValueError(f"templates: {sorted(unknown)} are not among the tasks {self.task_names}")
        self.kinds = [task_kind(t, data_dir) for t in self.tasks]
        self._specs, self._chat_asked = self._generation_specs(templates, dict(generation or {}))
        self._templates = [None if i in self._specs else get_template(templates.get(n, FAMILY_TEMPLATES[task_family(t)])).name
                           for i, (t, n) in enumerate(zip(self.tasks, self.task_names, strict=True))]  # fmt: skip
        self.train_task_ids = [i for i, t in enumerate(self.tasks) if train_eval_only or not is_eval_only(t)]
        self.model_name_or_path = model_name_or_path
        self.temperature, self.seed = temperature, seed
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.eval_examples_by_task = _eval_caps(eval_examples_by_task)
        self.batch_size, self.eval_batch_size, self.max_length = batch_size, eval_batch_size, max_length
        self.data_dir, self.num_samples_per_epoch, self.num_workers = data_dir, num_samples_per_epoch, num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenized"
        self.length_group_batches = length_group_batches
        self.predict_file = predict_file
        self._item_ids: dict[tuple[int, str], list[str]] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._encoded: dict[tuple[int, str], list[EncodedItem]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], **options) -> MultiTaskDataModule:
        """A data module over a tokenizer already loaded, for evaluating outside a Trainer (``mosld.evaluate``):
        ``options`` as the constructor's; items are encoded on each use, never written to the token cache."""
        datamodule = cls(list(tasks), model_name_or_path=tokenizer.name_or_path, **options)
        datamodule._tokenizer = tokenizer
        datamodule.cache_dir = None  # encode_cached without a cache
        return datamodule

    def _generation_specs(self, templates: dict, generation: dict) -> tuple[dict[int, GenerationSpec], set[int]]:
        """The spec of each generation task (defaults, then the options), and the tasks whose options name a
        template (``chat`` asked for is then an error without a chat template, not a fall-back to ``plain``)."""
        unknown = set(generation) - set(self.task_names)
        if unknown:
            raise ValueError(f"generation: {sorted(unknown)} are not among the tasks {self.task_names}")
        specs, asked = {}, set()
        for i, (task, name) in enumerate(zip(self.tasks, self.task_names, strict=True)):
            if self.kinds[i] != GENERATION:
                if name in generation:
                    raise ValueError(
                        f"generation: {name!r} is a multiple-choice task; the option sets generation tasks"
                    )
                continue
            overrides = generation.get(name, {})
            if not isinstance(overrides, dict):
                raise ValueError(
                    f"generation: task {name!r}: expected a mapping of GenerationSpec fields, got {overrides!r}"
                )
            overrides = dict(overrides)
            if name in templates:
                if templates[name] not in GENERATION_TEMPLATES:
                    raise ValueError(f"templates: {name!r} is a generation task, whose template is one of "
                                     f"{list(GENERATION_TEMPLATES)}; got {templates[name]!r}")  # fmt: skip
                if overrides.get("template", templates[name]) != templates[name]:
                    raise ValueError(f"templates and generation disagree on the template of task {name!r}")
                overrides["template"] = templates[name]
            if "template" in overrides:
                asked.add(i)
            specs[i] = generation_defaults(task).replace(overrides, option=f"generation: task {name!r}")
        return specs, asked

    @property
    def templates(self) -> list[str]:
        """The prompt template of each task (a generation task's: ``plain`` or ``chat``)."""
        return [t if t is not None else self.generation_spec(i).template for i, t in enumerate(self._templates)]

    def generation_spec(self, task_id: int) -> GenerationSpec | None:
        """How generation task ``task_id`` is decoded and scored; ``None`` for a multiple-choice task."""
        spec = self._specs.get(task_id)
        if spec is not None and spec.template == "chat" and task_id not in self._chat_asked:
            fallback = plain_without_chat_template(spec, self.tokenizer)  # chat rows' default, where it applies
            if fallback != spec:
                log.info(
                    "task %s: the tokenizer has no chat template; using the plain template", self.task_names[task_id]
                )
                spec = self._specs[task_id] = fallback
            self._chat_asked.add(task_id)
        return spec

    @property
    def generation_specs(self) -> dict[int, GenerationSpec]:
        """Task id -> ``GenerationSpec`` of every generation task."""
        return {i: self.generation_spec(i) for i in self._specs}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name_or_path)
        return self._tokenizer

    def encoded(self, task_id: int, split: str) -> list[EncodedItem] | list[GenerationItem]:
        """Tokenised items of one task's split (after the per-task cap), from the cache when possible."""
        key = (task_id, split)
        if key not in self._encoded:
            examples = self.examples(task_id, split)
            self._item_ids[key] = item_ids(examples)
            template = self.generation_spec(task_id) or self._templates[task_id]
            self._encoded[key] = encode_cached(examples, self.tokenizer, template, self.max_length, self.cache_dir)
        return self._encoded[key]

    def examples(self, task_id: int, split: str) -> list[Example] | list[GenerationExample]:
        """One task's split as it is encoded: the training split capped at ``max_train_examples`` (a sample seeded
        with ``seed``), the others at their evaluation cap (a fixed seeded sample)."""
        examples = load_task(self.tasks[task_id], split, self.data_dir)
        if split == "train":
            return seeded_sample(examples, self.max_train_examples, self.seed)
        cap = self.eval_examples_by_task.get(self.task_names[task_id], self.max_eval_examples)
        return seeded_sample(examples, cap, EVAL_SAMPLE_SEED)

    def item_ids(self, task_id: int, split: str) -> list[str]:
        """Stable ids of ``encoded(task_id, split)``'s items, in the same order."""
        self.encoded(task_id, split)
        return self._item_ids[(task_id, split)]

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def prepare_data(self) -> None:
        # Runs once per node before setup(): fills the token cache so ranks do not all tokenise at once.
        for task_id in range(len(self.tasks)):
            if task_id in self.train_task_ids:
                self.encoded(task_id, "train")
            self.encoded(task_id, "validation")

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"]}.get(stage or "", [])
        for split in splits or ["train", "validation", "test"]:
            for task_id in range(len(self.tasks)):
                if split != "train" or task_id in self.train_task_ids:
                    self.encoded(task_id, split)

    def train_dataset(self) -> TrainDataset:
        """Training sequences of the trainable tasks (evaluation-only tasks are left out unless asked for)."""
        if not self.train_task_ids:
            raise ValueError(
                f"tasks {self.task_names} are all evaluation-only; add a trainable task or set train_eval_only=True"
            )
        return TrainDataset([(i, self.encoded(i, "train")) for i in self.train_task_ids], self.tokenizer.eos_token_id)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        rank, world_size = self._rank_world()
        sampler = TemperatureSampler(
            dataset.sizes, self.temperature, self.num_samples_per_epoch, self.seed, rank, world_size,
            lengths=dataset.lengths, batch_size=self.batch_size, group_batches=self.length_group_batches,
        )  # fmt: skip
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=TrainCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            batches_done=self._train_batches_done,
        )

    def _train_batches_done(self) -> int:
        """Training batches of the current epoch that the trainer has consumed (restored on resume)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def eval_dataloader(self, task_id: int, split: str, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The evaluation loader of one task's split (its items ``rank::world_size``), as ``val_dataloader`` and
        ``test_dataloader`` give it; ``mosld.evaluate`` loops over it too."""
        return eval_loader(
            self.encoded(task_id, split),
            task_id,
            self.tokenizer.pad_token_id,
            self.eval_batch_size,
            rank,
            world_size,
            self.num_workers,
            ids=self.item_ids(task_id, split),
            generation=self.generation_spec(task_id),
        )

    def _eval_dataloaders(self, split: str) -> list[DataLoader]:
        rank, world_size = self._rank_world()
        return [self.eval_dataloader(i, split, rank, world_size) for i in range(len(self.tasks))]

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # a generation batch's spec (a frozen dataclass) rides along as it is: Lightning's mover would rebuild it
        if isinstance(batch, dict) and "generation" in batch:
            rest = {k: v for k, v in batch.items() if k != "generation"}
            return {**super().transfer_batch_to_device(rest, device, dataloader_idx), "generation": batch["generation"]}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders("validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders("test")

    def predict_dataloader(self) -> DataLoader:
        """The items of ``predict_file`` in file order, batched like evaluation items (targets may be absent)."""
        if not self.predict_file:
            raise ValueError("predict_file: give a JSONL file of questions to predict (--data.predict_file)")
        examples = load_predict_examples(self.predict_file)
        generation = isinstance(examples[0], GenerationExample)
        kind = GENERATION if generation else "multiple_choice"
        task_id = next((i for i, k in enumerate(self.kinds) if k == kind), None)
        pad_id = self.tokenizer.pad_token_id
        if generation:
            spec = self.generation_spec(task_id) if task_id is not None else None
            if spec is None:  # no generation task to take it from: a user task's defaults
                chat_rows = detect_format(read_jsonl(self.predict_file)[0]) is CHAT
                spec = plain_without_chat_template(user_task_defaults(chat_rows), self.tokenizer)
            items = encode_generation_examples(examples, self.tokenizer, spec, self.max_length)
            collate = GenerationCollator(pad_id, spec)
        else:
            template = self._templates[task_id] if task_id is not None else FAMILY_TEMPLATES["passage"]
            items = encode_examples(examples, self.tokenizer, template, self.max_length)
            collate = EvalCollator(pad_id)
        rank, world_size = self._rank_world()
        shard = [(item, task_id or 0, str(i)) for i, item in enumerate(items)][rank::world_size]
        return DataLoader(shard, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate)
