import math
from collections import Counter

import pytest
import torch

from mosld.data.sampling import TemperatureSampler, temperature_probabilities


def test_probabilities_follow_n_to_the_one_over_t():
    sizes = [900, 100, 16]
    assert temperature_probabilities(sizes, 1.0) == pytest.approx([n / 1016 for n in sizes])
    roots = [30.0, 10.0, 4.0]  # sqrt of the sizes: T = 2
    assert temperature_probabilities(sizes, 2.0) == pytest.approx([r / 44.0 for r in roots])
    assert temperature_probabilities(sizes, math.inf) == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_rejects_non_positive_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        temperature_probabilities([10, 20], bad)


def test_rejects_an_empty_task():
    with pytest.raises(ValueError, match="sizes"):
        TemperatureSampler([10, 0])


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_task_frequencies_match_temperature_within_sampling_error(temperature):
    sizes = [2000, 300, 40]
    draws = 30000
    sampler = TemperatureSampler(sizes, temperature, num_samples=draws, seed=3)
    offsets = [0, 2000, 2300, 2340]
    counts = Counter(next(t for t in range(3) if offsets[t] <= i < offsets[t + 1]) for i in sampler)
    expected = [n ** (1 / temperature) for n in sizes]
    for task, p in enumerate(e / sum(expected) for e in expected):
        sigma = math.sqrt(draws * p * (1 - p))
        assert abs(counts[task] - draws * p) < 4 * sigma, (task, counts, p)


def test_a_task_is_covered_before_any_example_repeats():
    sampler = TemperatureSampler([50], num_samples=120, seed=1)
    indices = list(sampler)
    assert sorted(indices[:50]) == list(range(50))
    assert sorted(indices[50:100]) == list(range(50))
    assert indices[:50] != indices[50:100]  # reshuffled each pass


def test_deterministic_given_seed_and_epoch():
    a, b = TemperatureSampler([30, 70], seed=5), TemperatureSampler([30, 70], seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(TemperatureSampler([30, 70], seed=6)) != list(b)


def test_two_ranks_get_disjoint_shards_that_together_are_the_epoch():
    sizes, num_samples = [40, 17, 9], 65  # odd: one draw is dropped so both ranks get 32
    ranks = [TemperatureSampler(sizes, 2.0, num_samples, seed=11, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4)
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == 32
    full = ranks[0].global_indices()
    assert full == ranks[1].global_indices()  # every rank draws the same global sequence
    # Disjoint positions of that sequence, and together all of it but the dropped remainder.
    interleaved = [i for pair in zip(*shards, strict=True) for i in pair]
    assert interleaved == full[:64]
    # One pass over a single task repeats no example, so there the shards are disjoint, complete sets.
    first, second = (set(TemperatureSampler([64], seed=2, rank=r, world_size=2)) for r in range(2))
    assert not first & second
    assert first | second == set(range(64))


def test_rank_must_be_below_world_size():
    with pytest.raises(ValueError, match="rank"):
        TemperatureSampler([5], rank=2, world_size=2)


def test_start_at_skips_into_this_ranks_shard_for_one_iteration_only():
    sampler = TemperatureSampler([5, 7], temperature=2.0, num_samples=20, seed=3, rank=1, world_size=2)
    shard = list(sampler)
    sampler.start_at(4)
    assert list(sampler) == shard[4:]
    assert list(sampler) == shard  # the next epoch starts at its beginning
    assert len(sampler) == 10
    with pytest.raises(ValueError, match="position: expected 0 <= position <= 10"):
        sampler.start_at(11)


def _grouped(lengths, world_size=1, rank=0, seed=0, epoch=0, num_samples=None, group_batches=4):
    sampler = TemperatureSampler(
        [len(lengths) // 2, len(lengths) - len(lengths) // 2], 1.0, num_samples, seed, rank, world_size,
        lengths=lengths, batch_size=4, group_batches=group_batches,
    )  # fmt: skip
    sampler.set_epoch(epoch)
    return sampler


def _padding(order, lengths, batch_size=4):
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for i in order) / padded


def test_length_grouping_keeps_the_draws_and_cuts_padding():
    lengths = [int(x) for x in torch.randint(5, 250, (200,), generator=torch.Generator().manual_seed(0))]
    grouped, plain = _grouped(lengths), _grouped(lengths, group_batches=1)
    assert sorted(grouped) == sorted(plain)  # the same examples, only batched differently
    assert _padding(list(grouped), lengths) < 0.5 * _padding(list(plain), lengths)
    assert list(_grouped(lengths)) == list(grouped)  # deterministic per (seed, epoch)
    assert list(_grouped(lengths, epoch=1)) != list(grouped)
    # a pool of 4 batches holds the draws of 16 consecutive positions of the plain sequence
    draws = plain.global_indices()
    assert sorted(list(grouped)[:16]) == sorted(draws[:16])


def test_length_grouped_shards_are_whole_batches_of_one_global_sequence():
    lengths = [int(x) for x in torch.randint(5, 250, (90,), generator=torch.Generator().manual_seed(1))]
    shards = [list(_grouped(lengths, world_size=2, rank=r, num_samples=90)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 45  # 5 full batches of 4 each, then the short tail dealt out
    single = _grouped(lengths, world_size=2, num_samples=90)
    assert sorted(shards[0] + shards[1]) == sorted(single.global_indices())


def test_length_grouped_sampler_resumes_mid_epoch():
    lengths = list(range(1, 81))
    sampler = _grouped(lengths)
    full = list(sampler)
    sampler.start_at(12)
    assert list(sampler) == full[12:]
    assert list(sampler) == full  # only the next pass is shifted


def test_length_grouped_ranks_train_on_the_global_batches_of_one_process():
    lengths = [int(x) for x in torch.randint(5, 250, (300,), generator=torch.Generator().manual_seed(2))]

    def sampler(batch_size, world_size=1, rank=0):
        return TemperatureSampler([150, 150], 2.0, 256, 5, rank, world_size, lengths=lengths,
                                  batch_size=batch_size, group_batches=4)  # fmt: skip

    one = list(sampler(8))
    ranks = [list(sampler(4, 2, r)) for r in range(2)]
    for b in range(0, 256, 8):  # global batch b // 8: rank 0's batch, then rank 1's, is the one process's
        assert ranks[0][b // 2 : b // 2 + 4] + ranks[1][b // 2 : b // 2 + 4] == one[b : b + 8]
