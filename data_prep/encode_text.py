"""Precompute frozen text-encoder states into new shards, so that a text-to-image stage (the Imagen base
and super-resolution stages) need not run the text encoder while training: every field of each sample is
kept and ``text_tokens.npy`` ((L, D) float16 token states), ``text_mask.npy`` ((L,) bool) and
``text_pooled.npy`` ((Dp,) float32) are added (`t2i.conditioning.precomputed`). One output shard per input
shard, written atomically: an interrupted run resumes where it stopped. Samples without a decodable image or
caption are skipped and counted, as training would skip them.

The encoder is the frozen text tower of a CLIP stage export, or of a local open_clip checkpoint:

    python data_prep/encode_text.py --clip runs/tiny-clip/export --shards data/shapes/train \
        --out data/shapes_text/train
    python data_prep/encode_text.py --arch ViT-H-14 --checkpoint /weights/open_clip_vit_h14.bin \
        --layer penultimate --shards ... --out ...

Train on them with ``data.array_fields=[text_tokens.npy,text_mask.npy,text_pooled.npy]`` and the same
encoder as ``model.text_encoder`` (it still encodes the sample-grid prompts; the widths are checked).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from t2i.conditioning.precomputed import FIELDS, encode_for_shards
from t2i.conditioning.text import OpenClipTextEncoder
from t2i.data.decode import DecodeConfig
from t2i.data.derived import derive_shards
from t2i.exports import read_export

_CACHE_LIMIT = 100_000  # encodings kept in memory (captions repeat a lot in some datasets)


class CaptionEncoder:
    """(images, captions) -> the three derived arrays; each distinct caption is encoded once."""

    def __init__(self, encoder: OpenClipTextEncoder, tokens: int | None = None):
        self.encoder, self.tokens = encoder, tokens or encoder.context_length
        if not 2 <= self.tokens <= encoder.context_length:
            raise SystemExit(f"--tokens must be in [2, {encoder.context_length}] (the encoder's context length)")
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def __call__(self, _images: torch.Tensor, captions: list[str]) -> dict[str, np.ndarray]:
        todo = sorted({c for c in captions if c not in self._cache})
        if todo:
            rows = encode_for_shards(self.encoder, todo)
            longer = rows["text_mask.npy"][:, self.tokens:].any(1)
            if longer.any():
                raise SystemExit(f"caption {todo[int(longer.argmax())]!r} has more than --tokens {self.tokens} "
                                 f"tokens: raise --tokens (at most {self.encoder.context_length})")
            rows["text_tokens.npy"] = rows["text_tokens.npy"][:, :self.tokens]
            rows["text_mask.npy"] = rows["text_mask.npy"][:, :self.tokens]
            if len(self._cache) + len(todo) > _CACHE_LIMIT:
                self._cache.clear()
            for i, c in enumerate(todo):
                self._cache[c] = {name: rows[name][i] for name in FIELDS}
        return {name: np.stack([self._cache[c][name] for c in captions]) for name in FIELDS}


def build_encoder(args) -> tuple[OpenClipTextEncoder, dict]:
    if (args.clip is None) == (args.checkpoint is None):
        raise SystemExit("give --clip (a CLIP stage export) or --arch with --checkpoint (a local open_clip file)")
    if args.clip is not None:
        export = read_export(args.clip, "clip")
        encoder = OpenClipTextEncoder.from_clip_export(export, layer=args.layer)
        return encoder, {"text_encoder": str(export.path.resolve()),
                         "text_encoder_hash": export.info.get("config_hash"), "layer": args.layer}
    if args.arch is None:
        raise SystemExit("--checkpoint needs --arch (the open_clip model name)")
    encoder = OpenClipTextEncoder(args.arch, args.checkpoint, layer=args.layer)
    return encoder, {"text_encoder": f"{args.arch}:{args.checkpoint}", "layer": args.layer}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default=None, help="CLIP stage export folder (its text tower)")
    p.add_argument("--arch", default=None, help="open_clip model name, with --checkpoint")
    p.add_argument("--checkpoint", default=None, help="local open_clip checkpoint file")
    p.add_argument("--layer", default="last", choices=["last", "penultimate"])
    p.add_argument("--shards", required=True, help="manifest.json or the folder holding it")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=None,
                   help="token states kept per caption (default: the encoder's context length); a caption with "
                        "more real tokens is an error, never silently cut")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    encoder, meta = build_encoder(args)
    encoder = encoder.to(args.device)
    cfg = DecodeConfig(resolution=8, caption_required=True)  # images decoded only to skip what training skips
    derive_shards(args.shards, args.out, CaptionEncoder(encoder, args.tokens), cfg, args.batch, width=encoder.width,
                  pooled_dim=encoder.pooled_dim, tokens=args.tokens or encoder.context_length, fields=list(FIELDS),
                  **meta)


if __name__ == "__main__":
    main()
