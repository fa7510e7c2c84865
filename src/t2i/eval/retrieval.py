"""Zero-shot retrieval recall between image and text embeddings, aware of duplicate captions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def caption_groups(captions: Sequence[str]) -> torch.Tensor:
    """An int id per caption: equal captions get equal ids (first-seen order)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions], dtype=torch.long)


def _hits(sim: torch.Tensor, query_group: torch.Tensor, item_group: torch.Tensor, ks: Sequence[int],
          chunk: int) -> dict[int, int]:
    kmax = min(max(ks), sim.shape[1])
    hits = dict.fromkeys(ks, 0)
    for start in range(0, sim.shape[0], chunk):
        top = sim[start:start + chunk].topk(kmax, dim=1).indices  # (q, kmax)
        correct = item_group[top] == query_group[start:start + chunk, None]
        for k in ks:
            hits[k] += int(correct[:, :k].any(dim=1).sum())
    return hits


@torch.no_grad()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str],
                     ks: Sequence[int] = (1, 5), chunk: int = 1024) -> dict[str, float]:
    """Recall@k of image->text and text->image retrieval over N paired samples.

    Row i of ``image_emb`` (N, D) and of ``text_emb`` (N, D) embed sample i and its caption
    ``captions[i]``; similarity is cosine. Every sample is a query once in each direction (N queries):
    image i ranks the N caption embeddings, text i ranks the N images. A retrieved item counts as correct
    when its caption EQUALS the query's caption (not only when it is the query's own pair): datasets like
    shapes hold many samples with identical captions, whose texts are indistinguishable. Returns
    ``{"i2t_r{k}": ..., "t2i_r{k}": ...}`` as fractions in [0, 1].
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"expected two (N, D) embeddings of equal shape, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    n = image_emb.shape[0]
    if n != len(captions) or n == 0:
        raise ValueError(f"{n} embeddings but {len(captions)} captions (need at least one)")
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    group = caption_groups(captions).to(img.device)
    sim = img @ txt.T  # (images, texts)
    i2t = _hits(sim, group, group, ks, chunk)
    t2i = _hits(sim.T, group, group, ks, chunk)
    out = {f"i2t_r{k}": i2t[k] / n for k in ks}
    out.update({f"t2i_r{k}": t2i[k] / n for k in ks})
    return out
