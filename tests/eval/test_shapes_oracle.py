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
    ShapeSpec,
    caption,
    is_held_out,
    parse_caption,
    random_specs,
    render,
)
from t2i.eval.shapes import (
    ATTRIBUTES,
    SPLITS,
    compare,
    eval_prompts,
    judge,
    judge_all,
    percent_with_interval,
    score,
    score_specs,
)

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


def test_eval_prompts_are_canonical_deterministic_and_split_by_composition():
    for split in SPLITS:
        prompts = eval_prompts(50, split, seed=7)
        assert prompts == eval_prompts(50, split, seed=7) != eval_prompts(50, split, seed=8)
        assert [caption(parse_caption(p)) for p in prompts] == prompts
        assert {is_held_out(parse_caption(p)) for p in prompts} == {split == "unseen"}
    with pytest.raises(ValueError, match="split"):
        eval_prompts(3, "all")


def test_accuracies_carry_their_wilson_intervals():
    spec = ShapeSpec("circle", "red", "large", "center", "white")
    verdicts = [{a: getattr(spec, a) for a in ATTRIBUTES}] * 8 + [{"background": "white"}] * 2
    result = compare(verdicts, [spec] * 10)
    assert result["all"] == 0.8 and result["background"] == 1.0
    low, high = result["ci95"]["all"]
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # Wilson (1927) for 8 of 10, z = 1.96
    assert result["ci95"]["background"][1] == 1.0 and 0.69 < result["ci95"]["background"][0] < 0.73
    assert percent_with_interval(result) == "80.0% [49.0, 94.3]"


def test_shape_centre_finds_the_shape_in_an_image_of_any_aspect_ratio():
    from t2i.eval.shapes import shape_centre
    img = np.full((32, 48, 3), 128.0)
    img[4:10, 30:40] = (255, 0, 0)  # rows 4..9, columns 30..39
    assert shape_centre(img) == pytest.approx((7.0, 35.0))
    img[20, 2] = (255, 255, 255)  # a stray pixel is not the largest region
    assert shape_centre(img) == pytest.approx((7.0, 35.0))
    assert shape_centre(np.full((16, 64, 3), 128.0)) is None


@pytest.mark.parametrize("canvas", [(64, 64), (64, 128), (128, 64), (40, 120)])
def test_judge_canvas_reads_colour_and_position_on_any_canvas(canvas):
    from dataclasses import replace

    from t2i.data.shapes import random_specs, render
    from t2i.eval.shapes import judge_canvas
    specs = [replace(s, canvas=canvas) for s in random_specs(60, seed=3)]
    verdicts = [judge_canvas(render(s)) for s in specs]
    assert [v["color"] for v in verdicts] == [s.color for s in specs]
    assert [v["position"] for v in verdicts] == [s.position for s in specs]
    assert judge_canvas(np.zeros((*canvas, 3))) == {"color": None, "position": None}
