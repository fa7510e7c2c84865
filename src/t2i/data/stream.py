"""`ShardStream`: the IterableDataset that yields whole, collated batches following the epoch plan.

Each batch is a dict: ``image`` (uint8, B x 3 x H x W), ``caption`` (list of str), ``key``, one tensor per
derived array field (with aspect-ratio buckets also ``original_size`` and ``crop_top_left``, B x 2: the image's
own size and where its crop starts, for SDXL's micro-conditioning), and ``skipped``: a list of (shard url, sample key, reason) for the planned samples
that could not be used (the batch is that much smaller; it is never refilled from elsewhere, so the
stream stays a pure function of its position). `ResumableLoader` takes ``skipped`` out and counts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from t2i.data import bucket_plan
from t2i.data import plan as square_plan
from t2i.data.bucket_plan import rank_batches, worker_batches
from t2i.data.buckets import bucket_of
from t2i.data.decode import BadSample, DecodeConfig, decode_sample, fields_used
from t2i.data.manifest import DataError, Manifest
from t2i.data.plan import (
    Layout,
    consumed_by_worker,
    num_batches,
    seeded_rng,
    segments,
    shard_order,
    window_permutation,
    worker_plan,
)
from t2i.data.tar_reader import RawSample, read_sample, read_samples


def collate(samples: list[dict], sources: list[tuple[str, str]], skipped: list[tuple[str, str, str]],
            resolution: int, image_shape: tuple[int, int] | None = None) -> dict:
    """One batch; ``image_shape``: (height, width) of a bucket's images (default: the ``resolution`` square)."""
    batch: dict = {"key": [key for _, key in sources], "caption": [s["caption"] for s in samples], "skipped": skipped}
    if resolution > 0:
        shape = image_shape or (resolution, resolution)
        batch["image"] = (torch.stack([s["image"] for s in samples]) if samples
                          else torch.empty(0, 3, *shape, dtype=torch.uint8))
    names = [k for k in (samples[0] if samples else {}) if k not in ("image", "caption")]
    for name in names:
        batch[name] = torch.stack([s[name] for s in samples])
    return batch


