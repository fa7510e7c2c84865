"""Data throughput: the t2i datamodule against a bare WebDataset decode loop over the same shards, in
one process run (same decode work: PNG -> RGB -> resize -> uint8 tensor, same batch size and workers),
and tiny-VAE training images/s on this machine.

    python benchmarks/data_throughput.py [--shards data/shapes/train] [--samples 20000] [--workers 0]

``--readers`` instead compares t2i's shard reader (webdataset's tar iteration, `t2i.data.tar_reader`) with
the hand-written tarfile reader it replaced (kept here only for this comparison), interleaved in one
process: raw reading of whole shards, entering each shard at its last sample (a resume or a worker's range
starting mid-shard), and the datamodule with each reader plugged in.

``--buckets`` instead compares the bucketed stream (``data.buckets``: every sample read on its own from its
shard, out of order) with the square stream (shards read in order with a shuffle window) over the same shards and
images, interleaved batch by batch in one process, 0 workers: what reading out of order costs. The shards' sizes
are read into a manifest copy in a temp folder first (as data_prep/make_manifest.py --sizes does); the bucket
set is the one square of --resolution, so both decode the same pixels.

``--buckets --jpeg N`` instead writes N JPEG photographs of many sizes and aspect ratios into shards in a temp
folder (crops of the photograph matplotlib ships, short side 256 to 1024 px, aspect ratio 1:3 to 3:1, quality
90, with img2dataset's json sizes) and compares, at each --resolution, the square stream (random square crops
of that side) with the bucketed stream of `bucket_sizes(resolution^2, 64)` (the data=webdataset default): the
cost of buckets on real-size JPEGs, and the samples/s one core decodes (0 workers: one process).

``--json PATH`` also writes the figures as a JSON record (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

import t2i.data.stream
from t2i.data.datamodule import ShardDataModule
from t2i.data.manifest import load_manifest, sample_key
from t2i.data.tar_reader import RawSample, read_samples


def t2i_loader(manifest: str, batch: int, workers: int, resolution: int):
    dm = ShardDataModule(manifest, batch_size=batch, num_workers=workers, resolution=resolution,
                         shuffle_window=2000)
    return dm.train_dataloader(rank=0, world=1)


def bare_webdataset_loader(urls: list[str], batch: int, workers: int, resolution: int):
    def to_tensor(img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)

    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(2000).decode("pil")
          .to_tuple("png", "txt").map_tuple(to_tensor, lambda s: s).batched(batch, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers)


def measure(loader, samples: int) -> float:
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += len(batch[1] if isinstance(batch, (list, tuple)) else batch["key"])
        if n >= samples:
            break
    return n / (time.perf_counter() - start)


def handwritten_read_samples(url: str, first: int, last: int, fields: frozenset[str] | None = None
                             ) -> Iterator[RawSample]:
    """The reader `t2i.data.tar_reader.read_samples` replaced: tarfile directly, random access on local files
    (samples before `first` passed over by their headers), ``r|`` on ``pipe:`` streams. Same contract, but
    it read every member: `fields` is ignored."""
    index = first
    try:
        if url.startswith("pipe:"):
            proc = subprocess.Popen(shlex.split(url[5:]), stdout=subprocess.PIPE, bufsize=1 << 20)
            tar = tarfile.open(fileobj=proc.stdout, mode="r|")  # noqa: SIM115 - closed below

            def close():
                tar.close()
                proc.stdout.close()
                proc.kill()
                proc.wait()
        else:
            tar = tarfile.open(url, mode="r:")  # noqa: SIM115 - closed below
            close = tar.close
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
        except (OSError, tarfile.TarError, EOFError) as e:
            current = None
            missing_reason = f"unreadable tar data ({type(e).__name__}: {e})"
        for i in range(index, last):
            yield RawSample(url, i, error=missing_reason)
    finally:
        close()


Reader = Callable[..., Iterator[RawSample]]
READERS: dict[str, Reader] = {"webdataset reader": read_samples, "hand-written reader": handwritten_read_samples}


def _read(reader: Reader, url: str, first: int, last: int) -> int:
    n = 0
    for raw in reader(url, first, last):
        if raw.error:
            raise RuntimeError(f"{url}: {raw.error}")
        n += 1
    return n


def _next_with(reader: Reader, batches: Iterator[dict]) -> int:
    """One batch of an in-process loader, the stream reading with `reader` (looked up as each shard starts)."""
    saved = t2i.data.stream.read_samples
    t2i.data.stream.read_samples = reader
    try:
        return len(next(batches)["key"])
    finally:
        t2i.data.stream.read_samples = saved


def _interleave(steps: Iterator[dict[str, Callable[[], int]]],
                names: tuple[str, ...] = tuple(READERS)) -> dict[str, list[tuple[int, float]]]:
    """Run each step's calls (one per contender, the order alternating from step to step), timing each:
    both see the same moments of a busy machine."""
    out: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    for i, calls in enumerate(steps):
        for name in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
            start = time.perf_counter()
            n = calls[name]()
            out[name].append((n, time.perf_counter() - start))
    return out


def compare_readers(args, shards: list[tuple[str, int]]) -> dict:
    """Each case interleaved at a fine grain (a shard; a batch of the datamodule). Its ratio is the speed of
    the webdataset reader over the hand-written one (above 1: webdataset faster), the median over blocks (a
    shard; a pass of --samples) of the blocks' ratios: a spike of load from elsewhere moves one block, not
    the figure."""
    def whole_shards():
        n = 0
        while n < args.samples * args.repeats:
            for url, count in shards:
                yield {name: (lambda r=r, u=url, c=count: _read(r, u, 0, c)) for name, r in READERS.items()}
                n += count

    def enter_last():
        for _ in range(args.repeats):
            for url, count in shards:
                yield {name: (lambda r=r, u=url, c=count: _read(r, u, c - 1, c)) for name, r in READERS.items()}

    per_pass = max(1, args.samples // args.batch)

    def datamodule(res):
        for _ in range(args.repeats):
            loaders = {name: iter(t2i_loader(args.shards, args.batch, 0, res)) for name in READERS}
            for _ in range(per_pass):
                yield {name: (lambda r=r, it=loaders[name]: _next_with(r, it)) for name, r in READERS.items()}

    cases = {"read whole shards": ("samples/s", 1, whole_shards()),
             "enter a shard at its last sample": ("ms", 1, enter_last())}
    for res in args.resolution:
        cases[f"datamodule, {res}px, 0 workers"] = ("samples/s", per_pass, datamodule(res))
    figures = {}
    a, b = READERS
    for case, (unit, block, steps) in cases.items():
        got = _interleave(steps)
        value = {}
        for name, runs in got.items():
            n, t = sum(x for x, _ in runs), sum(y for _, y in runs)
            value[name] = n / t if unit == "samples/s" else t * 1000 / len(runs)
        times = {name: [sum(t for _, t in runs[i:i + block]) for i in range(0, len(runs), block)]
                 for name, runs in got.items()}
        ratio = statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))
        totals = value[a] / value[b] if unit == "samples/s" else value[b] / value[a]
        print(f"{case:34s} {a} {value[a]:9.1f} {unit}   {b} {value[b]:9.1f} {unit}   "
              f"speed ratio {ratio:.3f} (median of {len(times[a])} blocks; of the totals {totals:.3f})")
        figures[f"{case}: {a}"] = {"value": value[a], "unit": unit}
        figures[f"{case}: {b}"] = {"value": value[b], "unit": unit}
        # not named "ratio": report.py's summary takes "<case>: ratio" for the datamodule / bare webdataset one
        figures[f"{case}: speed, webdataset / hand-written"] = {"value": ratio, "unit": "x"}
    return figures


def write_jpeg_shards(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEG crops of a real photograph at random sizes and aspect ratios, as img2dataset lays them out."""
    import io
    import json

    import matplotlib

    from t2i.data.shard_writer import ShardWriter
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    rng = np.random.default_rng(seed)
    with ShardWriter(folder, max_count=500) as writer:
        for i in range(count):
            ratio = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))  # width / height
            short = int(rng.integers(256, 1025))
            w, h = (round(short * ratio), short) if ratio >= 1 else (short, round(short / ratio))
            cw, ch = min(photo.width, round(photo.height * w / h)), min(photo.height, round(photo.width * h / w))
            left, top = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
            img = photo.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            writer.write(f"{i:06d}", {"jpg": buf.getvalue(), "txt": f"photo {i}",
                                      "json": json.dumps({"width": w, "height": h})})
    return folder


