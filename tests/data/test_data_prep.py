"""data_prep scripts: make_shapes, folder_to_shards, make_manifest (loaded from their files)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from t2i_testing import all_specs, make_shard_set

from t2i.data.datamodule import ShardDataModule
from t2i.data.manifest import DataError, ShardInfo, load_manifest, scan_shard, write_manifest
from t2i.data.shapes import ShapeSpec, held_out_combinations, is_held_out, parse_caption, render

DATA_PREP = Path(__file__).resolve().parents[2] / "data_prep"


def count_samples(tar_path) -> int:
    """The samples of a local tar shard, read from its member headers; DataError if it is damaged."""
    n, problem = scan_shard(tar_path)
    if problem is not None:
        raise DataError(f"cannot read tar shard {tar_path}: {problem} ({n} sample(s) readable before it)")
    return n


def load_script(name: str):
    """data_prep/ is not a package: import a script from its file."""
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", DATA_PREP / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shapes = load_script("make_shapes")
folder_to_shards = load_script("folder_to_shards")
make_manifest = load_script("make_manifest")


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def read_split(folder: Path) -> dict[str, bytes]:
    members = {}
    for shard in load_manifest(folder).shards:
        members.update(read_tar(Path(shard.url)))
    return members


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- make_shapes

def test_make_shapes_writes_splits(tmp_path):
    out = tmp_path / "shapes"
    status = make_shapes.make_shapes(out, train=300, val=50, seed=0, shard_size=128, workers=1)
    assert status == {"train": "written", "val": "written"}
    train, val = load_manifest(out / "train"), load_manifest(out / "val")
    assert [s.num_samples for s in train.shards] == [128, 128, 44] and val.total == 50
    members = read_split(out / "train")
    assert len(members) == 900 and min(members) == "000000000.json" and max(members) == "000000299.txt"
    for key in ("000000000", "000000137", "000000299"):
        text = members[f"{key}.txt"].decode()
        meta = json.loads(members[f"{key}.json"])
        assert meta["caption"] == text and parse_caption(text).color == meta["color"]
        spec = ShapeSpec(*(meta[k] for k in ("shape", "color", "size", "position", "background", "dx", "dy")))
        img = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
        assert img.shape == (64, 64, 3) and np.array_equal(img, render(spec))
    train_caps = [members[f"{i:09d}.txt"] for i in range(50)]
    val_caps = [v for k, v in sorted(read_split(out / "val").items()) if k.endswith(".txt")]
    assert train_caps != val_caps


def _split_specs(folder: Path) -> list[ShapeSpec]:
    members = read_split(folder)
    return [ShapeSpec(*(json.loads(v)[k] for k in ("shape", "color", "size", "position", "background")))
            for k, v in sorted(members.items()) if k.endswith(".json")]


def test_the_training_split_never_shows_a_held_out_composition(tmp_path):
    """Every sample of a 3000-sample training split checked; the validation split holds both kinds; both
    manifests record the list; every single value and every pair of the held-out attributes is still seen."""
    out = tmp_path / "shapes"
    make_shapes.make_shapes(out, train=3000, val=600, seed=0, shard_size=1000, workers=2)
    train, val = _split_specs(out / "train"), _split_specs(out / "val")
    assert len(train) == 3000 and not [s for s in train if is_held_out(s)]
    unseen = [s for s in val if is_held_out(s)]
    assert 0.06 < len(unseen) / len(val) < 0.17, len(unseen)  # 18 of 162 triples: 11% expected
    for split in ("train", "val"):
        params = json.loads((out / split / "manifest.json").read_text())["params"]
        assert params["held_out"] == held_out_combinations() and len(params["held_out"]) == 18
        assert params["includes_held_out"] is (split == "val")
    for a, b in (("shape", "color"), ("shape", "position"), ("color", "position")):
        seen_pairs = {(getattr(s, a), getattr(s, b)) for s in train}
        every_pair = {(getattr(s, a), getattr(s, b)) for s in all_specs()}
        assert seen_pairs == every_pair, (a, b, sorted(every_pair - seen_pairs))


def test_make_shapes_byte_identical_and_idempotent(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    make_shapes.make_shapes(a, train=300, val=40, seed=3, shard_size=100, workers=1)
    make_shapes.main(["--out", str(b), "--train", "300", "--val", "40", "--seed", "3",
                      "--shard-size", "100", "--workers", "2"])
    assert file_bytes(a) == file_bytes(b) and len(file_bytes(a)) == 3 + 1 + 2
    capsys.readouterr()

    before = {p: p.stat().st_mtime_ns for p in a.rglob("*.tar")}
    status = make_shapes.make_shapes(a, train=300, val=40, seed=3, shard_size=100, workers=1)
    assert status == {"train": "up to date", "val": "up to date"}
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*.tar")} == before

    # changed parameters rebuild the split and remove its old shards; the other split is kept
    status = make_shapes.make_shapes(a, train=300, val=40, seed=3, shard_size=1000, workers=1)
    assert status == {"train": "written", "val": "written"}
    assert sorted(p.name for p in (a / "train").iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert read_split(a / "train") == read_split(b / "train")  # same samples, fewer shards
    status = make_shapes.make_shapes(a, train=200, val=40, seed=3, shard_size=1000, workers=1)
    assert status == {"train": "written", "val": "up to date"} and load_manifest(a / "train").total == 200

    # a missing shard makes the split stale even with identical parameters
    (a / "val" / "shard-000000.tar").unlink()
    assert make_shapes.make_shapes(a, train=200, val=40, seed=3, shard_size=1000, workers=1)["val"] == "written"


# ---------------------------------------------------------- folder_to_shards

def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """Images of several kinds (sorted order = key order), a non-image and an uncaptioned image."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    rgb = Image.new("RGB", (20, 10), (200, 10, 10))
    files = {
        "a_gray.png": encode(Image.new("L", (8, 6), 77), "PNG"),
        "c.jpg": encode(rgb, "JPEG"),
        "d16.png": encode(Image.fromarray(np.full((5, 7), 40000, np.uint16)), "PNG"),
        "e_really_jpeg.png": encode(rgb, "JPEG"),  # extension must follow the real format
        "f_nocap.png": encode(rgb, "PNG"),
        "notes.bin": b"not an image at all",
        "sub/b_rgba.png": encode(Image.new("RGBA", (4, 4), (1, 2, 3, 128)), "PNG"),
    }
    captions = {name: f"caption of {name}, with comma" for name in files if name != "f_nocap.png"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, files, captions


EXPECTED = [("a_gray.png", "png", (8, 6)), ("c.jpg", "jpg", (20, 10)), ("d16.png", "png", (7, 5)),
            ("e_really_jpeg.png", "jpg", (20, 10)), ("sub/b_rgba.png", "png", (4, 4))]


def check_shards(out: Path, files: dict, captions: dict, expected=EXPECTED) -> None:
    assert load_manifest(out).total == len(expected)
    members = read_split(out)
    assert len(members) == 3 * len(expected)
    for i, (name, ext, size) in enumerate(expected):
        key = f"{i:09d}"
        assert members[f"{key}.{ext}"] == files[name]
        meta = json.loads(members[f"{key}.json"])
        assert meta["key"] == key and meta["path"] == name and (meta["width"], meta["height"]) == size
        assert members[f"{key}.txt"].decode() == meta["caption"] == captions.get(name, "")


def test_folder_to_shards_sidecar(image_folder, tmp_path, capsys):
    root, files, captions = image_folder
    for name, text in captions.items():
        (root / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    out = tmp_path / "out"
    counts = folder_to_shards.folder_to_shards(root, out, shard_size=2)
    assert counts["written"] == 5 and counts["unreadable"] == 1 and counts["no_caption"] == 1
    assert [s.num_samples for s in load_manifest(out).shards] == [2, 2, 1]
    check_shards(out, files, captions)
    report = capsys.readouterr()
    assert "notes.bin" in report.err and "f_nocap.png" in report.err and "written: 5" in report.out

    with pytest.raises(SystemExit):  # refuses to mix with existing shards
        folder_to_shards.folder_to_shards(root, out)
    counts = folder_to_shards.folder_to_shards(root, out, allow_missing_caption=True, overwrite=True)
    assert counts["written"] == 6 and counts["empty_caption"] == 1 and load_manifest(out).total == 6
    expected = EXPECTED[:4] + [("f_nocap.png", "png", (20, 10))] + EXPECTED[4:]
    check_shards(out, files, captions, expected)


def test_folder_to_shards_csv(image_folder, tmp_path):
    root, files, captions = image_folder
    csv_path = root / "captions.csv"  # inside the folder: must not be taken for an image
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        for name, text in captions.items():
            writer.writerow([name, text])
        writer.writerow(["gone.png", "an image that does not exist"])
    out = tmp_path / "out"
    folder_to_shards.main([str(root), "--out", str(out), "--captions", str(csv_path)])
    check_shards(out, files, captions)


def test_folder_to_shards_jsonl(image_folder, tmp_path):
    root, files, captions = image_folder
    jsonl = tmp_path / "captions.jsonl"
    lines = [json.dumps({"path": str(root / name) if i % 2 else name, "caption": text})
             for i, (name, text) in enumerate(captions.items())]
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    counts = folder_to_shards.folder_to_shards(root, out, captions=jsonl)
    assert counts["written"] == 5 and counts["unreadable"] == 1 and counts["captions_without_image"] == 0
    check_shards(out, files, captions)


# ------------------------------------------------------------- make_manifest

def write_img2dataset_shard(path: Path, n: int, successes: int | None) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{path.stem}{i:04d}"
            for ext, data in (("jpg", b"\xff\xd8fake"), ("txt", b"a cat"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (path.parent / f"{path.stem}.parquet").write_bytes(b"")
    if successes is not None:
        stats = {"count": n + 2, "successes": successes, "failed_to_download": 2}
        (path.parent / f"{path.stem}_stats.json").write_text(json.dumps(stats))


@pytest.fixture
def img2dataset_dir(tmp_path):
    root = tmp_path / "laion"
    root.mkdir()
    write_img2dataset_shard(root / "00001.tar", 2, None)
    write_img2dataset_shard(root / "00000.tar", 3, 7)  # stats disagree on purpose: shows which was used
    write_img2dataset_shard(root / "00002.tar", 0, 0)  # empty: left out
    return root


def test_make_manifest_counts_tars(img2dataset_dir):
    path = make_manifest.make_manifest(img2dataset_dir)
    raw = json.loads(path.read_text())
    assert [(s["url"], s["num_samples"]) for s in raw["shards"]] == [("00000.tar", 3), ("00001.tar", 2)]
    assert load_manifest(img2dataset_dir).total == 5 == sum(
        count_samples(img2dataset_dir / f"0000{i}.tar") for i in range(3))


def test_make_manifest_trust_stats_and_glob(img2dataset_dir):
    make_manifest.main([str(img2dataset_dir / "0000[01].tar"), "--trust-stats"])
    raw = json.loads((img2dataset_dir / "manifest.json").read_text())
    assert [s["num_samples"] for s in raw["shards"]] == [7, 2] and raw["total"] == 9
    assert raw["counted_by"] == {"stats": 1, "tar": 1}


def test_make_manifest_records_image_sizes_without_decoding(tmp_path):
    """--sizes: each sample's (height, width) from its json (img2dataset's width/height) or its image header; a
    sample whose image cannot be read gets (0, 0); the sizes survive the manifest's round trip."""
    def png(h: int, w: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, format="PNG")
        return buf.getvalue()

    root = tmp_path / "sized"
    root.mkdir()
    samples = [("a", {"png": png(12, 40), "txt": b"wide, header"}),
               ("b", {"png": png(30, 10), "txt": b"tall, json", "json": b'{"width": 100, "height": 300}'}),
               ("c", {"jpg": b"\xff\xd8broken", "txt": b"no readable image"}),
               ("d", {"png": png(8, 8), "txt": b"json without sizes", "json": b'{"caption": "x"}'})]
    with tarfile.open(root / "00000.tar", "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    make_manifest.main([str(root), "--sizes"])
    (shard,) = load_manifest(root).shards
    assert shard.sizes == ((12, 40), (300, 100), (0, 0), (8, 8))
    assert load_manifest(make_manifest.make_manifest(root)).shards[0].sizes is None  # only when asked
    raw = json.loads((root / "manifest.json").read_text())
    raw["shards"][0]["sizes"] = [[12, 40]]
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"lists 1 image sizes for 4 samples"):
        load_manifest(root)


def cut_shard(path: Path, where: str) -> None:
    """Cut a make_shard_set shard inside its sample 3: in its image's data, or in its caption's header."""
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar}
    cut = {"mid-member": members["s000x00003.png"].offset_data + 10,
           "inside a header": members["s000x00003.txt"].offset + 100}[where]
    path.write_bytes(path.read_bytes()[:cut])


def deliver(manifest: Path) -> tuple[list[str], object]:
    """(sorted keys of one epoch through the real loader, its skip stats)."""
    dm = ShardDataModule(str(manifest), batch_size=1, num_workers=0, resolution=8, max_skip_fraction=1.0,
                         shuffle_window=1)
    loader = dm.train_dataloader(0, 1)
    return sorted(k for b in loader for k in b["key"]), loader.stats


@pytest.mark.parametrize("where", ["mid-member", "inside a header"])
def test_make_manifest_keeps_the_readable_part_of_a_damaged_shard(tmp_path, capsys, where):
    """A shard cut inside sample 3 is reported and listed with the 3 samples before the cut, which the
    loader delivers whole (no loss the manifest does not declare); the sample cut is really lost (listing
    it costs a skipped sample); --strict fails naming the shard and writes nothing."""
    folder = tmp_path / "shards"
    make_shard_set(folder, [6, 5])
    bad = folder / "shard-000000.tar"
    cut_shard(bad, where)
    path = make_manifest.make_manifest(folder)
    raw = json.loads(path.read_text())
    assert [(s["url"], s["num_samples"]) for s in raw["shards"]] == [("shard-000000.tar", 3),
                                                                      ("shard-000001.tar", 5)]
    assert raw["total"] == 8
    [damaged] = raw["damaged"]
    assert (damaged["url"], damaged["readable"]) == ("shard-000000.tar", 3)
    assert {"mid-member": "data of s000x00003.png runs past the end of the file",
            "inside a header": "inside the header after member s000x00003.png"}[where] in damaged["problem"]
    report = capsys.readouterr().err
    assert f"damaged shard shard-000000.tar: 3 readable sample(s) kept; {damaged['problem']}" in report
    keys, stats = deliver(path)
    assert keys == [f"s000x{i:05d}" for i in range(3)] + [f"s001x{i:05d}" for i in range(5)]
    assert (stats.planned, stats.skipped) == (8, 0)
    with pytest.raises(DataError, match=r"cannot read tar shard .*shard-000000\.tar: .*\(3 sample\(s\) "
                                        r"readable before it\)"):
        count_samples(bad)

    write_manifest(folder, [ShardInfo(str(bad), 4), ShardInfo(str(folder / "shard-000001.tar"), 5)])
    keys, stats = deliver(folder / "manifest.json")
    assert len(keys) == 8 and stats.skipped == 1 and set(stats.by_shard) == {str(bad)}

    listed = (folder / "manifest.json").read_bytes()
    with pytest.raises(SystemExit, match=r"1 damaged shard\(s\) \(--strict; no manifest written\): "
                                         r"shard-000000\.tar$"):
        make_manifest.main([str(folder), "--strict"])
    assert (folder / "manifest.json").read_bytes() == listed


def test_make_manifest_leaves_out_a_shard_with_no_readable_sample(tmp_path, capsys):
    folder = tmp_path / "shards"
    make_shard_set(folder, [6, 5])
    bad = folder / "shard-000000.tar"
    bad.write_bytes(bad.read_bytes()[:100])  # cut in the first header
    raw = json.loads(make_manifest.make_manifest(folder).read_text())
    assert [(s["url"], s["num_samples"]) for s in raw["shards"]] == [("shard-000001.tar", 5)]
    assert raw["damaged"] == [{"url": "shard-000000.tar", "readable": 0, "problem": "truncated header"}]
    report = capsys.readouterr().err
    assert "damaged shard shard-000000.tar: left out, no readable sample; truncated header" in report


def test_make_manifest_no_tars(tmp_path):
    with pytest.raises(SystemExit, match="no .tar shards"):
        make_manifest.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="no .tar shards"):
        make_manifest.main([str(tmp_path / "*.tar")])
