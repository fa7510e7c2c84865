"""The epoch plan of a bucketed split: which samples each (rank, worker) batch holds, when every batch is of one
aspect-ratio bucket, as pure functions of (seed, epoch, rank, world size) and the samples' buckets.

The split's samples, in the epoch's shard order, are positions 0..N-1 of one virtual sequence (as in
`t2i.data.plan`), each with a bucket id (`t2i.data.buckets.nearest_bucket` of its size). Training: each
bucket's positions are shuffled and cut into global batches of ``batch_size * world_size`` (fewer than one global
batch per bucket is left out, a different part each epoch); the global batches of all buckets are shuffled into
one order, the same on every rank; rank r takes the r-th ``batch_size`` slice of each. So every rank steps
through the same bucket at the same step (one shape per step across ranks, one compiled graph) and all ranks
have the same number of batches (no DDP hang). Validation: every sample once, each bucket's samples cut into
batches of at most ``batch_size`` in position order, dealt to the ranks in turn. Inside a rank, batch k belongs
to loader worker ``k % num_workers``, as in the square plan, so a position (epoch, batches consumed) restores
exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from t2i.data.plan import Layout, seeded_rng


@dataclass(frozen=True)
class BucketBatch:
    bucket: int
    positions: tuple[int, ...]  # positions in the epoch's virtual sequence, in the batch's order


def global_batches(bucket_ids: np.ndarray, layout: Layout, epoch: int) -> list[BucketBatch]:
    """The epoch's batches over all ranks, in step order: training, global batches of ``batch_size *
    world_size``; validation, batches of at most ``batch_size``."""
    ids = np.asarray(bucket_ids)
    size = layout.batch_size * layout.world_size if layout.drop_last else layout.batch_size
    batches = []
    for bucket in np.unique(ids):
        positions = np.flatnonzero(ids == bucket)
        if layout.shuffle and layout.drop_last:
            positions = seeded_rng(layout.seed, epoch, 0xB0C, int(bucket)).permutation(positions)
        stop = len(positions) - len(positions) % size if layout.drop_last else len(positions)
        batches += [BucketBatch(int(bucket), tuple(int(p) for p in positions[i:i + size]))
                    for i in range(0, stop, size)]
    if layout.shuffle and layout.drop_last:
        order = seeded_rng(layout.seed, epoch, 0xB0D).permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches


def rank_batches(bucket_ids: np.ndarray, layout: Layout, epoch: int) -> list[BucketBatch]:
    """This rank's batches of the epoch, in order."""
    batches = global_batches(bucket_ids, layout, epoch)
    if not layout.drop_last:
        return batches[layout.rank::layout.world_size]
    b, r = layout.batch_size, layout.rank
    return [BucketBatch(g.bucket, g.positions[r * b:(r + 1) * b]) for g in batches]


def worker_batches(bucket_ids: np.ndarray, layout: Layout, epoch: int, worker: int) -> list[BucketBatch]:
    """The batches that loader ``worker`` of this rank produces (its rank's batches ``worker``,
    ``worker + num_workers``, ...)."""
    return rank_batches(bucket_ids, layout, epoch)[worker::layout.num_workers]


def delivered_positions(bucket_ids: np.ndarray, layout: Layout, epoch: int, batches_consumed: int) -> np.ndarray:
    """Positions of the samples all ranks had been handed after ``batches_consumed`` training batches each (the
    epoch's first ``batches_consumed`` global batches): what an elastic resume must not repeat."""
    if not layout.drop_last:
        raise ValueError("only a training plan (equal batches on every rank) has a resumable position")
    batches = global_batches(bucket_ids, layout, epoch)[:batches_consumed]
    return np.sort(np.array([p for g in batches for p in g.positions], dtype=np.int64))
