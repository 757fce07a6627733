"""LightningDataModule mixing several multiple-choice tasks, and the datasets/collators it is built from."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import astuple
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from mosld.data.prompts import FAMILY_TEMPLATES, IGNORE_INDEX, EncodedItem, encode_examples, get_template
from mosld.data.sampling import TemperatureSampler
from mosld.data.tasks import (
    EVAL_SAMPLE_SEED,
    PAPER_TASKS,
    Example,
    is_eval_only,
    load_predict_examples,
    load_task,
    seeded_sample,
    task_family,
    task_name,
)
from mosld.models import cache_root, load_tokenizer

log = logging.getLogger(__name__)
# Bump when the encoding changes, so stale cached token ids are never reused (2: items whose question or
# answers do not fit max_length are refused, no longer cut; 3: choice_chars without the leading space).
CACHE_VERSION = 3


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class TrainDataset(Dataset):
    """Gold-answer training sequences of several tasks, concatenated in task order."""

    def __init__(self, tasks: Sequence[tuple[int, Sequence[EncodedItem]]], eos_id: int):
        self.entries = [(task_id, item) for task_id, items in tasks for item in items]
        self.sizes = [len(items) for _, items in tasks]
        self.eos_id = eos_id

    @property
    def lengths(self) -> list[int]:
        """Token length of every training sequence (prompt, gold answer, EOS), for length grouping."""
        return [len(item.prompt) + len(item.choices[item.label]) + 1 for _, item in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[list[int], list[int], int]:
        task_id, item = self.entries[index]
        return (*item.train_sequence(self.eos_id), task_id)


class ResumableLoader(DataLoader):
    """The training loader: a ``DataLoader`` that Lightning resumes mid-epoch where the checkpoint left off.

    Lightning saves ``state_dict()`` in checkpoints and, when a fit resumes from one, calls
    ``load_state_dict`` before iterating; the next iteration then starts the sampler after the batches
    the trainer counts as consumed in the current epoch (``batches_done``, read from the trainer's
    restored progress rather than counted here: Lightning fetches a batch ahead of the one it trains
    on, and it is Lightning's count that decides where its epoch ends). A checkpoint saved mid-epoch
    (``ModelCheckpoint(every_n_train_steps=...)``, a preempted job) so continues the same sample
    order; without this, a resumed epoch would replay its first batches and never reach its last ones.
    (A run that stopped at ``max_steps`` is, to Lightning, at the end of its epoch: resuming it
    starts the next epoch, whose order this does not change.)

    Args:
        batches_done: Returns the number of batches of the current epoch already trained on.
        *args, **kwargs: As for ``DataLoader``; ``sampler`` must be a ``TemperatureSampler``.
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done
        self._resuming = False

    def state_dict(self) -> dict:
        # where to resume comes from the trainer's own progress (see batches_done); the epoch too
        return {"batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batch_size") != self.batch_size:
            raise ValueError(
                f"data.batch_size: the checkpoint was trained with batch size {state.get('batch_size')}, this run uses "
                f"{self.batch_size}; resume with the same batch size, or start a new run from the exported adapter"
            )
        self._resuming = True

    def __iter__(self):
        if self._resuming:
            self._resuming = False
            self.sampler.start_at(min(self.batches_done() * self.batch_size, len(self.sampler)))
        return super().__iter__()


class TrainCollator:
    """Right-pads a training batch to its longest sequence: ids, attention mask, labels (-100 outside the
    answer) and task ids."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[tuple[list[int], list[int], int]]) -> dict[str, torch.Tensor]:
        ids, labels, task_ids = zip(*batch, strict=True)
        input_ids = _pad(ids, self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": _pad([[1] * len(s) for s in ids], 0),
            "labels": _pad(labels, IGNORE_INDEX),
            "task_ids": torch.tensor(task_ids, dtype=torch.long),
        }


class EvalCollator:
    """Flattens a batch of items into one right-padded sequence per (item, choice)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[tuple[EncodedItem, int, str]]) -> dict[str, torch.Tensor | list[str]]:
        ids, labels, item_index, choice_index, chars = [], [], [], [], []
        for i, (item, _, _) in enumerate(batch):
            for c in range(len(item.choices)):
                seq, lab = item.choice_sequence(c)
                ids.append(seq)
                labels.append(lab)
                item_index.append(i)
                choice_index.append(c)
                chars.append(item.choice_chars[c])
        return {
            "input_ids": _pad(ids, self.pad_id),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0),
            "labels": _pad(labels, IGNORE_INDEX),
            "item_index": torch.tensor(item_index, dtype=torch.long),
            "choice_index": torch.tensor(choice_index, dtype=torch.long),
            "gold": torch.tensor([item.label for item, _, _ in batch], dtype=torch.long),
            "choice_chars": torch.tensor(chars, dtype=torch.long),
            "task_ids": torch.tensor([task_id for _, task_id, _ in batch], dtype=torch.long),
            "item_ids": [item_id for _, _, item_id in batch],
        }


