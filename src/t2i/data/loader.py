"""`ResumableLoader`: what Lightning iterates. It wraps a DataLoader over a `ShardStream`, counts the
batches it hands out and the samples that were skipped, and saves/restores its position.

Lightning saves the state of any train loader with `state_dict`/`load_state_dict` in the checkpoint
and restores it before iterating again. Because the loader has a length, Lightning does not prefetch
ahead of the training step, so "batches handed out" equals "batches trained" whenever a checkpoint is
written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader

from t2i.data.manifest import DataError
from t2i.data.stream import ShardStream


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
        self._next = (0, 0)  # (epoch, batch) where the next iter() starts
        self._epoch, self._delivered = 0, 0

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        epoch, start = self._next
        self._next = (epoch + 1, 0)
        self._epoch, self._delivered = epoch, start
        self.stream.set_position(epoch, start)
        if start >= len(self.stream):
            return
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
        lay = self.stream.layout
        key = {"world_size": lay.world_size, "num_workers": lay.num_workers,
               "batch_size": lay.batch_size, "seed": lay.seed, "total": self.stream.total}
        if self.stream.buckets:  # another bucket set is another plan
            key["buckets"] = [list(b) for b in self.stream.buckets]
        return key

    def state_dict(self) -> dict:
        epoch, batch = self._epoch, self._delivered
        if batch >= len(self):
            epoch, batch = epoch + 1, 0
        return {"epoch": epoch, "batch": batch, "layout": self._layout_key(), "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state["layout"], self._layout_key()
        if saved != now:
            diff = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
            raise DataError(f"cannot resume the {self.name} data stream exactly: the layout changed "
                            f"(saved, now): {diff}. Resume with the same world size, batch size, "
                            f"num_workers, seed and data, or start a fresh run from the weights.")
        self._next = (int(state["epoch"]), int(state["batch"]))
        self._epoch, self._delivered = self._next
        self.stats.load_state_dict(state["stats"])