class ShardStream(IterableDataset):
    """``buckets``: (height, width) sizes of aspect-ratio buckets (`t2i.data.buckets`). With them every batch holds
    samples of one bucket (`t2i.data.bucket_plan`), each sample read on its own from its shard; the manifest must
    record each sample's image size (data_prep/make_manifest.py --sizes). Without them: squares of
    ``decode.resolution``, read in order with a shuffle window (`t2i.data.plan`)."""

    def __init__(self, manifest: Manifest, layout: Layout, decode: DecodeConfig,
                 buckets: list[tuple[int, int]] | None = None):
        super().__init__()
        self.urls = [s.url for s in manifest.shards]
        self.counts = [s.num_samples for s in manifest.shards]
        self.total = sum(self.counts)
        self.layout = layout
        self.decode = decode
        self.fields = fields_used(decode)  # members of other fields are passed over unread (an unused image)
        self.epoch = 0
        self.start_batch = 0
        self.remainder: np.ndarray | None = None  # after an elastic resume: the epoch positions not yet delivered
        self.buckets = [tuple(int(v) for v in b) for b in buckets] if buckets else None
        self.bucket_ids: list[np.ndarray] = []
        if manifest.buckets and decode.array_fields and self.buckets != list(manifest.buckets):
            raise DataError(f"the derived arrays of {manifest.source} were computed per aspect-ratio bucket, for "
                            f"the buckets {[list(b) for b in manifest.buckets]}; set data.buckets to that list "
                            f"(now: {self.buckets}) or derive them again for yours")
        if self.buckets:
            unsized = [s.url for s in manifest.shards if s.sizes is None]
            if unsized:
                raise DataError(f"data.buckets needs each sample's image size in the manifest {manifest.source}, "
                                f"which has none for {len(unsized)} shard(s) ({unsized[0]}, ...): rewrite it with "
                                f"data_prep/make_manifest.py --sizes")
            piped = [s.url for s in manifest.shards if s.is_pipe]
            if piped:
                raise DataError(f"data.buckets reads each sample on its own, out of order, but {manifest.source} "
                                f"lists {len(piped)} pipe: shard(s) ({piped[0]}, ...), which would be streamed "
                                f"again for every sample: copy them to local disk, or train without buckets")
            self.bucket_ids = [np.array([bucket_of(hw, self.buckets) for hw in s.sizes], dtype=np.int64)
                               for s in manifest.shards]
        self._len: int | None = None
        self._leg_len: int | None = None
        self._leg_key: tuple = (0, ())  # the (epoch, earlier parts) `remainder` belongs to

    def __len__(self) -> int:
        if self._len is None:  # the same every epoch: each bucket's count does not depend on the order
            self._len = (len(rank_batches(np.concatenate(self.bucket_ids), self.layout, 0)) if self.buckets
                         else num_batches(self.total, self.layout))
        return self._len

    def set_position(self, epoch: int, batches_consumed: int,
                     earlier: tuple[tuple[Layout, int], ...] = ()) -> None:
        """Where the next `iter()` starts: `batches_consumed` batches into `epoch` (set before iter).

        ``earlier``: after an elastic resume, the (layout, batches delivered) of each earlier part of this epoch,
        oldest first, run under another world size, worker count or batch size. This stream then plans only the
        samples those parts had not delivered (`remainder`), with its own layout, and ``batches_consumed`` counts
        batches of that plan (`leg_batches` of them)."""
        if (epoch, earlier) != self._leg_key:  # the loader sets one position twice: when loading, when iterating
            self.remainder = self.undelivered(epoch, earlier) if earlier else None
            self._leg_key, self._leg_len = (epoch, earlier), None
        self.epoch = epoch
        if not 0 <= batches_consumed <= self.leg_batches():
            raise ValueError(f"position {batches_consumed} outside the epoch's {self.leg_batches()} batches")
        self.start_batch = batches_consumed

    def _epoch_bucket_ids(self, epoch: int) -> np.ndarray:
        return np.concatenate([self.bucket_ids[i] for i in shard_order(len(self.urls), self.layout, epoch)])

    def undelivered(self, epoch: int, earlier: tuple[tuple[Layout, int], ...]) -> np.ndarray:
        """Positions of `epoch` that the parts ``earlier`` ((layout, batches delivered), oldest first) left for
        the rest of the epoch; each part planned the samples its predecessors left, as this stream does."""
        rest = np.arange(self.total, dtype=np.int64)
        ids = self._epoch_bucket_ids(epoch) if self.buckets else None
        for layout, batches in earlier:
            if (layout.seed, layout.shuffle) != (self.layout.seed, self.layout.shuffle):
                raise ValueError("an earlier part of the epoch must share the stream's seed and shuffling")
            taken = (bucket_plan.delivered_positions(ids[rest], layout, epoch, batches) if self.buckets
                     else square_plan.delivered_positions(len(rest), layout, epoch, batches))
            rest = np.delete(rest, taken)
        return rest

    def leg_batches(self) -> int:
        """Batches of this rank from the current position's part of the epoch: `len` unless resumed elastically."""
        if self.remainder is None:
            return len(self)
        if self._leg_len is None:
            self._leg_len = (len(rank_batches(self._epoch_bucket_ids(self.epoch)[self.remainder], self.layout,
                                              self.epoch)) if self.buckets
                             else num_batches(len(self.remainder), self.layout))
        return self._leg_len

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = self.layout.num_workers
        if info is None:
            if w != 1:
                raise RuntimeError(f"layout expects {w} loader workers but the stream runs in-process")
            return self._worker_batches(0)
        if info.num_workers != w:
            raise RuntimeError(f"layout expects {w} loader workers, the DataLoader has {info.num_workers}")
        # after a resume at batch k, DataLoader worker 0 must produce batch k: rotate the roles
        return self._worker_batches((info.id + self.start_batch) % w)

    def _raw(self, order: np.ndarray, start: int, stop: int) -> Iterator[RawSample]:
        """The samples at plan indices [start, stop): epoch positions, or indices into `remainder`."""
        counts = [self.counts[i] for i in order]
        if self.remainder is None:
            runs = [(start, stop)]
        else:  # the rest of an elastically resumed epoch: contiguous runs of positions, each read in order
            part = self.remainder[start:stop]
            cuts = np.flatnonzero(np.diff(part) != 1) + 1
            runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(part, cuts) if len(r)]
        return chain.from_iterable(read_samples(self.urls[order[i]], a, b, self.fields)
                                   for lo, hi in runs for i, a, b in segments(counts, lo, hi))

    def _position(self, index: int) -> int:
        """The epoch position of plan index `index`."""
        return index if self.remainder is None else int(self.remainder[index])

    def _worker_batches(self, worker: int) -> Iterator[dict]:
        if self.buckets:
            yield from self._bucket_batches(worker)
            return
        layout, epoch = self.layout, self.epoch
        plan = worker_plan(self.total if self.remainder is None else len(self.remainder), layout, worker)
        done = consumed_by_worker(self.start_batch, layout.num_workers, worker)
        bounds = np.cumsum((0,) + plan.batch_sizes)  # emission positions where batches start
        skip = int(bounds[done])
        size, window = plan.num_samples, layout.shuffle_window
        first_window = skip // window
        raw = self._raw(shard_order(len(self.urls), layout, epoch),
                        plan.start + first_window * window, plan.start + size)
        batch_no, samples, keys, skipped = done, [], [], []
        for win in range(first_window, -(-size // window)):
            lo = win * window
            items = [next(raw) for _ in range(min(window, size - lo))]
            for j, src in enumerate(window_permutation(len(items), layout, epoch, worker, win)):
                pos = lo + j
                if pos < skip:
                    continue
                self._take(items[src], self._position(plan.start + lo + src), samples, keys, skipped)
                if pos + 1 == bounds[batch_no + 1]:
                    samples, keys, skipped = self._consistent(samples, keys, skipped)
                    yield collate(samples, keys, skipped, self.decode.resolution)
                    batch_no, samples, keys, skipped = batch_no + 1, [], [], []

    def _bucket_batches(self, worker: int) -> Iterator[dict]:
        layout, epoch = self.layout, self.epoch
        order = shard_order(len(self.urls), layout, epoch)
        ids = self._epoch_bucket_ids(epoch)
        if self.remainder is not None:
            ids = ids[self.remainder]
        starts = np.cumsum([0] + [self.counts[i] for i in order])
        done = consumed_by_worker(self.start_batch, layout.num_workers, worker)
        for batch in worker_batches(ids, layout, epoch, worker)[done:]:
            bucket = self.buckets[batch.bucket]
            samples, keys, skipped = [], [], []
            for index in batch.positions:
                pos = self._position(index)
                k = int(np.searchsorted(starts, pos, side="right")) - 1
                index = pos - int(starts[k])
                self._take(read_sample(self.urls[order[k]], index, self.fields), pos, samples, keys, skipped, bucket)
            samples, keys, skipped = self._consistent(samples, keys, skipped)
            yield collate(samples, keys, skipped, self.decode.resolution, bucket)

    def _take(self, item: RawSample, position: int, samples: list, keys: list, skipped: list,
              bucket: tuple[int, int] | None = None) -> None:
        """Decode `item` (the epoch's sample at `position`, which seeds its random crop) into `samples` and
        `keys`, or count it in `skipped` with the reason."""
        if item.error:
            skipped.append((item.url, item.key or f"#{item.index}", item.error))
            return
        crop_rng = seeded_rng(self.layout.seed, self.epoch, position, 0xC0) if self.decode.crop == "random" else None
        try:
            samples.append(decode_sample(item.fields, self.decode, crop_rng, bucket))
            keys.append((item.url, item.key))
        except BadSample as e:
            skipped.append((item.url, item.key, str(e)))

    @staticmethod
    def _consistent(samples: list[dict], keys: list[tuple[str, str]], skipped: list) -> tuple[list, list, list]:
        """Drop samples whose derived arrays differ in shape from the batch's first sample."""
        if not samples:
            return samples, keys, skipped
        ref = {k: v.shape for k, v in samples[0].items() if isinstance(v, torch.Tensor)}
        good, good_keys = [], []
        for s, (url, key) in zip(samples, keys):
            bad = [n for n, shp in ref.items() if s[n].shape != shp]
            if bad:
                n = bad[0]
                skipped.append((url, key, f"{n} has shape {tuple(s[n].shape)}, batch has {tuple(ref[n])}"))
            else:
                good.append(s)
                good_keys.append((url, key))
        return good, good_keys, skipped
