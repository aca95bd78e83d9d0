"""Length-grouped sampling: a permutation, grouped, deterministic per (seed, epoch), resumable."""

import itertools
import random

import pytest
import torch
from torch.utils.data import DataLoader

from lrft.data.sampling import LengthGroupedSampler
from lrft.errors import UserError


def lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(512, 8 + int(rng.paretovariate(1.2) * 20)) for _ in range(n)]


def padded_tokens(batches: list[list[int]], lens: list[int]) -> int:
    return sum(max(lens[i] for i in b) * len(b) for b in batches)


@pytest.mark.parametrize("n", [1000, 997])  # with and without a partial last batch
def test_a_permutation_cut_into_the_loaders_batches(n):
    lens, bs = lengths(n), 8
    sampler = LengthGroupedSampler(lens, bs, seed=3, mega=10)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(len(b) == bs for b in batches[:-1]) and len(batches[-1]) == (n % bs or bs)
    loader = DataLoader(list(range(n)), batch_size=bs, sampler=sampler)
    assert [b.tolist() for b in loader] == batches
    assert len(sampler) == n
    # the batch with the epoch's longest example first (fails fast if it does not fit)
    assert max(lens[i] for i in batches[0]) == max(lens)


def test_grouping_cuts_padding_and_keeps_the_order_random():
    lens, bs = lengths(2000), 8
    grouped = LengthGroupedSampler(lens, bs, seed=0).batches()
    perm = torch.randperm(len(lens), generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [perm[i : i + bs] for i in range(0, len(perm), bs)]
    assert padded_tokens(grouped, lens) < 0.6 * padded_tokens(random_batches, lens)
    # batches are not sorted globally: long and short batches alternate
    maxima = [max(lens[i] for i in b) for b in grouped[1:]]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_deterministic_per_seed_and_epoch():
    lens = lengths(500)
    a, b = LengthGroupedSampler(lens, 4, seed=5), LengthGroupedSampler(lens, 4, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.use_epoch(1)
    assert list(a) != first
    b.use_epoch(1)
    assert list(a) == list(b)
    assert list(LengthGroupedSampler(lens, 4, seed=6)) != first


def test_resume_skips_consumed_batches_exactly():
    """The loop's contract: use_epoch(epoch), then skip the batches already done."""
    lens, bs, done = lengths(300), 4, 17
    full = LengthGroupedSampler(lens, bs, seed=1)
    full.use_epoch(2)
    whole = [b.tolist() for b in DataLoader(list(range(300)), batch_size=bs, sampler=full)]
    resumed = LengthGroupedSampler(lens, bs, seed=1)  # a fresh process
    resumed.use_epoch(2)
    loader = DataLoader(list(range(300)), batch_size=bs, sampler=resumed)
    assert [b.tolist() for b in itertools.islice(loader, done, None)] == whole[done:]


def test_bad_batch_size_is_a_user_error():
    with pytest.raises(UserError, match="batch_size"):
        LengthGroupedSampler([1, 2, 3], 0, seed=0)
