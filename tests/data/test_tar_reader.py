"""The shard reader (webdataset's `tar_file_iterator` under t2i's plan): any range of a shard - local or piped,
plain or compressed - comes out as exactly its samples, in order, each once; a cut shard loses only what it
really lost, every missing sample counted with a reason; a pipe that fails or is left early is never fatal."""

from __future__ import annotations

import gzip
import io
import random
import tarfile

import pytest

from t2i.data import tar_reader
from t2i.data.tar_reader import read_samples

N = 9


def shard_items(n: int = N, size: int = 600, seed: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    """n samples with data of varied length, a long key now and then (extra header blocks), one without a
    caption and a ``_`` member that is no sample."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        key = (f"sub/{'d' * 110}/" if i % 4 == 1 else "") + f"k{i:03d}"
        items.append((key, {"png": rng.randbytes(rng.randint(0, size)), "txt": f"caption {i}".encode()}))
    del items[6][1]["txt"]
    items.insert(3, ("_meta", {"json": b"{}"}))
    return items


def write(path, items, fmt=tarfile.GNU_FORMAT, **kw) -> None:
    with tarfile.open(path, "w", format=fmt, **kw) as tar:
        for key, fields in items:
            for name, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def rows(samples) -> list[tuple]:
    return [(s.index, s.key, s.fields, s.error) for s in samples]


@pytest.mark.parametrize("kind", ["local", "pipe", "gzip", "gzip pipe", "pax global header"])
def test_every_range_is_those_samples_of_a_whole_read(tmp_path, kind):
    """A worker that starts mid-shard, or resumes, gets what reading through would have given it. Compressed
    shards read because webdataset's iteration detects the compression (a plain-tar reader could not); a
    global pax header before the range is kept by reading from the start."""
    items = shard_items()
    path = tmp_path / "a.tar"
    write(path, items, **({"fmt": tarfile.PAX_FORMAT, "pax_headers": {"comment": "x"}}
                          if kind == "pax global header" else {}))
    if "gzip" in kind:
        path = tmp_path / "a.tar.gz"
        path.write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    url = f"pipe:cat {path}" if "pipe" in kind else str(path)
    whole = list(read_samples(url, 0, N))
    assert [(s.key, s.fields) for s in whole] == [(k, f) for k, f in items if not k.startswith("_")]
    assert [s.index for s in whole] == list(range(N)) and not any(s.error for s in whole)
    ranges = [(a, b) for a in range(N) for b in range(a + 1, N + 1)]
    if "pipe" in kind:
        ranges = ranges[::3]
    for first, last in ranges:
        assert rows(read_samples(url, first, last)) == rows(whole[first:last]), (first, last)
    # only the captions read (no image decoded): every sample still there, k006 with no field at all
    for first, last in ranges[::4]:
        captions = list(read_samples(url, first, last, frozenset({"txt"})))
        assert [(s.index, s.key) for s in captions] == [(s.index, s.key) for s in whole[first:last]]
        assert [s.fields for s in captions] == [{k: v for k, v in s.fields.items() if k == "txt"}
                                                for s in whole[first:last]]


@pytest.mark.parametrize("pipe", [False, True])
def test_cut_inside_a_sample_counts_it_and_every_later_one(tmp_path, pipe):
    """Cut inside k005's first member: k000-k004 arrive whole (k004 too: its run of members had ended), k005
    and everything after it are counted, with webdataset's read error as the reason where it was read."""
    items = [(f"k{i:03d}", {"png": bytes([i]) * 2000, "txt": b"x"}) for i in range(N)]
    path = tmp_path / "a.tar"
    write(path, items)
    with tarfile.open(path) as tar:
        cut = tar.getmember("k005.png").offset_data + 100
    path.write_bytes(path.read_bytes()[:cut])
    url = f"pipe:cat {path}" if pipe else str(path)
    for first, last in [(0, N), (3, 7), (4, 6), (5, N), (6, 8)]:
        got = list(read_samples(url, first, last))
        assert [s.index for s in got] == list(range(first, last))
        assert [s.key for s in got if not s.error] == [f"k{i:03d}" for i in range(first, min(5, last))]
        assert all(s.fields == dict(items[s.index][1]) for s in got if not s.error)
        errors = [s.error for s in got if s.error]
        assert len(errors) == last - max(first, 5) if last > 5 else not errors
        if first <= 5 < last:
            assert errors[0].startswith("unreadable tar data (ReadError: unexpected end of data")


def test_pipe_left_early_or_failing_is_never_fatal(tmp_path):
    """A piped shard read only in part (more than the pipe buffer left unread), or a command that fails:
    the reader returns, each missing sample counted."""
    items = [(f"k{i:03d}", {"png": bytes(8192), "txt": b"x"}) for i in range(40)]
    write(tmp_path / "a.tar", items)
    url = f"pipe:cat {tmp_path / 'a.tar'}"
    assert [s.key for s in read_samples(url, 0, 2)] == ["k000", "k001"]
    stream = read_samples(url, 0, 40)
    assert next(stream).key == "k000"
    stream.close()  # the consumer stops mid-shard
    for bad in (f"pipe:cat {tmp_path / 'missing.tar'}", "pipe:exit 3", str(tmp_path / "missing.tar")):
        got = list(read_samples(bad, 2, 5))
        assert [s.index for s in got] == [2, 3, 4] and all(s.error and not s.fields for s in got), bad


def test_a_local_shard_is_entered_by_its_headers(tmp_path, monkeypatch):
    """Starting deep inside a local shard (a resume, or a worker's range) reads the headers before it, not
    the data of the samples passed over."""
    items = [(f"k{i:03d}", {"png": bytes([i]) * 20_000, "txt": b"x"}) for i in range(40)]
    write(tmp_path / "a.tar", items)
    read = []

    class Counting(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            read.append(len(data))
            return data

    monkeypatch.setattr(tar_reader, "_open", lambda url: Counting(url, "rb"))
    got = list(read_samples(str(tmp_path / "a.tar"), 38, 40))
    assert [(s.key, s.fields) for s in got] == items[38:]
    assert sum(read) < 3 * 20_000 + 80 * 512 * 2  # two samples' data and the headers, not 38 samples' data


def test_the_stream_reads_only_the_fields_it_decodes():
    """What `decode_sample` looks at, and so all that the stream's reader reads: no image when none is
    decoded (latent or embedding training over shards that keep their images), the json for a json caption."""
    from t2i.data.decode import DecodeConfig, fields_used
    assert fields_used(DecodeConfig()) == {"jpg", "jpeg", "png", "webp", "txt"}
    assert fields_used(DecodeConfig(resolution=0, array_fields=("latent.npy",))) == {"txt", "latent.npy"}
    assert fields_used(DecodeConfig(resolution=0, caption_field="json:caption")) == {"json"}


@pytest.mark.parametrize("kind", ["local", "pipe", "gzip", "pax global header"])
def test_one_sample_out_of_order_is_that_sample_of_a_whole_read(tmp_path, kind):
    """What the bucketed stream reads: any sample alone, in any order; a local plain tar by seeking to where its
    samples start (one header walk, kept until the file changes), the others as `read_samples` reads them."""
    items = shard_items()
    path = tmp_path / "a.tar"
    write(path, items, **({"fmt": tarfile.PAX_FORMAT, "pax_headers": {"comment": "x"}}
                          if kind == "pax global header" else {}))
    if kind == "gzip":
        path = tmp_path / "a.tar.gz"
        path.write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    url = f"pipe:cat {path}" if kind == "pipe" else str(path)
    whole = list(read_samples(url, 0, N))
    offsets = tar_reader.sample_offsets(url)
    assert (offsets is not None) == (kind == "local")
    for i in [5, 0, 8, 3, 3, 7]:
        assert rows([tar_reader.read_sample(url, i)]) == rows(whole[i:i + 1])
    assert tar_reader.read_sample(url, N).error == tar_reader.SHORT_SHARD  # past the end: counted, not raised
    if kind == "local":
        write(path, items[:4])  # the shard rewritten: its offsets are walked again
        assert len(tar_reader.sample_offsets(url)) == 3 and tar_reader.read_sample(url, 5).error
