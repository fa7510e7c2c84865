"""Prompt-alignment oracle for the "shapes" dataset: a deterministic reading of the pixels.

`judge` reads the five attributes of one image (no learned model):

1. background: the nearest of the 3 background colours to the median of the border pixels;
2. foreground: pixels farther than `FG_THRESHOLD` (colour distance, 0-255 units) from that background,
   reduced to their largest 8-connected component (generated images have specks and noise); when the
   border shows heavy noise (robust std > `NOISE_SMOOTH`) the image is first smoothed (`SMOOTH_SIGMA`);
3. colour: the shape colour whose line from the background passes nearest the median colour of the
   component's core (its half farthest from the background), so partly covered pixels still read right;
4. coverage: each pixel's fraction of the way from the background to that colour (clipped to [0, 1]),
   kept only on the component and a 1-pixel rim around it (the anti-aliased edge);
5. shape and size, by analysis-by-synthesis: each of the 6 (shape, size) candidates is drawn with the
   dataset's own renderer (`t2i.data.shapes.coverage`, border clipping included), centred so that its
   coverage centroid matches the image's, box-filtered down to the image's resolution and blurred by each
   of `BLURS` (generated images are soft), and the candidate with the least squared difference to the
   measured coverage wins - no hand-tuned thresholds on size, fill ratio or clipping;
6. position: the 3x3 grid cell of the winning candidate's bounding-box centre.

Images are judged at their own resolution (geometry in 64-px units, the templates box-filtered to the
image size), so 32x32 and 16x16 images need no upsampling; images larger than 64 px are box-filtered
down to 64 first. An image with no foreground gets None for every attribute but the background.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from t2i.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    RESOLUTION,
    SHAPES,
    SIZES,
    ShapeSpec,
    caption,
    coverage,
    held_out_specs,
    parse_caption,
    random_specs,
)
from t2i.eval.intervals import percent, wilson

ATTRIBUTES = ("shape", "color", "size", "position", "background")
FG_THRESHOLD = 40.0  # the closest colour/background pair (purple on gray) is ~95 apart
CENTRE_STEPS = 3  # centroid-matching refinements of each candidate's centre
BLURS = (0.0, 0.6, 1.0, 1.5)  # Gaussian blurs (sigma, image pixels) tried on each candidate template
NOISE_SMOOTH = 16.0  # border noise (0-255 units, per channel) above which the image is smoothed first
SMOOTH_SIGMA = 0.7  # that smoothing's Gaussian sigma, in image pixels
_CELL = RESOLUTION / 3
_CELL_NAMES = {rc: name for name, rc in POSITIONS.items()}
_BG_NAMES, _BG_RGB = list(BACKGROUNDS), np.asarray(list(BACKGROUNDS.values()), np.float32)
_FG_NAMES, _FG_RGB = list(COLORS), np.asarray(list(COLORS.values()), np.float32)


def to_hwc(image) -> np.ndarray:
    """One image as float32 (H, W, 3) in [0, 255].

    Accepts a PIL image, a numpy (H, W, 3) array in 0..255 (any dtype), or a torch (C, H, W) tensor:
    float in [-1, 1] (the models' convention) or uint8. One channel is repeated to three.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3:
            raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(t.shape)}")
        if t.dtype == torch.uint8:
            t = t.float()
        else:
            t = (t.float().clamp(-1, 1) + 1) * 127.5
        image = t.permute(1, 2, 0).numpy()
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.shape[0] != a.shape[1] or a.shape[0] < 4:
        raise ValueError(f"expected a square image of at least 4x4 pixels, got {a.shape[:2]}")
    if a.shape[0] > RESOLUTION:  # judge larger images at the native resolution
        small = Image.fromarray(np.rint(a.clip(0, 255)).astype(np.uint8), "RGB")
        a = np.asarray(small.resize((RESOLUTION, RESOLUTION), Image.BOX), np.float32)
    return a


