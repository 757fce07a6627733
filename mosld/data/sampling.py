"""Temperature-based multi-task sampling, deterministic and sharded for DDP."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def temperature_probabilities(sizes: Sequence[int], temperature: float) -> list[float]:
    """Probability of drawing each task: proportional to ``n_i ** (1 / T)``.

    Args:
        sizes: Number of training examples per task (all positive).
        temperature: T > 0. T = 1 samples proportionally to size; T -> inf samples tasks uniformly.

    Returns:
        One probability per task, summing to 1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: expected T > 0 (1 = proportional, large = uniform), got {temperature}")
    if not sizes or any(n <= 0 for n in sizes):
        raise ValueError(f"sizes: expected a positive number of examples per task, got {list(sizes)}")
    # Work in log space: n ** (1/T) is fine, but this also gives T = inf (uniform) without a special case.
    logs = [math.log(n) / temperature for n in sizes]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    return [w / sum(weights) for w in weights]


def stratified_indices(strata: list[str], limit: int, seed: int) -> list[int]:
    """``limit`` indices drawn within each stratum in proportion to its size (proportional allocation)."""
    members: dict[str, list[int]] = {}
    for i, stratum in enumerate(strata):
        members.setdefault(stratum, []).append(i)
    names = sorted(members)
    quotas = {s: limit * len(members[s]) / len(strata) for s in names}
    counts = {s: int(quotas[s]) for s in names}
    # the seats left go to the largest remainders (Hamilton's method), so the counts sum to limit
    by_remainder = sorted(names, key=lambda s: (counts[s] - quotas[s], names.index(s)))
    for s in by_remainder[: limit - sum(counts.values())]:
        counts[s] += 1
    rng = random.Random(seed)
    return sorted(i for s in names for i in rng.sample(members[s], counts[s]))


def length_grouped_batches(
    indices: Sequence[int], lengths: Sequence[int], batch_size: int, pool_batches: int, generator: torch.Generator
) -> list[list[int]]:
    """Cut ``indices`` into batches of sequences of similar length.

    Consecutive pools of ``pool_batches * batch_size`` indices are each sorted by ``lengths[index]`` and cut
    into batches, and the batches of a pool are shuffled, so that a batch is padded only to the longest of
    a few similar sequences while the pools keep the sampler's order (and its task mixture) over the epoch.

    Args:
        indices: The sampler's index sequence.
        lengths: Length of the sequence at each dataset index (what the collator pads to).
        batch_size: Indices per batch; the last batch may be shorter.
        pool_batches: Batches per pool; 1 keeps the order of ``indices``.
        generator: Source of the batch shuffles.

    Returns:
        The batches, in training order.
    """
    pool_size = pool_batches * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(indices), pool_size):
        pool = indices[start : start + pool_size]
        if pool_batches > 1:
            pool = sorted(pool, key=lambda i: lengths[i])  # stable: equal lengths keep their sampled order
        chunk = [list(pool[b : b + batch_size]) for b in range(0, len(pool), batch_size)]
        if pool_batches > 1:
            chunk = [chunk[j] for j in torch.randperm(len(chunk), generator=generator).tolist()]
        batches += chunk
    return batches


class TemperatureSampler(Sampler[int]):
    """Draws indices into the concatenation of several tasks' training sets.

    Each draw picks a task with ``temperature_probabilities`` and takes that task's next example from a
    shuffled pass over it (a new shuffle each pass), so a task is covered before any example repeats. The
    global index sequence depends only on (seed, epoch), so it is identical on every rank; rank r takes
    positions r, r + W, r + 2W, ... of it, truncated so that every rank gets the same number of indices.

    With ``lengths`` and ``group_batches > 1`` the sequence is instead cut into length-grouped global
    batches of ``W * batch_size`` (``length_grouped_batches``, pools of ``group_batches`` global batches)
    and rank r takes the r-th ``batch_size`` slice of each: consecutive ``batch_size`` indices of a rank's
    shard are one batch of similar lengths, and W ranks train on the global batches that one process with
    batch size ``W * batch_size`` would. A last global batch short of ``W * batch_size`` is dealt out evenly.

    Args:
        sizes: Training examples per task; task i owns global indices ``sum(sizes[:i]) .. sum(sizes[:i+1]) - 1``.
        temperature: Sampling temperature T.
        num_samples: Length of one epoch over all ranks; default ``sum(sizes)``.
        seed: Base seed, shared by all ranks.
        rank: This process's rank.
        world_size: Number of processes.
        lengths: Sequence length of every global index, for length grouping.
        batch_size: Per-rank batch size the loader cuts the shard into (length grouping only).
        group_batches: Global batches in each length-sorted pool; 1 turns grouping off.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        temperature: float = 1.0,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        group_batches: int = 1,
    ):
        self.sizes = list(sizes)
        self.probabilities = temperature_probabilities(self.sizes, temperature)
        self.num_samples = sum(self.sizes) if num_samples is None else int(num_samples)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank}")
        if self.num_samples < world_size:
            raise ValueError(f"num_samples: expected at least world_size = {world_size}, got {self.num_samples}")
        if group_batches < 1 or batch_size < 1:
            raise ValueError(f"group_batches and batch_size: expected >= 1, got {group_batches} and {batch_size}")
        self.grouped = group_batches > 1 and lengths is not None
        if self.grouped:
            if len(lengths) != sum(self.sizes):
                raise ValueError(f"lengths: expected one per training example ({sum(self.sizes)}), got {len(lengths)}")
        self.lengths = None if lengths is None else list(lengths)
        self.batch_size, self.group_batches = batch_size, group_batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self._start = 0  # see start_at

    def start_at(self, position: int) -> None:
        """Make the next ``__iter__`` skip the first ``position`` indices of this rank's shard (mid-epoch resume).

        Later iterations start at the beginning again. ``len`` stays the whole epoch's, as Lightning's
        loop counts the batches it has already consumed.
        """
        if not 0 <= position <= len(self):
            raise ValueError(f"position: expected 0 <= position <= {len(self)} (this rank's epoch), got {position}")
        self._start = position

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose index sequence ``__iter__`` yields (Lightning calls this every epoch)."""
        self.epoch = epoch

    def global_indices(self) -> list[int]:
        """The full index sequence of the current epoch, before sharding (the same on every rank)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        tasks = torch.multinomial(
            torch.tensor(self.probabilities, dtype=torch.float64),
            self.num_samples,
            replacement=True,
            generator=generator,
        ).tolist()
        offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        orders: list[list[int]] = [[] for _ in self.sizes]
        indices = []
        for task in tasks:
            if not orders[task]:
                orders[task] = torch.randperm(self.sizes[task], generator=generator).tolist()[::-1]
            indices.append(offsets[task] + orders[task].pop())
        return indices

    def shard(self) -> list[int]:
        """This rank's indices of the current epoch, in order."""
        indices = self.global_indices()
        if not self.grouped:
            return indices[self.rank : len(self) * self.world_size : self.world_size]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_919)
        indices = indices[: len(self) * self.world_size]
        global_batch = self.batch_size * self.world_size
        full = len(indices) // global_batch * global_batch
        batches = length_grouped_batches(indices[:full], self.lengths, global_batch, self.group_batches, generator)
        # rank r takes the r-th slice of every global batch: W ranks see what one process with batch W * B would
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        # the last, short global batch is dealt out evenly, so that every rank gets len(self) indices
        tail = sorted(indices[full:], key=lambda i: self.lengths[i])[self.rank :: self.world_size]
        return [i for batch in batches for i in batch[mine]] + tail

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.shard()[start:])

    def __len__(self) -> int:
        return self.num_samples // self.world_size
