"""CLIP score of (image, prompt) pairs with a CLIP stage export (Hessel et al. 2021, as torchmetrics scales it).

    CLIP score = 100 * mean_i max(cos(E_I(image_i), E_T(prompt_i)), 0)

``E_I`` / ``E_T`` are the image and text towers of a CLIP stage export (`t2i.stages.clip`, e.g. the tiny
CLIP of `make train-unclip`), with the stage's own preprocessing (`t2i.conditioning.clip.clip_preprocess`)
and tokenizer; the embeddings are L2-normalised, so the score lies in [0, 100]. Hessel et al. clip each
pair's cosine at 0 and scale by w = 2.5; torchmetrics' ``CLIPScore`` scales by 100 and clips the MEAN at 0
(the same number whenever no cosine is negative); here each pair is clipped, as in the paper.

The number depends on the CLIP that judges: it is comparable across runs, checkpoints and samplers judged by
the SAME export, not with published CLIP scores (OpenAI ViT-L/14 on COCO etc.). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i.conditioning.clip import STAGE as CLIP_STAGE
from t2i.conditioning.clip import ClipImageEncoder
from t2i.conditioning.text import OpenClipTextEncoder
from t2i.eval.fid import as_float
from t2i.exports import Export, read_export


class ClipEmbedder:
    """The frozen image and text towers of a CLIP stage export -> L2-normalised embeddings (float32).

    ``images(x)``: images in [-1, 1] (B, 3, H, W) (or uint8) at any size (resized to the tower's input by
    `clip_preprocess`); ``texts(prompts)``: a list of strings (tokenized and truncated as in training).
    """

    def __init__(self, image_encoder: ClipImageEncoder, text_encoder: OpenClipTextEncoder, source: str = ""):
        self.image_encoder, self.text_encoder, self.source = image_encoder, text_encoder, source

    @classmethod
    def from_clip_export(cls, export_dir: str | Path | Export, device: str | torch.device = "cpu") -> ClipEmbedder:
        export = export_dir if isinstance(export_dir, Export) else read_export(export_dir, CLIP_STAGE)
        image = ClipImageEncoder.from_clip_export(export, normalize=True)
        text = OpenClipTextEncoder.from_clip_export(export)
        return cls(image, text, str(export.path)).to(device)

    def to(self, device: str | torch.device) -> ClipEmbedder:
        self.image_encoder.to(device)
        self.text_encoder.to(device)
        return self

    @property
    def embed_dim(self) -> int:
        return self.image_encoder.embed_dim

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.embed(as_float(images), normalize=True)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.text_encoder(list(prompts)).pooled.float(), dim=-1)


def clip_cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row i of ``image_emb`` (N, D) with row i of ``text_emb`` (N, D)."""
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"expected two (N, D) embeddings of one shape, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    return (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(-1)


class ClipScore:
    """Streaming CLIP score: ``update(images, prompts)`` per batch, ``compute()`` at the end (the mean of
    per-pair clipped cosines, times 100). ``count`` pairs so far."""

    def __init__(self, embedder: ClipEmbedder):
        self.embedder = embedder
        self.total, self.count = 0.0, 0

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Add a batch; returns its per-pair cosines (before clipping)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        if len(prompts) == 0:
            return torch.empty(0)
        cos = clip_cosines(self.embedder.images(images), self.embedder.texts(prompts)).cpu()
        self.total += float(cos.clamp(min=0).double().sum())
        self.count += len(prompts)
        return cos

    def compute(self) -> float:
        if self.count == 0:
            raise ValueError("a CLIP score needs at least one (image, prompt) pair")
        return 100.0 * self.total / self.count


def clip_score(images: torch.Tensor, prompts: Sequence[str], clip: ClipEmbedder | str | Path,
               batch_size: int = 256) -> float:
    """CLIP score of images in [-1, 1] (N, 3, H, W) against their prompts (N strings), judged by a CLIP
    stage export (a path, or a loaded `ClipEmbedder`)."""
    embedder = clip if isinstance(clip, ClipEmbedder) else ClipEmbedder.from_clip_export(clip)
    metric = ClipScore(embedder)
    for start in range(0, len(prompts), batch_size):
        metric.update(images[start:start + batch_size], prompts[start:start + batch_size])
    return metric.compute()
