"""Zero-shot retrieval recall: hand-made cases, duplicate captions count as correct."""

from __future__ import annotations

import pytest
import torch

from t2i.eval.retrieval import caption_groups, retrieval_recall


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_perfect_pairs_recall_one():
    emb = torch.eye(6)
    out = retrieval_recall(emb, emb.clone(), [f"c{i}" for i in range(6)])
    assert out == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}


def test_hand_made_ranks():
    # 3 distinct captions; image 0 is closest to text 1, then text 0; image 1 and 2 find their own text
    img = _unit([0.9, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    txt = torch.eye(3)
    out = retrieval_recall(img, txt, ["a", "b", "c"], ks=(1, 2))
    assert out["i2t_r1"] == pytest.approx(2 / 3) and out["i2t_r2"] == 1.0
    # text 1 ranks image 1 (cos 1) above image 0 (cos ~0.74): correct; texts 0 and 2 find their images
    assert out["t2i_r1"] == 1.0


def test_duplicate_captions_count_as_correct():
    """Samples 0 and 1 share a caption: retrieving the other one is correct, as is any tie among them."""
    captions = ["a red circle", "a red circle", "a blue square", "a blue square"]
    txt = _unit([1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0])  # equal captions, equal text embeddings
    img = _unit([1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0])
    out = retrieval_recall(img, txt, captions, ks=(1,))
    assert out == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    # text 0's nearest image is image 0 or 1; both carry its caption. A naive "own pair" recall would
    # score text 1 -> image 0 as a miss.
    swapped = img[[1, 0, 3, 2]]
    assert retrieval_recall(swapped, txt, captions, ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    # images of the wrong caption group: every query misses
    crossed = img[[2, 3, 0, 1]]
    assert retrieval_recall(crossed, txt, captions, ks=(1,)) == {"i2t_r1": 0.0, "t2i_r1": 0.0}


def test_k_larger_than_n_and_unnormalised_inputs():
    img = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    txt = torch.tensor([[0.0, 2.0], [5.0, 0.0]])  # swapped: top-1 misses, top-2 (all) hits
    out = retrieval_recall(img, txt, ["x", "y"], ks=(1, 5))
    assert out == {"i2t_r1": 0.0, "i2t_r5": 1.0, "t2i_r1": 0.0, "t2i_r5": 1.0}


def test_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    txt[:25] = img[:25] + 0.3 * torch.randn(25, 8, generator=g)
    captions = [f"c{i % 20}" for i in range(50)]
    assert retrieval_recall(img, txt, captions, chunk=7) == retrieval_recall(img, txt, captions, chunk=1000)


def test_caption_groups_and_errors():
    assert caption_groups(["b", "a", "b", "c"]).tolist() == [0, 1, 0, 2]
    with pytest.raises(ValueError):
        retrieval_recall(torch.zeros(3, 4), torch.zeros(3, 5), ["a", "b", "c"])
    with pytest.raises(ValueError):
        retrieval_recall(torch.zeros(3, 4), torch.zeros(3, 4), ["a", "b"])
