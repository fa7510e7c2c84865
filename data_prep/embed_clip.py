"""Precompute CLIP embeddings into new shards for unCLIP's prior and decoder: every field of each sample
is kept and ``clip_img.npy`` (the L2-normalised image embedding, float32, (D,)) and ``clip_txt.npy``
(the L2-normalised embedding of the sample's caption, float32, (D,)) are added. Text token states are
not stored: their source, the caption, is kept, and later stages recompute them with
``OpenClipTextEncoder.from_clip_export``. One output shard per input shard, written atomically, so an
interrupted run resumes where it stopped (finished shards are skipped); samples without a decodable
image or caption are skipped and counted.

    python data_prep/embed_clip.py --clip runs/tiny-clip/export --shards data/shapes/train \
        --out data/shapes_clip/train [--resolution 32] [--batch 512] [--device cpu]

Train on them with ``data.array_fields=[clip_img.npy,clip_txt.npy]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from t2i.conditioning.clip import ClipImageEncoder
from t2i.conditioning.text import OpenClipTextEncoder
from t2i.data.decode import DecodeConfig
from t2i.data.derived import derive_shards
from t2i.exports import Export, read_export

FIELDS = ("clip_img.npy", "clip_txt.npy")
_CACHE_LIMIT = 100_000  # caption embeddings kept in memory (captions repeat a lot in some datasets)


class ClipEmbedder:
    """(uint8 images, captions) -> {clip_img.npy, clip_txt.npy}: L2-normalised float32 rows."""

    def __init__(self, export: str | Path | Export, device: str = "cpu"):
        export = export if isinstance(export, Export) else read_export(export, "clip")
        self.image = ClipImageEncoder.from_clip_export(export, normalize=True).to(device)
        self.text = OpenClipTextEncoder.from_clip_export(export).to(device)
        self.device = device
        self._text_cache: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> np.ndarray:
        todo = sorted({c for c in captions if c not in self._text_cache})
        if todo:
            emb = torch.nn.functional.normalize(self.text(todo).pooled.float(), dim=-1).cpu().numpy()
            if len(self._text_cache) + len(todo) > _CACHE_LIMIT:
                self._text_cache.clear()
            self._text_cache.update(zip(todo, emb, strict=True))
        return np.stack([self._text_cache[c] for c in captions])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str]) -> dict[str, np.ndarray]:
        x = images.to(self.device).float().div(127.5).sub(1)
        img = self.image(x).float().cpu().numpy()
        return {"clip_img.npy": img.astype(np.float32), "clip_txt.npy": self.text_embeddings(captions)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="CLIP stage export folder")
    p.add_argument("--shards", required=True, help="manifest.json or the folder holding it")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=None,
                   help="side images are decoded at (default: the CLIP stage's data.resolution)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    export = read_export(args.clip, "clip")
    resolution = args.resolution or int(export.config["data"]["resolution"])
    embedder = ClipEmbedder(export, args.device)
    cfg = DecodeConfig(resolution=resolution, caption_required=True)
    derive_shards(args.shards, args.out, embedder, cfg, args.batch, clip_export=str(export.path.resolve()),
                  clip_config_hash=export.info.get("config_hash"), embed_dim=embedder.image.embed_dim,
                  resolution=resolution, fields=list(FIELDS))


if __name__ == "__main__":
    main()
