"""The datasets, loaders and collators the data module builds: training sequences of both kinds of item, and
evaluation batches (``EvalCollator`` for multiple choice, ``GenerationCollator`` for generation)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import astuple

import torch
from torch.utils.data import DataLoader, Dataset

from mosld.data.generation import GenerationCollator, GenerationItem, GenerationSpec
from mosld.data.prompts import IGNORE_INDEX, EncodedItem
from mosld.data.rows import Example, GenerationExample

Item = EncodedItem | GenerationItem


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class TrainDataset(Dataset):
    """Training sequences (gold answer or target, then EOS) of several tasks of either kind, in task order."""

    def __init__(self, tasks: Sequence[tuple[int, Sequence[Item]]], eos_id: int):
        self.entries = [(task_id, item) for task_id, items in tasks for item in items]
        self.sizes = [len(items) for _, items in tasks]
        self.eos_id = eos_id

    @property
    def lengths(self) -> list[int]:
        """Token length of every training sequence (prompt, gold answer or target, EOS), for length grouping."""
        return [item.train_length() for _, item in self.entries]

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


def item_ids(examples: Sequence[Example] | Sequence[GenerationExample]) -> list[str]:
    """A stable id per item: a hash of its content (task, passage, question, choices, label; or task, context,
    prompt, target, references, history), so the same item has the same id in every run, whatever sample or order
    it was drawn in; repeats get ``#2``, ``#3``..."""
    ids, seen = [], {}
    for e in examples:
        digest = hashlib.sha1(json.dumps(astuple(e)).encode()).hexdigest()[:12]
        seen[digest] = seen.get(digest, 0) + 1
        ids.append(digest if seen[digest] == 1 else f"{digest}#{seen[digest]}")
    return ids


def eval_loader(
    items: Sequence[Item], task_id: int, pad_id: int, batch_size: int, rank: int = 0, world_size: int = 1,
    num_workers: int = 0, ids: Sequence[str] | None = None, generation: GenerationSpec | None = None,
) -> DataLoader:  # fmt: skip
    """Loader over one task's items: longest first (less padding), then sharded ``rank::world_size``, no padding.

    ``ids`` (default: the items' positions) name the items in predictions. Generation items (their task's spec as
    ``generation``) come in ``GenerationCollator`` batches, ordered by prompt length; multiple-choice items in
    ``EvalCollator`` batches."""
    ids = [str(i) for i in range(len(items))] if ids is None else list(ids)
    if generation is None and any(isinstance(item, GenerationItem) for item in items):
        raise ValueError("eval_loader: generation items need their task's GenerationSpec (generation=...)")
    length = len if generation is None else (lambda item: len(item.prompt))
    ordered = sorted(zip(items, ids, strict=True), key=lambda pair: length(pair[0]), reverse=True)
    shard = [(item, task_id, item_id) for item, item_id in ordered[rank::world_size]]
    collate = EvalCollator(pad_id) if generation is None else GenerationCollator(pad_id, generation)
    return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
