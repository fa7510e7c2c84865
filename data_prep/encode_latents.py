"""Precompute VAE latents into new shards: every field of each sample is kept and ``latent.npy``
(the scaled posterior mean, float32, C x h x w) is added. One output shard per input shard, written
atomically, so an interrupted run resumes where it stopped (finished shards are skipped).

    python data_prep/encode_latents.py --vae runs/tiny-vae/export --shards data/shapes/train \
        --out data/shapes_latents/train --resolution 32 [--batch 256] [--device cpu]

Train the LDM on them with ``data.array_fields=[latent.npy]`` and ``model.target.precomputed=true``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

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
    args = p.parse_args(argv)
    vae = load_autoencoder(args.vae).to(args.device)
    cfg = DecodeConfig(resolution=args.resolution, caption_required=False)
    derive_shards(args.shards, args.out, latent_fn(vae, args.device), cfg, args.batch,
                  vae=str(Path(args.vae).resolve()), latent_field="latent.npy")


if __name__ == "__main__":
    main()