def item_ids(examples: Sequence[Example]) -> list[str]:
    """A stable id per item: a hash of its content (task, passage, question, choices, label), so the same
    item has the same id in every run, whatever sample or order it was drawn in; repeats get ``#2``, ``#3``..."""
    ids, seen = [], {}
    for e in examples:
        digest = hashlib.sha1(json.dumps(astuple(e)).encode()).hexdigest()[:12]
        seen[digest] = seen.get(digest, 0) + 1
        ids.append(digest if seen[digest] == 1 else f"{digest}#{seen[digest]}")
    return ids


def eval_loader(
    items: Sequence[EncodedItem], task_id: int, pad_id: int, batch_size: int, rank: int = 0, world_size: int = 1,
    num_workers: int = 0, ids: Sequence[str] | None = None,
) -> DataLoader:  # fmt: skip
    """Loader over one task's items: longest first (less padding), then sharded ``rank::world_size``, no padding.

    ``ids`` (default: the items' positions) name the items in predictions."""
    ids = [str(i) for i in range(len(items))] if ids is None else list(ids)
    ordered = sorted(zip(items, ids, strict=True), key=lambda pair: len(pair[0]), reverse=True)
    shard = [(item, task_id, item_id) for item, item_id in ordered[rank::world_size]]
    return DataLoader(
        shard, batch_size=batch_size, shuffle=False, collate_fn=EvalCollator(pad_id), num_workers=num_workers
    )


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """What determines token ids: the tokenizer's class, source and vocabulary size."""
    return f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}"


