"""`ShardDataModule`: the one datamodule every stage trains from (WebDataset shards + manifest)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch

from t2i.data.buckets import bucket_sizes
from t2i.data.decode import IMAGE_FIELDS, DecodeConfig
from t2i.data.loader import ResumableLoader
from t2i.data.manifest import Manifest, load_manifest
from t2i.data.plan import Layout
from t2i.data.stream import ShardStream


def bucket_list(buckets: dict | list | None, resolution: int = 0) -> list[tuple[int, int]] | None:
    """``data.buckets``: null (squares of ``resolution``), a list of [height, width], or the arguments of
    `t2i.data.buckets.bucket_sizes` (``area``, ``multiple``, ``max_ratio``, ``min_fill``); ``area`` defaults to
    ``resolution`` squared."""
    if buckets is None:
        return None
    if isinstance(buckets, Mapping):
        args = dict(buckets)
        if args.get("area") is None:
            if resolution <= 0:
                raise ValueError("data.buckets needs an area (e.g. {area: 65536, multiple: 64}) when "
                                 "data.resolution is 0")
            args["area"] = resolution * resolution
        return bucket_sizes(**args)
    sizes = [tuple(int(v) for v in b) for b in buckets]
    if not sizes or any(len(b) != 2 or min(b) <= 0 for b in sizes):
        raise ValueError(f"data.buckets must list [height, width] pairs of positive sizes, got {buckets}")
    return sizes


class ShardDataModule(L.LightningDataModule):
    """Train and validation streams over shard manifests.

    Batches arrive on the device with ``image`` as float in [-1, 1] (decoded as uint8 in the workers
    and converted after the transfer), ``caption`` (list of str), ``key`` and any derived arrays.
    """

    def __init__(self, train_manifest: str, val_manifest: str | None = None, batch_size: int = 32,
                 val_batch_size: int | None = None, num_workers: int = 2, val_num_workers: int = 0,
                 seed: int = 0, shuffle_window: int = 2000, resolution: int = 64, crop: str = "center",
                 image_fields: tuple[str, ...] = IMAGE_FIELDS, caption_field: str = "txt",
                 caption_required: bool = True, array_fields: tuple[str, ...] = (),
                 array_shapes: tuple | None = None, max_skip_fraction: float = 0.05,
                 min_samples_for_check: int = 1000, pin_memory: bool = False,
                 max_pixels: int = 64_000_000, buckets: dict | list | None = None):
        super().__init__()
        self.buckets = bucket_list(buckets, resolution)
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        for name, value, low in (("batch_size", batch_size, 1), ("val_batch_size", val_batch_size or 1, 1),
                                 ("num_workers", num_workers, 0), ("val_num_workers", val_num_workers, 0),
                                 ("shuffle_window", shuffle_window, 1), ("resolution", resolution, 0),
                                 ("max_pixels", max_pixels, 1)):
            if value < low:
                raise ValueError(f"data.{name} must be >= {low}, got {value}")
        self.train_manifest_path, self.val_manifest_path = train_manifest, val_manifest
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.val_num_workers = num_workers, val_num_workers
        self.seed, self.shuffle_window = seed, shuffle_window
        shapes = tuple(tuple(s) if s is not None else None for s in array_shapes) if array_shapes else ()
        self.decode_train = DecodeConfig(resolution, crop, tuple(image_fields), caption_field,
                                         caption_required, tuple(array_fields), shapes, max_pixels)
        self.decode_val = DecodeConfig(resolution, "center", tuple(image_fields), caption_field,
                                       caption_required, tuple(array_fields), shapes, max_pixels)
        self.max_skip_fraction, self.min_samples_for_check = max_skip_fraction, min_samples_for_check
        self.pin_memory = pin_memory
        self.train_data: Manifest | None = None
        self.val_data: Manifest | None = None
        self.train_loader: ResumableLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the manifests and check every local shard exists, before any training starts."""
        if self.train_data is None:
            self.train_data = load_manifest(self.train_manifest_path)
        if self.val_manifest_path and self.val_data is None:
            self.val_data = load_manifest(self.val_manifest_path)

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def loader(self, manifest: Manifest, train: bool, rank: int | None = None,
               world: int | None = None) -> ResumableLoader:
        """A fresh loader over `manifest` (train: shuffled, equal full batches; else every sample once)."""
        r, w = self._rank_world()
        rank, world = (r if rank is None else rank), (w if world is None else world)
        workers = self.num_workers if train else self.val_num_workers
        layout = Layout(world_size=world, rank=rank, num_workers=max(1, workers),
                        batch_size=self.batch_size if train else self.val_batch_size, drop_last=train,
                        shuffle=train, shuffle_window=self.shuffle_window, seed=self.seed)
        stream = ShardStream(manifest, layout, self.decode_train if train else self.decode_val, self.buckets)
        return ResumableLoader(stream, workers, self.pin_memory, max_skip_fraction=self.max_skip_fraction,
                               min_samples_for_check=self.min_samples_for_check,
                               name="train" if train else "val")

    def train_dataloader(self, rank: int | None = None, world: int | None = None) -> ResumableLoader:
        self.setup("fit")
        self.train_loader = self.loader(self.train_data, True, rank, world)
        if self.trainer is not None:
            self.train_loader.on_relayout = self._move_epoch_position
        if len(self.train_loader) == 0:
            raise ValueError(f"{self.train_manifest_path}: {self.train_data.total} samples make no full "
                             f"global batch of {self.batch_size} x {self._rank_world()[1]} ranks")
        return self.train_loader

    def _move_epoch_position(self, shift: int) -> None:
        """After an elastic resume the loader's position in the epoch moved by `shift` batches (the rest of the
        epoch, planned over the new layout, has another number of batches); move the trainer's count with it, so
        that the epoch ends where the loader's does. Called while Lightning restores the loader, before its
        epoch loop derives the restart position from these counters, all of which move together."""
        current = self.trainer.fit_loop.epoch_loop.batch_progress.current
        for name in ("ready", "started", "processed", "completed"):
            setattr(current, name, max(0, getattr(current, name) + shift))

    def val_dataloader(self, rank: int | None = None, world: int | None = None):
        self.setup("validate")
        if self.val_data is None:
            return []
        return self.loader(self.val_data, False, rank, world)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        image = batch.get("image")
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
            batch["image"] = image.float().div_(127.5).sub_(1.0)
        return batch