def _neighbourhood_max(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    p = np.pad(a, 1)
    return np.max([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (label propagation; ties: first in raster order)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(h * w, 0, -1).reshape(h, w), 0)  # earlier pixel = larger label
    while True:
        grown = np.where(mask, _neighbourhood_max(labels), 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    ids, counts = np.unique(labels[mask], return_counts=True)
    best = ids[counts == counts.max()].max()
    return labels == best


def _reduce(a64: np.ndarray, res: int) -> np.ndarray:
    """A 64x64 coverage map box-filtered to res x res."""
    if res == RESOLUTION:
        return a64
    k = RESOLUTION // res
    if k * res == RESOLUTION:
        return a64.reshape(res, k, res, k).mean(axis=(1, 3))
    return np.asarray(Image.fromarray(a64, "F").resize((res, res), Image.BOX), np.float32)


@lru_cache(maxsize=64)
def _blur_matrix(res: int, sigma: float) -> np.ndarray:
    """(res, res) matrix of a 1-D Gaussian blur with zero padding: blurred = M @ a @ M.T."""
    x = np.arange(res, dtype=np.float64)
    m = np.exp(-0.5 * ((x[:, None] - x[None, :]) / sigma) ** 2)
    radius = int(np.ceil(3 * sigma))
    kernel_sum = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
    return (m / kernel_sum).astype(np.float32)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return a
    m = _blur_matrix(a.shape[0], sigma)
    if a.ndim == 3:
        return np.stack([m @ a[..., c] @ m.T for c in range(a.shape[2])], axis=-1)
    return m @ a @ m.T


def _centroid(alpha: np.ndarray) -> np.ndarray | None:
    """(x, y) of the coverage-weighted centre, in 64-px units."""
    total = float(alpha.sum())
    if total <= 1e-6:
        return None
    coords = (np.arange(alpha.shape[0], dtype=np.float64) + 0.5) * (RESOLUTION / alpha.shape[0])
    return np.array([(alpha.sum(axis=0) @ coords) / total, (alpha.sum(axis=1) @ coords) / total])


def _template(shape: str, size: str, centre: np.ndarray, res: int) -> np.ndarray:
    """Coverage of a shape whose bounding box is centred at `centre` (64-px units), at res x res."""
    row, col = (int(np.clip(v // _CELL, 0, 2)) for v in (centre[1], centre[0]))
    spec = ShapeSpec(shape, _FG_NAMES[0], size, _CELL_NAMES[(row, col)], _BG_NAMES[0],
                     float(centre[0] - (col + 0.5) * _CELL), float(centre[1] - (row + 0.5) * _CELL))
    return _reduce(coverage(spec), res)


def _fit(alpha: np.ndarray) -> tuple[str, str, np.ndarray]:
    """The (shape, size, bbox centre) whose rendering best matches the coverage map."""
    res = alpha.shape[0]
    target = _centroid(alpha)
    best = None
    for shape in SHAPES:
        for size in SIZES:
            centre = target.copy()
            if shape == "triangle":  # a triangle's centroid lies s/6 below its bbox centre
                centre[1] -= SIZES[size] / 6
            for _ in range(CENTRE_STEPS):
                got = _centroid(_template(shape, size, centre, res))
                if got is None:
                    break
                centre = np.clip(centre + (target - got), 0.0, float(RESOLUTION))
            template = _template(shape, size, centre, res)
            err = min(float(((alpha - _blur(template, b)) ** 2).sum()) for b in BLURS)
            if best is None or err < best[0]:
                best = (err, shape, size, centre)
    return best[1], best[2], best[3]


def _nearest_color(rgb: np.ndarray, bg: np.ndarray) -> int:
    """Index of the colour whose segment from the background passes nearest `rgb`."""
    d = _FG_RGB - bg  # (6, 3)
    frac = np.clip(((rgb - bg) @ d.T) / (d * d).sum(axis=1), 0.0, 1.0)
    residual = np.linalg.norm(bg + frac[:, None] * d - rgb, axis=1)
    return int(np.argmin(residual))


def judge(image) -> dict:
    """The attributes read from one image: {"shape", "color", "size", "position", "background"}.

    Values are the dataset's attribute names; all but "background" are None when no shape is found.
    """
    img = to_hwc(image)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_index = int(np.argmin(np.linalg.norm(_BG_RGB - np.median(border, axis=0), axis=1)))
    verdict = dict.fromkeys(ATTRIBUTES)
    verdict["background"] = _BG_NAMES[bg_index]
    bg = _BG_RGB[bg_index]
    noise = 1.4826 * float(np.median(np.abs(border - bg)))
    if noise > NOISE_SMOOTH:  # heavy noise: average it down before thresholding
        img = bg + _blur(img - bg, SMOOTH_SIGMA)
    dist = np.linalg.norm(img - bg, axis=2)
    mask = dist > FG_THRESHOLD
    if not mask.any():
        return verdict
    comp = _largest_component(mask)
    core = comp & (dist >= np.median(dist[comp]))
    fg_index = _nearest_color(np.median(img[core], axis=0), bg)
    fg = _FG_RGB[fg_index]
    alpha = np.clip(((img - bg) @ (fg - bg)) / float((fg - bg) @ (fg - bg)), 0.0, 1.0)
    alpha = np.where(_neighbourhood_max(comp), alpha, 0.0).astype(np.float32)
    shape, size, centre = _fit(alpha)
    row, col = (int(np.clip(v // _CELL, 0, 2)) for v in (centre[1], centre[0]))
    verdict.update(shape=shape, color=_FG_NAMES[fg_index], size=size, position=_CELL_NAMES[(row, col)])
    return verdict


def judge_all(images: Iterable) -> list[dict]:
    """`judge` over a batch: a list of images, a (B, C, H, W) tensor or a (B, H, W, 3) array."""
    return [judge(image) for image in images]


def compare(verdicts: Sequence[dict], specs: Sequence[ShapeSpec]) -> dict:
    """Accuracy of verdicts against the specs they should show.

    Returns {"n", "all", "shape", "color", "size", "position", "background", "ci95", "confusion"}: accuracies
    in [0, 1] ("all": every attribute right; None counts as wrong), their 95% Wilson intervals
    (ci95[attribute] = [low, high]) and, per attribute, confusion[attribute][expected][read] counts (a
    missing reading is keyed "none").
    """
    if len(verdicts) != len(specs):
        raise ValueError(f"{len(verdicts)} images but {len(specs)} prompts")
    n = len(specs)
    right = dict.fromkeys(ATTRIBUTES, 0)
    all_right = 0
    confusion: dict[str, dict[str, dict[str, int]]] = {a: {} for a in ATTRIBUTES}
    for verdict, spec in zip(verdicts, specs, strict=True):
        ok = True
        for a in ATTRIBUTES:
            want, got = getattr(spec, a), verdict.get(a)
            row = confusion[a].setdefault(want, {})
            row[got or "none"] = row.get(got or "none", 0) + 1
            right[a] += got == want
            ok &= got == want
        all_right += ok
    div = float(n) if n else float("nan")
    counts = {**right, "all": all_right}
    return {"n": n, "all": all_right / div, **{a: right[a] / div for a in ATTRIBUTES},
            "ci95": {a: list(wilson(k, n)) for a, k in counts.items()}, "confusion": confusion}


def score_specs(images: Iterable, specs: Sequence[ShapeSpec]) -> dict:
    """Prompt alignment of images with the specs they were generated from (see `compare`)."""
    return compare(judge_all(images), specs)


def score(images: Iterable, prompts: Sequence[str]) -> dict:
    """Prompt alignment of images with their canonical captions (see `compare`)."""
    return score_specs(images, [parse_caption(p) for p in prompts])


PROMPT_SEED = 20_000
SPLITS = ("seen", "unseen")


def eval_specs(n: int, split: str = "seen", seed: int = PROMPT_SEED) -> list[ShapeSpec]:
    """`n` specs for evaluating a generator, drawn deterministically: ``seen`` from the compositions the
    training split shows (uniform outside `HELD_OUT`), ``unseen`` from the held-out ones only (`HELD_OUT`
    triples, size and background uniform). Validation images are never copied: the prompts are new draws."""
    if split == "seen":
        return random_specs(n, seed, exclude_held_out=True)
    if split == "unseen":
        return held_out_specs(n, seed + 1)
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def eval_prompts(n: int, split: str = "seen", seed: int = PROMPT_SEED) -> list[str]:
    """The canonical captions of `eval_specs`."""
    return [caption(spec) for spec in eval_specs(n, split, seed)]


def percent_with_interval(result: dict, attribute: str = "all") -> str:
    """``95.5% [92.0, 97.6]``: an accuracy of `compare` with its 95% interval, for reports."""
    return percent(result[attribute], result["ci95"][attribute])


def _foreground(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(the background colour, each pixel's distance from it, the mask of the largest region that differs from
    it) of an (H, W, 3) image."""
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = _BG_RGB[int(np.argmin(np.linalg.norm(_BG_RGB - np.median(border, axis=0), axis=1)))]
    dist = np.linalg.norm(img - bg, axis=2)
    mask = dist > FG_THRESHOLD
    return (bg, dist, _largest_component(mask)) if mask.any() else None


def shape_centre(image: np.ndarray) -> tuple[float, float] | None:
    """(row, column) in pixels of the drawn shape's centre in an (H, W, 3) image of any aspect ratio in 0..255:
    the centroid of the largest connected region that differs from the background (the border's colour);
    None when nothing stands out. For the size/crop conditioning's check that crop offsets move the content."""
    found = _foreground(np.asarray(image, dtype=np.float32))
    if found is None:
        return None
    rows, cols = np.nonzero(found[2])
    return float(rows.mean()) + 0.5, float(cols.mean()) + 0.5


def judge_canvas(image: np.ndarray) -> dict:
    """Colour and position (the canvas's thirds) of the shape in an (H, W, 3) image of any aspect ratio, 0..255;
    None for both when there is no shape. Shape and size are judged by `judge`, on squares only."""
    img = np.asarray(image, dtype=np.float32)
    found = _foreground(img)
    if found is None:
        return {"color": None, "position": None}
    bg, dist, comp = found
    core = comp & (dist >= np.median(dist[comp]))
    rows, cols = np.nonzero(comp)
    h, w = comp.shape
    cell = (int(np.clip((rows.mean() + 0.5) * 3 // h, 0, 2)), int(np.clip((cols.mean() + 0.5) * 3 // w, 0, 2)))
    return {"color": _FG_NAMES[_nearest_color(np.median(img[core], axis=0), bg)], "position": _CELL_NAMES[cell]}
