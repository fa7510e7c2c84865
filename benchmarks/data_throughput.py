"""Data throughput: the t2i datamodule against a bare WebDataset decode loop over the same shards, in
one process run (same decode work: PNG -> RGB -> resize -> uint8 tensor, same batch size and workers),
and tiny-VAE training images/s on this machine.

    python benchmarks/data_throughput.py [--shards data/shapes/train] [--samples 20000] [--workers 0]

``--json PATH`` also writes the figures as a JSON record (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from t2i.data.datamodule import ShardDataModule
from t2i.data.manifest import load_manifest


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
    p.add_argument("--vae-batch", type=int, default=64, help="tiny-VAE training batch")
    p.add_argument("--vae-steps", type=int, default=20, help="timed tiny-VAE training steps (0: skip)")
    p.add_argument("--json", default=None, help="also write the figures as JSON: a .json file, or a folder "
                   "that gets <name>-<machine>.json (benchmarks/report.py)")
    args = p.parse_args(argv)
    figures = {}
    manifest = load_manifest(args.shards)
    urls = [s.url for s in manifest.shards]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"shards: {args.shards} ({manifest.total} samples)")
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
