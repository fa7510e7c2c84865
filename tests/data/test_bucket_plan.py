"""The bucketed epoch plan: one bucket per batch, the same bucket on every rank at every step, equal batch counts,
no sample twice, fewer than one global batch left out per bucket, and a pure function of its inputs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from t2i.data.bucket_plan import global_batches, rank_batches, worker_batches
from t2i.data.plan import Layout


def bucket_ids(n: int = 1000, buckets: int = 5, seed: int = 0) -> np.ndarray:
    """Skewed bucket sizes, as real data has (most images near square)."""
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05][:buckets])
    return np.random.default_rng(seed).choice(buckets, size=n, p=p / p.sum())


@pytest.mark.parametrize(("world", "batch", "workers"), [(1, 8, 1), (2, 4, 2), (3, 5, 1), (4, 3, 3)])
def test_training_batches_are_equal_in_number_and_bucket_across_ranks(world, batch, workers):
    ids = bucket_ids()
    per_rank = [rank_batches(ids, Layout(world, r, workers, batch, seed=7), epoch=2) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) > 0  # no DDP hang
    seen = []
    for step in zip(*per_rank):
        assert len({b.bucket for b in step}) == 1  # every rank in the same bucket at the same step
        for b in step:
            assert len(b.positions) == batch and {int(ids[p]) for p in b.positions} == {b.bucket}
            seen += b.positions
    assert len(seen) == len(set(seen))  # no sample twice
    left = Counter(int(ids[p]) for p in set(range(len(ids))) - set(seen))
    assert all(n < batch * world for n in left.values())  # fewer than one global batch per bucket left out
    assert len({b.bucket for b in per_rank[0][:10]}) > 1  # buckets interleave: not one bucket after another


def test_the_plan_is_a_pure_function_and_changes_with_the_epoch():
    ids, layout = bucket_ids(), Layout(2, 1, 1, 4, seed=3)
    assert rank_batches(ids, layout, 1) == rank_batches(ids.copy(), layout, 1)
    assert rank_batches(ids, layout, 1) != rank_batches(ids, layout, 2)
    assert rank_batches(ids, layout, 1) != rank_batches(ids, Layout(2, 1, 1, 4, seed=4), 1)


def test_workers_split_the_rank_batches_in_turn():
    ids, layout = bucket_ids(), Layout(2, 0, 3, 4, seed=1)
    rank = rank_batches(ids, layout, 0)
    parts = [worker_batches(ids, layout, 0, w) for w in range(3)]
    assert sum(len(p) for p in parts) == len(rank)
    assert [parts[k % 3][k // 3] for k in range(len(rank))] == rank  # DataLoader asks its workers in turn


def test_validation_holds_every_sample_once():
    ids = bucket_ids(n=333)
    world, batch = 3, 8
    per_rank = [rank_batches(ids, Layout(world, r, 1, batch, drop_last=False, shuffle=False), 0) for r in range(world)]
    positions = [p for batches in per_rank for b in batches for p in b.positions]
    assert sorted(positions) == list(range(len(ids)))
    assert all({int(ids[p]) for p in b.positions} == {b.bucket} for batches in per_rank for b in batches)
    assert max(len(b) for b in per_rank) - min(len(b) for b in per_rank) <= 1
    whole = global_batches(ids, Layout(1, 0, 1, batch, drop_last=False, shuffle=False), 0)
    assert [b.bucket for b in whole] == sorted(b.bucket for b in whole)  # bucket by bucket, in position order
