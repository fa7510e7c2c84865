"""Precompute VAE latents into new shards: every field of each sample is kept and ``latent.npy``
(the scaled posterior mean, float32, C x h x w) is added. One output shard per input shard, written
atomically, so an interrupted run resumes where it stopped (finished shards are skipped).

    python data_prep/encode_latents.py --vae runs/tiny-vae/export --shards data/shapes/train \
        --out data/shapes_latents/train --resolution 32 [--batch 256] [--device cpu]

Train the LDM on them with ``data.array_fields=[latent.npy]`` and ``model.target.precomputed=true``.

For aspect-ratio buckets (`t2i.data.buckets`) give ``--bucket-area`` (and ``--bucket-multiple``), or the list
``--buckets 48x48,32x64,64x32`` (height x width): each image is
centre-cropped to its nearest bucket, its latent takes the bucket's shape, and ``original_size.npy`` and
``crop_top_left.npy`` record the crop. Train with the same buckets and the three arrays:
``data.buckets={area: A, multiple: M} data.resolution=0
data.array_fields=[latent.npy,original_size.npy,crop_top_left.npy] model.target.precomputed=true``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from t2i.data.buckets import bucket_sizes
from t2i.data.datamodule import bucket_list
from t2i.data.decode import DecodeConfig
from t2i.data.derived import derive_shards
from t2i.pipelines.autoencoder import load_autoencoder


def latent_fn(vae, device: str):
    """uint8 images -> ``{"latent.npy": scaled posterior means}``, as the LDM stage encodes on the fly."""
    @torch.no_grad()
    def compute(images: torch.Tensor, captions: list[str]) -> dict[str, np.ndarray]:
        x = images.to(device).float().div(127.5).sub(1)
        return {"latent.npy": vae.encode(x).float().cpu().numpy()}
    return compute


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="VAE stage export folder")
    p.add_argument("--shards", required=True, help="manifest.json or the folder holding it")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, required=True, help="image side the VAE was trained at")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bucket-area", type=int, default=None,
                   help="pixel area of aspect-ratio buckets (e.g. 65536 for 256x256); default: squares")
    p.add_argument("--bucket-multiple", type=int, default=64,
                   help="bucket sides are multiples of this (the VAE's factor x the UNet's downsampling)")
    p.add_argument("--buckets", default=None, help="an explicit bucket list instead: HxW,HxW,... (as data.buckets)")
    args = p.parse_args(argv)
    if args.buckets and args.bucket_area:
        p.error("give --buckets or --bucket-area, not both")
    buckets = (bucket_list([[int(v) for v in b.split("x")] for b in args.buckets.split(",")]) if args.buckets
               else bucket_sizes(args.bucket_area, args.bucket_multiple) if args.bucket_area else None)
    vae = load_autoencoder(args.vae).to(args.device)
    cfg = DecodeConfig(resolution=args.resolution, caption_required=False)
    derive_shards(args.shards, args.out, latent_fn(vae, args.device), cfg, args.batch, buckets=buckets,
                  vae=str(Path(args.vae).resolve()), latent_field="latent.npy")


if __name__ == "__main__":
    main()