def compare_buckets(args, manifest_path: str) -> dict:
    """Bucketed against square stream, batch by batch interleaved; the ratio is the median over passes of
    --samples of the passes' time ratios (above 1: the bucketed stream is slower)."""
    import tempfile

    from t2i.data.decode import IMAGE_FIELDS, image_size_of
    from t2i.data.manifest import ShardInfo, write_manifest

    manifest = load_manifest(manifest_path)
    fields = frozenset(("json", *IMAGE_FIELDS))
    sized = [ShardInfo(s.url, s.num_samples, tuple(image_size_of(r.fields) for r in read_samples(
        s.url, 0, s.num_samples, fields))) for s in manifest.shards if s.num_samples]
    figures = {}
    per_pass, names = max(1, args.samples // args.batch), ("bucketed stream", "square stream")

    def steps(sized_manifest: str, res: int):
        buckets = {"multiple": 64} if args.jpeg else [[res, res]]  # the default set, or the square's pixels
        for _ in range(args.repeats):
            its = {name: iter(ShardDataModule(sized_manifest if name == names[0] else manifest_path,
                                              batch_size=args.batch, num_workers=0, resolution=res,
                                              shuffle_window=2000, crop="random",
                                              buckets=buckets if name == names[0] else None
                                              ).train_dataloader(rank=0, world=1)) for name in names}
            for _ in range(per_pass):
                yield {name: (lambda it=its[name]: len(next(it)["key"])) for name in names}

    with tempfile.TemporaryDirectory() as tmp:
        write_manifest(tmp, sized)
        for res in args.resolution:
            got = _interleave(steps(tmp, res), names)
            rate = {name: sum(n for n, _ in runs) / sum(t for _, t in runs) for name, runs in got.items()}
            blocks = {name: [sum(t for _, t in runs[i:i + per_pass]) for i in range(0, len(runs), per_pass)]
                      for name, runs in got.items()}
            ratio = statistics.median(tb / ts for tb, ts in zip(blocks[names[0]], blocks[names[1]]))
            print(f"{res}px, 0 workers: bucketed {rate[names[0]]:8.0f} samples/s   square {rate[names[1]]:8.0f} "
                  f"samples/s   time ratio bucketed / square {ratio:.2f} (median of {args.repeats} passes)")
            for name in names:
                figures[f"{res}px, 0 workers: {name}"] = {"value": rate[name], "unit": "samples/s"}
            figures[f"{res}px, 0 workers: time, bucketed / square"] = {"value": ratio, "unit": "x"}
    return figures


def vae_images_per_s(batch: int = 64, resolution: int = 32, steps: int = 20) -> tuple[float, float]:
    from t2i.nn.autoencoder import AutoencoderKL
    model = AutoencoderKL(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                          attn_in_mid=False, num_groups=8)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    out = []
    for bf16 in (False, True):
        for i in range(steps + 3):
            if i == 3:
                start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                rec, post = model(x)
                loss = (rec.float() - x).abs().mean() + 1e-6 * post.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(batch * steps / (time.perf_counter() - start))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="data/shapes/train")
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--resolution", type=int, nargs="+", default=[64, 32])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--readers", action="store_true", help="compare t2i's webdataset reader with the "
                   "hand-written one it replaced, in-process (only that; --workers is not used)")
    p.add_argument("--buckets", action="store_true", help="compare the bucketed stream with the square stream "
                   "over the same shards, in-process (only that)")
    p.add_argument("--jpeg", type=int, default=0, help="with --buckets: write this many real-size JPEG photographs "
                   "into temp shards and compare on those")
    p.add_argument("--vae-batch", type=int, default=64, help="tiny-VAE training batch")
    p.add_argument("--vae-steps", type=int, default=20, help="timed tiny-VAE training steps (0: skip)")
    p.add_argument("--json", default=None, help="also write the figures as JSON: a .json file, or a folder "
                   "that gets <name>-<machine>.json (benchmarks/report.py)")
    args = p.parse_args(argv)
    figures = {}
    if args.jpeg:
        if not args.buckets:
            p.error("--jpeg goes with --buckets")
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            args.shards = str(write_jpeg_shards(Path(tmp) / "jpeg", args.jpeg))
            print(f"wrote {args.jpeg} JPEG photographs in {time.perf_counter() - start:.0f} s")
            figures = compare_buckets(args, args.shards)
        if args.json:
            from report_record import write_record
            write_record(args.json, "data_throughput", f"buckets, {args.jpeg} JPEG photographs, batch {args.batch}",
                         args, figures, script=__file__, argv=argv)
        return
    manifest = load_manifest(args.shards)
    urls = [s.url for s in manifest.shards]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"shards: {args.shards} ({manifest.total} samples)")
    if args.buckets:
        figures = compare_buckets(args, args.shards)
        if args.json:
            from report_record import write_record
            shards = "/".join(Path(args.shards).resolve().parts[-2:])
            write_record(args.json, "data_throughput", f"buckets, {shards}, batch {args.batch}", args, figures,
                         script=__file__, argv=argv)
        return
    if args.readers:
        figures = compare_readers(args, [(s.url, s.num_samples) for s in manifest.shards if s.num_samples])
        if args.json:
            from report_record import write_record
            shards = "/".join(Path(args.shards).resolve().parts[-2:])
            write_record(args.json, "data_throughput", f"readers, {shards}, batch {args.batch}", args, figures,
                         script=__file__, argv=argv)
        return
    for res in args.resolution:
        for workers in args.workers:
            ours, bare = [], []
            for _ in range(args.repeats):  # alternate, best of N: less sensitive to a busy machine
                ours.append(measure(t2i_loader(args.shards, args.batch, workers, res), args.samples))
                bare.append(measure(bare_webdataset_loader(urls, args.batch, workers, res), args.samples))
            print(f"resolution {res:3d}  workers {workers}:  t2i {max(ours):8.0f} samples/s   "
                  f"bare webdataset {max(bare):8.0f} samples/s   ratio {max(ours) / max(bare):.2f}")
            case = f"{res}px, {workers} worker{'s' if workers != 1 else ''}"
            figures[f"{case}: t2i datamodule"] = {"value": max(ours), "unit": "samples/s"}
            figures[f"{case}: bare webdataset"] = {"value": max(bare), "unit": "samples/s"}
            figures[f"{case}: ratio"] = {"value": max(ours) / max(bare), "unit": "x"}
    if args.vae_steps > 0:
        fp32, bf16 = vae_images_per_s(args.vae_batch, steps=args.vae_steps)
        print(f"tiny VAE training (32px, batch {args.vae_batch}, fwd+bwd+Adam): fp32 {fp32:.0f} images/s, "
              f"bf16 autocast {bf16:.0f} images/s")
        figures[f"tiny VAE training, 32px, batch {args.vae_batch}, fp32"] = {"value": fp32, "unit": "images/s"}
        figures[f"tiny VAE training, 32px, batch {args.vae_batch}, bf16 autocast"] = {"value": bf16,
                                                                                        "unit": "images/s"}
    if args.json:
        from report_record import write_record  # benchmarks/report_record.py (this folder is on sys.path)
        write_record(args.json, "data_throughput", f"batch {args.batch}", args, figures,
                     script=__file__, argv=argv)


if __name__ == "__main__":
    main()
