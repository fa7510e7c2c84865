"""Write samples into WebDataset tar shards, deterministically (fixed mtime, owner, order), and the
manifest beside them. Every data_prep script writes through this."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Self

from t2i.data.manifest import ShardInfo, write_manifest


class ShardWriter:
    """`with ShardWriter(folder, max_count=5000) as w: w.write("000000001", {"png": b"...", "txt": "a"})`.

    Shards are named ``{prefix}-{index:06d}.tar``; each is written to a temp name and renamed when
    complete, so a crash never leaves a half shard under a final name. `close()` writes manifest.json.
    """

    def __init__(self, folder: str | Path, max_count: int = 5000, prefix: str = "shard", **manifest_meta):
        if max_count < 1:
            raise ValueError("max_count must be >= 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_count = max_count
        self.prefix = prefix
        self.meta = manifest_meta
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open_next(self) -> None:
        self._close_current()
        final = self.folder / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = final.with_suffix(".tar.tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - kept open across writes
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self._tmp.with_suffix("")
        self._tmp.replace(final)
        self.shards.append(ShardInfo(str(final), self._count))
        self._tar, self._tmp = None, None

    def write(self, key: str, fields: dict[str, bytes | str]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key must not contain '.' or '/': {key!r}")
        if self._tar is None or self._count >= self.max_count:
            self._open_next()
        for field in sorted(fields):
            data = fields[field]
            if isinstance(data, str):
                data = data.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = "t2i"
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> Path:
        self._close_current()
        return write_manifest(self.folder, self.shards, **self.meta)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no partial shard under any name
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
