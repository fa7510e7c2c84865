"""The epoch plan: which samples each (rank, worker) reads, in which order, as pure functions.

The shards of a split, taken in an order shuffled per epoch, form one virtual sequence of N samples.
Training keeps the first ``nb * B * world`` of them (``nb = N // (B * world)``: fewer than one global
batch is left out, and a different tail each epoch); validation keeps all N. Rank r owns a contiguous
range; inside it, batch k of the rank belongs to loader worker ``k % W`` (PyTorch's DataLoader asks its
workers in turn), and each worker owns the contiguous sub-range that its batches fill, so every worker
reads its shards sequentially. Samples are shuffled inside windows of S consecutive positions of a
worker's range (the shuffle buffer of WebDataset, made reproducible). Everything is a function of
(seed, epoch, rank, world size, worker), so a position (epoch, batches consumed) restores exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Layout:
    """What the partition of a split depends on, besides the epoch."""

    world_size: int = 1
    rank: int = 0
    num_workers: int = 1  # loader workers; 0 workers in the DataLoader still means one reader
    batch_size: int = 1
    drop_last: bool = True  # training: equal full batches everywhere; validation: every sample once
    shuffle: bool = True
    shuffle_window: int = 2000
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.batch_size < 1 or self.num_workers < 1 or self.shuffle_window < 1:
            raise ValueError(f"batch_size, num_workers and shuffle_window must be >= 1: {self}")


def seeded_rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def shard_order(num_shards: int, layout: Layout, epoch: int) -> np.ndarray:
    """Order in which the shards are concatenated in this epoch (the same on every rank)."""
    if not layout.shuffle:
        return np.arange(num_shards)
    return seeded_rng(layout.seed, epoch, 0x5A4D).permutation(num_shards)


def rank_sample_counts(total: int, layout: Layout) -> list[int]:
    """Samples each rank reads in one epoch."""
    w, b = layout.world_size, layout.batch_size
    if layout.drop_last:
        return [(total // (b * w)) * b] * w
    return [total // w + (r < total % w) for r in range(w)]


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def num_batches(total: int, layout: Layout) -> int:
    """Batches of this rank per epoch (equal on all ranks when drop_last)."""
    return len(batch_sizes(rank_sample_counts(total, layout)[layout.rank], layout.batch_size))


@dataclass(frozen=True)
class WorkerPlan:
    """The part of an epoch that one loader worker produces."""

    start: int  # first position in the epoch's virtual sequence
    batch_sizes: tuple[int, ...]  # its batches, in order
    batch_ids: tuple[int, ...]  # their indices in the rank's batch sequence

    @property
    def num_samples(self) -> int:
        return sum(self.batch_sizes)


def worker_plan(total: int, layout: Layout, worker: int) -> WorkerPlan:
    counts = rank_sample_counts(total, layout)
    sizes = batch_sizes(counts[layout.rank], layout.batch_size)
    start = sum(counts[: layout.rank])
    w = layout.num_workers
    for k in range(worker):  # earlier workers' batches come first in the rank's range
        start += sum(sizes[k::w])
    ids = tuple(range(worker, len(sizes), w))
    return WorkerPlan(start, tuple(sizes[k] for k in ids), ids)


def segments(counts_in_order: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """Positions [start, stop) of the virtual sequence as (index into counts_in_order, first, last)
    ranges of samples within single shards."""
    out, offset = [], 0
    for i, n in enumerate(counts_in_order):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((i, lo - offset, hi - offset))
        offset += n
        if offset >= stop:
            break
    return out


def window_permutation(length: int, layout: Layout, epoch: int, worker: int, window: int) -> np.ndarray:
    """Emission order of the samples of one shuffle window (indices into the window)."""
    if not layout.shuffle:
        return np.arange(length)
    return seeded_rng(layout.seed, epoch, layout.rank, layout.world_size, worker, window).permutation(length)


def consumed_by_worker(batches_consumed: int, num_workers: int, worker: int) -> int:
    """How many of its own batches `worker` had delivered when the rank had delivered `batches_consumed`."""
    return len(range(worker, batches_consumed, num_workers))


def delivered_positions(total: int, layout: Layout, epoch: int, batches_consumed: int) -> np.ndarray:
    """Positions (into the epoch's virtual sequence of ``total``) of the samples that all ranks together had been
    handed when each had delivered ``batches_consumed`` training batches: what an elastic resume must not repeat."""
    if not layout.drop_last:
        raise ValueError("only a training plan (equal batches on every rank) has a resumable position")
    taken = []
    for rank in range(layout.world_size):
        lay = replace(layout, rank=rank)
        for worker in range(lay.num_workers):
            plan = worker_plan(total, lay, worker)
            emitted = sum(plan.batch_sizes[:consumed_by_worker(batches_consumed, lay.num_workers, worker)])
            window = lay.shuffle_window
            for win in range(-(-emitted // window)):
                lo = win * window
                perm = window_permutation(min(window, plan.num_samples - lo), lay, epoch, worker, win)
                taken.append(plan.start + lo + perm[:emitted - lo])
    return np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
