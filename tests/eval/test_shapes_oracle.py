"""The shapes prompt-alignment oracle: near-perfect on rendered images, chance on mismatched prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    caption,
    parse_caption,
    random_specs,
    render,
)
from t2i.eval.shapes import ATTRIBUTES, compare, heldout_prompts, judge, judge_all, score, score_specs

N = 500
CHANCE = {"shape": 1 / len(SHAPES), "color": 1 / len(COLORS), "size": 1 / len(SIZES),
          "position": 1 / len(POSITIONS), "background": 1 / len(BACKGROUNDS)}


def downsample(image: np.ndarray, res: int, resample=Image.BOX) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((res, res), resample))


def as_model_output(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1], the generators' convention."""
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1


@pytest.fixture(scope="module")
def rendered():
    specs = random_specs(N, seed=123)
    return specs, [render(s) for s in specs]


@pytest.fixture(scope="module")
def verdicts_64(rendered):
    return judge_all(rendered[1])


def assert_accurate(result: dict, n: int) -> None:
    assert result["n"] == n
    assert result["all"] >= 0.995, result
    for a in ATTRIBUTES:
        assert result[a] >= 0.995, (a, result[a])


def test_rendered_64px(rendered, verdicts_64):
    specs, _ = rendered
    assert_accurate(compare(verdicts_64, specs), N)


def test_rendered_32px(rendered):
    specs, images = rendered
    small = [as_model_output(downsample(im, 32)) for im in images]
    assert_accurate(score_specs(small, specs), N)


def test_noisy_and_bilinear_32px(rendered):
    specs, images = rendered
    gen = torch.Generator().manual_seed(0)
    noisy = [as_model_output(downsample(im, 32, Image.BILINEAR)) for im in images[:100]]
    noisy = [x + 0.05 * torch.randn(x.shape, generator=gen) for x in noisy]
    assert_accurate(score_specs(noisy, specs[:100]), 100)


def test_shuffled_prompts_score_at_chance(rendered, verdicts_64):
    specs, _ = rendered
    shuffled = [specs[i] for i in np.random.default_rng(0).permutation(N)]
    result = compare(verdicts_64, shuffled)
    for a in ATTRIBUTES:
        assert result[a] < CHANCE[a] + 0.1, (a, result[a])
    assert result["all"] < 0.02


def test_blank_image_is_wrong_not_a_crash():
    blank = np.full((64, 64, 3), 255, np.uint8)
    verdict = judge(blank)
    assert verdict == {"shape": None, "color": None, "size": None, "position": None, "background": "white"}
    prompt = "a large red circle in the top left on a white background"
    result = score([blank, torch.zeros(3, 32, 32)], [prompt, prompt.replace("white", "gray")])
    assert result["all"] == 0.0 and result["shape"] == 0.0
    assert result["background"] == 1.0  # the background is still read (gray tensor 0.0 = 127.5)
    assert result["confusion"]["shape"] == {"circle": {"none": 2}}


def test_score_returns_per_attribute_accuracy(rendered):
    specs, images = rendered
    prompts = [caption(s) for s in specs[:20]]
    batch = torch.stack([as_model_output(im) for im in images[:20]])  # (B, C, H, W) in [-1, 1]
    result = score(batch, prompts)
    assert set(ATTRIBUTES) | {"all", "n", "confusion"} <= set(result)
    assert result["n"] == 20
    assert all(result[a] == 1.0 for a in (*ATTRIBUTES, "all"))
    with pytest.raises(ValueError):
        score(batch[:3], prompts[:2])


def test_heldout_prompts_are_canonical_and_deterministic():
    prompts = heldout_prompts(50, seed=7)
    assert prompts == heldout_prompts(50, seed=7) != heldout_prompts(50, seed=8)
    assert [caption(parse_caption(p)) for p in prompts] == prompts
