"""Shared fixtures: small shard sets written on the fly (tests make their own data)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i.data.manifest import ShardInfo, write_manifest


def png_bytes(value: int, size: int = 8, mode: str = "RGB") -> bytes:
    arr = np.full((size, size, 3), value % 256, dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for name, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_shard_set(folder: Path, sizes: list[int], image_size: int = 8) -> Path:
    """Shards with the given sample counts; sample key ``s{shard}x{i}`` with caption = key and an
    image whose pixel value encodes its global index."""
    folder.mkdir(parents=True, exist_ok=True)
    infos, g = [], 0
    for s, n in enumerate(sizes):
        samples = []
        for i in range(n):
            key = f"s{s:03d}x{i:05d}"
            samples.append((key, {"png": png_bytes(g, image_size), "txt": key.encode()}))
            g += 1
        path = folder / f"shard-{s:06d}.tar"
        write_tar(path, samples)
        infos.append(ShardInfo(str(path), n))
    return write_manifest(folder, infos)


@pytest.fixture
def shard_set(tmp_path):
    def make(sizes, name="shards", image_size=8):
        return make_shard_set(tmp_path / name, sizes, image_size)
    return make
