"""Read a range of samples from one WebDataset tar shard, sequentially.

A sample is a run of consecutive members sharing a key (``000000017.jpg``, ``000000017.txt``...).
Samples before `first` are passed over by their headers only (a seek per member on a local file).
Whatever cannot be read - a truncated or corrupt tar, a shard shorter than its manifest says - comes
out as a `RawSample` with an `error`, one per missing sample, so that no loss is ever silent.
"""

from __future__ import annotations

import shlex
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from t2i.data.manifest import sample_key


@dataclass
class RawSample:
    url: str
    index: int  # position of the sample within its shard
    key: str = ""
    fields: dict[str, bytes] = field(default_factory=dict)
    error: str = ""


def _open(url: str):
    """Return (tarfile, closer). Local paths are opened for random access; ``pipe:`` streams."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(shlex.split(url[5:]), stdout=subprocess.PIPE, bufsize=1 << 20)
        tar = tarfile.open(fileobj=proc.stdout, mode="r|")  # noqa: SIM115 - closed by the returned closer

        def close():
            tar.close()
            proc.stdout.close()
            proc.kill()
            proc.wait()

        return tar, close
    tar = tarfile.open(url, mode="r:")  # noqa: SIM115 - closed by the returned closer
    return tar, tar.close


def read_samples(url: str, first: int, last: int) -> Iterator[RawSample]:
    """Yield samples first..last-1 of the shard at `url` (exactly last-first items)."""
    index = first
    try:
        tar, close = _open(url)
    except (OSError, tarfile.TarError) as e:
        for i in range(first, last):
            yield RawSample(url, i, error=f"cannot open shard: {e}")
        return
    try:
        current_key, current, seen = None, None, -1
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, fld = sample_key(member.name)
                if key.startswith("_"):
                    continue
                if key != current_key:
                    if current is not None:
                        yield current
                        index += 1
                        current = None
                    seen += 1
                    current_key = key
                    if seen >= last:
                        break
                    if seen >= first:
                        current = RawSample(url, seen, key)
                if current is not None:
                    f = tar.extractfile(member)
                    current.fields[fld] = f.read() if f is not None else b""
            if current is not None:
                yield current
                index += 1
            missing_reason = "shard holds fewer samples than its manifest says"
        except (OSError, tarfile.TarError, EOFError) as e:  # truncated or corrupt tar
            current = None
            missing_reason = f"unreadable tar data ({type(e).__name__}: {e})"
        for i in range(index, last):
            yield RawSample(url, i, error=missing_reason)
    finally:
        close()
