"""`ResumableLoader`: what Lightning iterates. It wraps a DataLoader over a `ShardStream`, counts the
batches it hands out and the samples that were skipped, and saves/restores its position.

Lightning saves the state of any train loader with `state_dict`/`load_state_dict` in the checkpoint
and restores it before iterating again. Because the loader has a length, Lightning does not prefetch
ahead of the training step, so "batches handed out" equals "batches trained" whenever a checkpoint is
written.

Elastic resume: a run resumed with another world size, number of loader workers, per-device batch size or
shuffle window continues the same epoch. The samples the earlier layout had delivered are worked out from the
plan (a pure function), and the rest of the epoch is planned anew over the new layout: none repeated, fewer than
one new global batch left out. The epoch keeps the new layout's length; the loader's position becomes that
length minus the rest's batches, and ``on_relayout(shift)`` moves the trainer's batch count by as much. Only a
changed dataset, seed or bucket set cannot continue and is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import PurePosixPath

import torch
from torch.utils.data import DataLoader

from t2i.data.manifest import DataError
from t2i.data.plan import Layout
from t2i.data.stream import ShardStream

log = logging.getLogger("t2i.data")

PLAN_KEYS = ("world_size", "num_workers", "batch_size", "shuffle_window")  # may change on resume


@dataclass
class SkipStats:
    """Skipped samples, counted in the main process (exact with any number of workers)."""

    planned: int = 0  # samples the plan handed to this rank so far
    skipped: int = 0
    by_shard: Counter = field(default_factory=Counter)
    by_reason: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # a few (url, key, reason)

    def add(self, planned: int, skipped: list[tuple[str, str, str]]) -> None:
        self.planned += planned
        self.skipped += len(skipped)
        for url, key, reason in skipped:
            self.by_shard[url] += 1
            self.by_reason[reason.split(" (")[0]] += 1
            if len(self.examples) < 20:
                self.examples.append((url, key, reason))

    @property
    def fraction(self) -> float:
        return self.skipped / self.planned if self.planned else 0.0

    def report(self, limit: int = 5) -> str:
        shards = ", ".join(f"{u} ({n})" for u, n in self.by_shard.most_common(limit))
        reasons = ", ".join(f"{r}: {n}" for r, n in self.by_reason.most_common(limit))
        return f"{self.skipped} of {self.planned} samples skipped; worst shards: {shards}; reasons: {reasons}"

    def state_dict(self) -> dict:
        d = asdict(self)
        d["by_shard"], d["by_reason"] = dict(self.by_shard), dict(self.by_reason)
        return d

    def load_state_dict(self, d: dict) -> None:
        self.planned, self.skipped = int(d["planned"]), int(d["skipped"])
        self.by_shard, self.by_reason = Counter(d["by_shard"]), Counter(d["by_reason"])
        self.examples = [tuple(e) for e in d["examples"]]


class ResumableLoader:
    def __init__(self, stream: ShardStream, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, max_skip_fraction: float = 0.05,
                 min_samples_for_check: int = 1000, name: str = "train"):
        expected = max(1, num_workers)
        if stream.layout.num_workers != expected:
            raise ValueError(f"stream layout has {stream.layout.num_workers} workers, loader {num_workers}")
        self.stream = stream
        self.name = name
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.max_skip_fraction = max_skip_fraction
        self.min_samples_for_check = min_samples_for_check
        self.stats = SkipStats()
        self.on_relayout: Callable[[int], None] | None = None  # told how far an elastic resume moved the position
        self._next = (0, 0)  # (epoch, batch) where the next iter() starts
        self._epoch, self._delivered = 0, 0
        # this epoch's earlier parts under other layouts ((layout key, batches), oldest first), and the batch
        # index where the current part began
        self._legs: list[dict] = []
        self._leg_start = 0

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        epoch, start = self._next
        self._next = (epoch + 1, 0)
        if epoch != self._epoch:  # an epoch's earlier parts belong to it alone
            self._legs, self._leg_start = [], 0
        self._epoch, self._delivered = epoch, start
        if start >= len(self.stream):
            return
        self.stream.set_position(epoch, start - self._leg_start, self._earlier())
        # an own generator: creating the iterator must not draw from the global RNG (exact resume)
        seed = self.stream.layout.seed * 1_000_003 + epoch
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                            persistent_workers=False, generator=torch.Generator().manual_seed(seed))
        for batch in loader:
            skipped = batch.pop("skipped")
            self.stats.add(len(batch["key"]) + len(skipped), skipped)
            self._check_skips()
            self._delivered += 1
            yield batch

    def _check_skips(self) -> None:
        s = self.stats
        if s.skipped and s.planned >= self.min_samples_for_check and s.fraction > self.max_skip_fraction:
            raise DataError(f"{self.name} data: {s.fraction:.1%} of samples are unusable, above the limit "
                            f"max_skip_fraction={self.max_skip_fraction}. {s.report()}")

    def _layout_key(self) -> dict:
        """The plan's inputs: `PLAN_KEYS` may differ on resume (elastic), the others may not."""
        lay, stream = self.stream.layout, self.stream
        digest = hashlib.sha256(repr([(PurePosixPath(u).name, n) for u, n in zip(stream.urls, stream.counts)])
                                .encode()).hexdigest()[:16]  # shard names and sizes: the folder may move
        key = {"world_size": lay.world_size, "num_workers": lay.num_workers, "batch_size": lay.batch_size,
               "shuffle_window": lay.shuffle_window, "seed": lay.seed, "total": stream.total, "shards": digest}
        if stream.buckets:  # another bucket set is another plan
            key["buckets"] = [list(b) for b in stream.buckets]
        return key

    def _earlier(self) -> tuple[tuple[Layout, int], ...]:
        lay = self.stream.layout
        return tuple((replace(lay, rank=0, **{k: int(leg["layout"].get(k, getattr(lay, k))) for k in PLAN_KEYS}),
                      int(leg["batches"])) for leg in self._legs)

    def state_dict(self) -> dict:
        epoch, batch, legs, leg_start = self._epoch, self._delivered, self._legs, self._leg_start
        if batch >= len(self):
            epoch, batch, legs, leg_start = epoch + 1, 0, [], 0
        return {"epoch": epoch, "batch": batch, "layout": self._layout_key(), "legs": [dict(g) for g in legs],
                "leg_start": leg_start, "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state["layout"], self._layout_key()
        fixed = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
                 if k not in PLAN_KEYS and saved.get(k) != now.get(k)
                 and (k in saved or k not in ("shards", "shuffle_window"))}  # older checkpoints lack these two
        if fixed:
            raise DataError(f"cannot continue the {self.name} data stream's epoch: its samples or their order "
                            f"changed (saved, now): {fixed}. A run resumes with the same data, seed and "
                            f"buckets (world size, workers and batch size may change); for other data start "
                            f"a fresh run from the weights.")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        legs, leg_start = [dict(g) for g in state.get("legs", [])], int(state.get("leg_start", 0))
        changed = {k: (saved[k], now[k]) for k in PLAN_KEYS if k in saved and saved[k] != now[k]}
        if changed and (batch or legs):  # mid-epoch under another layout: plan the rest of the epoch anew
            legs.append({"layout": {k: saved[k] for k in PLAN_KEYS if k in saved}, "batches": batch - leg_start})
            self._legs = legs
            self.stream.set_position(epoch, 0, self._earlier())
            rest = self.stream.leg_batches()
            leg_start = len(self) - rest
            message = (f"{self.name} data: resuming epoch {epoch} with another layout {changed} (saved, now): "
                       f"{self.stream.total - len(self.stream.remainder)} samples were delivered, the other "
                       f"{len(self.stream.remainder)} make this rank's {rest} remaining batches (at batch "
                       f"{leg_start} of {len(self)})")
            log.warning(message)
            if self.on_relayout is not None:
                self.on_relayout(leg_start - batch)
            batch = leg_start
        self._next = (epoch, batch)
        self._epoch, self._delivered = self._next
        self._legs, self._leg_start = legs, leg_start
        self.stats.load_state_dict(state["stats"])
