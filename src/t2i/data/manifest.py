"""The shard manifest: which tar shards make a split and how many samples each holds.

`manifest.json` sits beside the shards::

    {"format": "t2i-shards/1", "total": 50000,
     "shards": [{"url": "shard-000000.tar", "num_samples": 5000}, ...]}

Relative urls are resolved against the manifest's folder. A url may also be an absolute path or a
``pipe:`` command (WebDataset's convention, e.g. ``pipe:aws s3 cp s3://b/x.tar -``).
Sample counts are what make an exact, evenly split stream possible without reading the data first.
Other top-level keys are information only, e.g. make_manifest.py's ``"damaged"``: the shards listed with
only the samples readable before their damage (`scan_shard`).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT = "t2i-shards/1"


class DataError(RuntimeError):
    """A data problem that must stop a run before (or while) it trains: names the file."""


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int
    # (height, width) of each sample's image in shard order, (0, 0) where it has none: what aspect-ratio
    # buckets are planned from without reading the images (data_prep/make_manifest.py --sizes)
    sizes: tuple[tuple[int, int], ...] | None = None

    @property
    def is_pipe(self) -> bool:
        return self.url.startswith("pipe:")


@dataclass(frozen=True)
class Manifest:
    shards: tuple[ShardInfo, ...]
    source: str = ""
    # the aspect-ratio buckets its derived arrays were computed for (data_prep/encode_latents.py --bucket-area):
    # each sample's latent has its bucket's shape, so only that bucket set can batch them
    buckets: tuple[tuple[int, int], ...] | None = None

    @property
    def total(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def check_files_exist(self) -> None:
        missing = [s.url for s in self.shards if not s.is_pipe and not Path(s.url).is_file()]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise DataError(f"{len(missing)} shard(s) listed in {self.source} do not exist: "
                            f"{', '.join(missing[:5])}{more}")


def _resolve(url: str, root: Path) -> str:
    if url.startswith("pipe:") or "://" in url or Path(url).is_absolute():
        return url
    return str(root / url)


def load_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Read a manifest (the json file or the folder holding it); raise DataError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"manifest not found: {path} (write one with data_prep/make_manifest.py)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"manifest {path} is not valid JSON: {e}") from e
    if raw.get("format") != FORMAT:
        raise DataError(f"manifest {path} has format {raw.get('format')!r}, expected {FORMAT!r}")
    entries = raw.get("shards") or []
    if not entries:
        raise DataError(f"manifest {path} lists no shards")
    shards = []
    for e in entries:
        if "://" in e["url"]:
            raise DataError(f"manifest {path}: {e['url']} is a URL; give remote shards as a pipe command, "
                            f"e.g. 'pipe:curl -sL {e['url']}' or 'pipe:aws s3 cp {e['url']} -'")
        n = int(e["num_samples"])
        if n < 0:
            raise DataError(f"manifest {path}: negative num_samples for {e['url']}")
        sizes = e.get("sizes")
        if sizes is not None:
            if len(sizes) != n or not all(isinstance(s, list) and len(s) == 2 for s in sizes):
                raise DataError(f"manifest {path}: {e['url']} lists {len(sizes)} image sizes for {n} samples "
                                f"(each [height, width]): rewrite it with data_prep/make_manifest.py --sizes")
            sizes = tuple((int(h), int(w)) for h, w in sizes)
        shards.append(ShardInfo(_resolve(e["url"], path.parent), n, sizes))
    buckets = raw.get("buckets")
    if buckets is not None:
        buckets = tuple((int(h), int(w)) for h, w in buckets)
    manifest = Manifest(tuple(shards), source=str(path), buckets=buckets)
    if manifest.total == 0:
        raise DataError(f"manifest {path} lists {len(shards)} shard(s) holding no samples")
    if check_files:
        manifest.check_files_exist()
    return manifest


def stored_url(url: str, folder: str | Path) -> str:
    """`url` as a manifest in `folder` stores it: relative to `folder` when inside it, else absolute
    (pipe commands and URLs unchanged)."""
    if url.startswith("pipe:") or "://" in url:
        return url
    try:
        return str(Path(url).resolve().relative_to(Path(folder).resolve()))
    except ValueError:
        return str(Path(url).resolve())


def write_manifest(folder: str | Path, shards: list[ShardInfo], **meta) -> Path:
    """Write `manifest.json` into `folder`; urls inside `folder` are stored relative to it."""
    folder = Path(folder)
    entries = [{"url": stored_url(s.url, folder), "num_samples": s.num_samples,
                **({"sizes": [list(hw) for hw in s.sizes]} if s.sizes is not None else {})} for s in shards]
    body = {**meta, "format": FORMAT, "total": sum(s.num_samples for s in shards), "shards": entries}
    out = folder / MANIFEST_NAME
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def sample_key(member_name: str) -> tuple[str, str]:
    """Split a tar member name into (sample key, field) the WebDataset way: up to the first dot of the
    basename. ``a/b/000001.jpg`` -> (``a/b/000001``, ``jpg``); ``x.clip_img.npy`` -> (``x``, ``clip_img.npy``)."""
    head, _, base = member_name.rpartition("/")
    key, dot, field = base.partition(".")
    return (f"{head}/{key}" if head else key), (field if dot else "")


def _end_problem(tar_path: str | Path, offset: int, last_name: str | None) -> str | None:
    """What is at `offset`, where tarfile stopped without an error: None for a proper end-of-archive block.
    tarfile ends quietly on a cut or corrupt header (anywhere but the first), so this is checked here."""
    with open(tar_path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    if block == tarfile.NUL * tarfile.BLOCKSIZE:
        return None
    where = f"after member {last_name}" if last_name else f"at byte {offset}"
    if not block:
        return f"the file ends without an end-of-archive block {where} (cut between members)"
    if len(block) < tarfile.BLOCKSIZE:
        return f"the file ends inside the header {where} (cut inside a header)"
    return f"unreadable header {where} (corrupt data)"


def scan_shard(tar_path: str | Path) -> tuple[int, str | None]:
    """(samples of a local tar shard that the loader delivers whole, what is wrong with the shard or None),
    read from the member headers only.

    The loader (`t2i.data.tar_reader.read_samples`) completes a sample only when it reads the header that
    follows the sample's last member, or a clean end of the archive: at a cut or corrupt spot the sample in
    progress loses its remaining members (or the member being read). So a damaged shard's count is the
    samples started before the damage minus the one in progress, even where that one might be whole: a tar
    cannot say whether more members of it were to follow.
    """
    started, problem, last_name = 0, None, None
    try:
        size = Path(tar_path).stat().st_size
        with tarfile.open(tar_path, "r:") as tar:
            last_key = None
            for member in tar:
                if member.isfile():
                    key, _ = sample_key(member.name)
                    if not key.startswith("_") and key != last_key:
                        started, last_key = started + 1, key
                    if member.offset_data + member.size > size:
                        problem = (f"the data of {member.name} runs past the end of the file "
                                   f"({member.offset_data + member.size} > {size} bytes: cut inside a member)")
                        break
                last_name = member.name
            else:
                problem = _end_problem(tar_path, tar.offset, last_name)  # tarfile's offset: its next header
    except (OSError, tarfile.TarError, EOFError) as e:
        problem = f"{e}" + (f" after member {last_name}" if last_name else "")
    if problem is None:
        return started, None
    return max(started - 1, 0), problem
