"""Read a range of samples from one WebDataset tar shard, through webdataset's own tar iteration.

A sample is a run of consecutive members sharing a key (``000000017.jpg``, ``000000017.txt``...), keys
split the WebDataset way (`sample_key`); members whose key starts with ``_`` are not samples.
`webdataset.tariterators.tar_file_iterator` reads the members (any compression ``tarfile`` detects; ``pipe:``
urls opened by `webdataset.gopen`). t2i groups them itself rather than with webdataset's `group_by_keys`, and
passes a handler that stops at the first error instead of skipping on: the plan asks for samples by position,
and webdataset's grouping and error handlers lose position (a member it cannot group, or a sample cut
short, simply is not there). Here exactly ``last - first`` items come out; whatever cannot be read - a
truncated or corrupt tar, a shard shorter than its manifest says - is a `RawSample` with an `error`, one per
missing sample, so that no loss is ever silent.

Samples before `first` are passed over without reading their data: in a local shard by a walk over the
member headers (tarfile seeks over each member's data) to the first member of sample `first`, where
webdataset's iteration then starts; in a ``pipe:`` stream (which cannot seek) by webdataset's member filter,
which sees each name before the data is read.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from webdataset.gopen import Pipe, gopen
from webdataset.tariterators import tar_file_iterator

from t2i.data.manifest import sample_key

# tarfile's stream mode (webdataset's) asks its source for 10 KiB at a time: through a buffer this large those
# reads are copies, and the extra cost over random access on ~100 KB members more than halves.
_BUFFER = 1 << 20


@dataclass
class RawSample:
    url: str
    index: int  # position of the sample within its shard
    key: str = ""
    fields: dict[str, bytes] = field(default_factory=dict)
    error: str = ""


class _PastRange(Exception):
    """Raised by the member filter at the first member of sample `last`: ends webdataset's iteration there,
    before that member's data (or anything after it) is read."""


class _Members:
    """webdataset's ``select_files`` filter. It is called with every member name in tar order before the
    member's data is read, so it is what numbers the samples: it starts a `RawSample` at each new key from
    `first` on, selects the members of those samples (of the `wanted` fields only, when given), and stops
    the iteration at the first member of sample `last`."""

    def __init__(self, url: str, first: int, last: int, index: int, wanted: frozenset[str] | None):
        self.url, self.first, self.last, self.wanted = url, first, last, wanted
        self.index = index - 1  # of the sample in progress; `index`: that of the next key seen
        self.key: str | None = None
        self.started: list[RawSample] = []  # samples begun and not yet handed out, in order

    def __call__(self, name: str) -> bool:
        key, fld = sample_key(name)
        if key.startswith("_"):
            return False
        if key != self.key:
            self.key, self.index = key, self.index + 1
            if self.index >= self.last:
                raise _PastRange
            if self.index >= self.first:
                self.started.append(RawSample(self.url, self.index, key))
        return self.index >= self.first and (self.wanted is None or fld in self.wanted)

    def take_done(self) -> list[RawSample]:
        """The samples begun before the one in progress: whole, since a later key has been seen."""
        done, self.started[:-1] = self.started[:-1], []
        return done


def _open(url: str):
    """A readable binary stream: ``pipe:`` through webdataset's `gopen` (a shell command, as WebDataset
    runs it), anything else a local file, unbuffered (`read_samples` adds the buffer once past the samples
    it skips: a buffer would read the data that the header walk seeks over). Local paths do not go through
    `gopen`: it would read a ``:`` in a relative path as a url scheme."""
    if url.startswith("pipe:"):
        return gopen(url, "rb", bufsize=_BUFFER)
    return open(url, "rb", buffering=0)


def _close(stream) -> None:
    """Close without raising: a pipe stopped before its end exits on SIGPIPE (or is killed here, so that a
    stalled download cannot hold the worker); its exit status says nothing the sample count has not said."""
    if isinstance(stream, Pipe):
        stream.ignore_errors = True
        stream.proc.kill()
    try:
        stream.close()
    except OSError:
        pass


def _seek_sample(f, first: int) -> int | BaseException | None:
    """Move the local shard file `f` to the header of sample `first`'s first member, reading headers only.

    Returns the index of the sample `f` now starts at: `first`, or 0 where seeking cannot be trusted (not an
    uncompressed tar, or global pax headers that a reader starting mid-archive would miss: `f` is back at the
    start). None when the shard ends before sample `first` (quietly: tarfile also stops quietly at a cut or
    corrupt header past the first), the error when it breaks before it: no sample from `first` on is readable.
    """
    try:
        tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - leaves `f` open, holds nothing else
    except (tarfile.TarError, OSError, EOFError):
        f.seek(0)  # compressed, or broken at the very start: webdataset's reader says which
        return 0
    try:
        for seen, member in _sample_starts(tar):
            if seen == first:
                if tar.pax_headers:
                    f.seek(0)
                    return 0
                f.seek(member.offset)  # the member's first header block (before any long-name or pax block)
                return first
    except (tarfile.TarError, OSError, EOFError) as e:
        return e
    return None