def encode_cached(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_length: int,
    cache_dir: Path | None,
) -> list[EncodedItem]:
    """``encode_examples`` with an on-disk cache keyed by the examples' content, tokenizer, template and length."""
    if cache_dir is None:
        return encode_examples(examples, tokenizer, template, max_length)
    digest = hashlib.sha256()
    header = [CACHE_VERSION, tokenizer_identity(tokenizer), astuple(get_template(template)), max_length]
    digest.update(json.dumps(header).encode())
    for e in examples:
        digest.update(json.dumps(astuple(e)).encode())
    name = examples[0].task.replace(os.sep, "_") if examples else "empty"
    path = cache_dir / f"{name}-{digest.hexdigest()[:24]}.pt"
    if path.is_file():
        return [EncodedItem(*fields) for fields in torch.load(path)]
    items = encode_examples(examples, tokenizer, template, max_length)
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
    """Multi-task multiple-choice data: temperature-mixed training batches, one eval loader per task.

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
        templates: Prompt template per task (task name -> template name), overriding the registry's choice.
        train_eval_only: Also train on evaluation-only tasks (BoolQ, whose local train split has no passages).
        length_group_batches: Training batches per pool that is sorted by sequence length before it is cut
            into batches (far less padding; the batches of a pool are then shuffled); 1 keeps the sampled order.
        predict_file: JSONL questions for ``predict`` in the user-task format (``label`` optional), scored in
            file order with the prompt template of the first task.
    """

    def __init__(
        self,
        tasks: list[str] = list(PAPER_TASKS),  # noqa: B006 -- shown as the default by jsonargparse; never mutated
        model_name_or_path: str = "embedded:smollm2-135m",
        setting: Literal["mixture", "single"] = "mixture",
        temperature: float = 1.0,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        eval_examples_by_task: dict[str, int] | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        max_length: int = 512,
        data_dir: str | None = None,
        num_samples_per_epoch: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        templates: dict[str, str] | None = None,
        train_eval_only: bool = False,
        length_group_batches: int = 16,
        predict_file: str | None = None,
    ):
        super().__init__()
        if setting not in ("mixture", "single"):
            raise ValueError(f"setting: expected 'mixture' or 'single', got {setting!r}")
        if not tasks:
            raise ValueError("tasks: expected at least one task")
        if setting == "single" and len(tasks) != 1:
            raise ValueError(f"setting='single' trains on exactly one task; got {len(tasks)} tasks: {list(tasks)}")
        for option, value in (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("length_group_batches", length_group_batches),
        ):
            if value < 1:
                raise ValueError(f"{option}: expected a positive integer, got {value}")
        self.save_hyperparameters()
        self.tasks = list(tasks)
        self.task_names = [task_name(t) for t in self.tasks]
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"tasks: task names must be distinct, got {self.task_names} from {self.tasks}")
        templates = dict(templates or {})
        unknown = set(templates) - set(self.task_names)
        if unknown:
            raise ValueError(f"templates: {sorted(unknown)} are not among the tasks {self.task_names}")
        self.templates = [get_template(templates.get(n, FAMILY_TEMPLATES[task_family(t)])).name
                          for t, n in zip(self.tasks, self.task_names, strict=True)]  # fmt: skip
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

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name_or_path)
        return self._tokenizer

    def encoded(self, task_id: int, split: str) -> list[EncodedItem]:
        """Tokenised items of one task's split (after the per-task cap), from the cache when possible."""
        key = (task_id, split)
        if key not in self._encoded:
            examples = load_task(self.tasks[task_id], split, self.data_dir)
            if split == "train":
                examples = seeded_sample(examples, self.max_train_examples, self.seed)
            else:
                cap = self.eval_examples_by_task.get(self.task_names[task_id], self.max_eval_examples)
                examples = seeded_sample(examples, cap, EVAL_SAMPLE_SEED)
            self._item_ids[key] = item_ids(examples)
            self._encoded[key] = encode_cached(
                examples, self.tokenizer, self.templates[task_id], self.max_length, self.cache_dir
            )
        return self._encoded[key]

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

    def _eval_dataloaders(self, split: str) -> list[DataLoader]:
        rank, world_size = self._rank_world()
        pad_id = self.tokenizer.pad_token_id
        return [
            eval_loader(
                self.encoded(i, split),
                i,
                pad_id,
                self.eval_batch_size,
                rank,
                world_size,
                self.num_workers,
                ids=self.item_ids(i, split),
            )  # fmt: skip
            for i in range(len(self.tasks))
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders("validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders("test")

    def predict_dataloader(self) -> DataLoader:
        """The questions of ``predict_file`` in file order, batched like evaluation items (labels may be absent)."""
        if not self.predict_file:
            raise ValueError("predict_file: give a JSONL file of questions to predict (--data.predict_file)")
        examples = load_predict_examples(self.predict_file)
        items = encode_examples(examples, self.tokenizer, self.templates[0], self.max_length)
        rank, world_size = self._rank_world()
        shard = [(item, 0, str(i)) for i, item in enumerate(items)][rank::world_size]
        return DataLoader(
            shard, batch_size=self.eval_batch_size, shuffle=False, collate_fn=EvalCollator(self.tokenizer.pad_token_id)
        )