def _sample_starts(tar: tarfile.TarFile) -> Iterator[tuple[int, tarfile.TarInfo]]:
    """(index, first member) of each sample of `tar`, reading headers only."""
    seen, key = -1, None
    for member in tar:
        if not member.isfile():
            continue
        k, _ = sample_key(member.name)
        if k.startswith("_") or k == key:
            continue
        seen, key = seen + 1, k
        yield seen, member


def sample_offsets(url: str) -> np.ndarray | None:
    """Where each sample of a local shard starts (the byte offset of its first member's header), from one walk
    over the headers, kept per process for the 128 shards used last (and walked again when the file changes): a
    reader that takes samples out of order (aspect-ratio buckets) then seeks to each in one step instead of
    walking the headers before it every time. None where seeking cannot be trusted (a pipe, a compressed tar,
    global pax headers) or the tar breaks."""
    if url.startswith("pipe:"):
        return None
    try:
        stat = os.stat(url)
    except OSError:
        return None
    return _sample_offsets(url, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=128)
def _sample_offsets(url: str, mtime_ns: int, size: int) -> np.ndarray | None:
    try:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            offsets = [member.offset for _, member in _sample_starts(tar)]
            if tar.pax_headers:
                return None
    except (tarfile.TarError, OSError, EOFError):
        return None
    return np.asarray(offsets, dtype=np.int64)


def read_sample(url: str, index: int, fields: frozenset[str] | None = None) -> RawSample:
    """Sample `index` of the shard at `url` alone, seeking straight to it where `sample_offsets` knows where it
    starts (else as `read_samples` does)."""
    (sample,) = read_samples(url, index, index + 1, fields, offsets=sample_offsets(url))
    return sample


def _reason(e: BaseException) -> str:
    text = str(e).split(" @ ")[0]  # webdataset appends " @ <stream>" to the message
    return f"unreadable tar data ({type(e).__name__}: {text})"


SHORT_SHARD = "shard holds fewer samples than its manifest says"


def read_samples(url: str, first: int, last: int, fields: frozenset[str] | None = None,
                 offsets: np.ndarray | None = None) -> Iterator[RawSample]:
    """Yield samples first..last-1 of the shard at `url` (exactly last-first items). With `fields`, only
    members of those fields are read (e.g. no image when none is decoded); the others are passed over.
    `offsets` (`sample_offsets` of a local shard) lets it seek to sample `first` without walking the headers."""
    if first >= last:
        return
    try:
        stream = _open(url)
    except (OSError, ValueError) as e:  # ValueError: gopen refusing a pipe (WDS_SECURE)
        for i in range(first, last):
            yield RawSample(url, i, error=f"cannot open shard: {e}")
        return
    try:
        start = 0
        if not isinstance(stream, Pipe):
            if first > 0 and offsets is not None and first < len(offsets):
                stream.seek(int(offsets[first]))
                start = first
            elif first > 0:
                there = _seek_sample(stream, first)
                if not isinstance(there, int):
                    reason = SHORT_SHARD if there is None else _reason(there)
                    for i in range(first, last):
                        yield RawSample(url, i, error=reason)
                    return
                start = there
            stream = io.BufferedReader(stream, _BUFFER)  # reads on from where the raw file stands
        index = first  # of the next sample to come out
        members = _Members(url, first, last, start, fields)
        errors: list[BaseException] = []

        def stop(e: BaseException) -> bool:  # webdataset's handler: False ends the iteration
            errors.append(e)
            return False

        try:
            for member in tar_file_iterator(stream, skip_meta=None, handler=stop, select_files=members):
                for sample in members.take_done():
                    yield sample
                    index += 1
                members.started[-1].fields[sample_key(member["fname"])[1]] = member["data"]
        except (OSError, tarfile.TarError, EOFError) as e:  # raised while reading a header: a broken tar
            errors.append(e)
        problem = next((e for e in errors if not isinstance(e, _PastRange)), None)
        # at a clean or quiet end (or sample `last`) every sample begun is whole; at an error the one in
        # progress lost its remaining members, or the one being read
        for sample in members.started if problem is None else members.take_done():
            yield sample
            index += 1
        if problem is None:
            reason = SHORT_SHARD
        elif start == 0 and members.key is None:  # nothing read: the tar could not even be opened
            reason = f"cannot open shard: {str(problem).split(' @ ')[0]}"
        else:
            reason = _reason(problem)
        for i in range(index, last):
            yield RawSample(url, i, error=reason)
    finally:
        _close(stream)
