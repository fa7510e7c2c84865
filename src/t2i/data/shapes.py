"""The built-in "shapes" dataset: one anti-aliased shape on a plain background, 64x64 RGB.

Every sample is fully described by a `ShapeSpec`; its canonical caption is
``"a {size} {color} {shape} in the {position} on a {background} background"``.
The constants here are the exact definition (an evaluation oracle reuses them).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from PIL import Image

RESOLUTION = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SIZES = {"small": 14, "large": 26}  # bounding-box side in pixels
POSITIONS = {  # name -> (row, col) of the 3x3 grid
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
MAX_JITTER = 1.0  # px, per axis
SUPERSAMPLE = 8  # coverage samples per pixel per axis (anti-aliasing)
GENERATOR_VERSION = 2  # bump when rendering or sampling changes (2: held-out compositions)

# Compositions the training split never shows, so that evaluation can ask for combinations a model has not
# seen: one (shape, colour, position) triple per (shape, colour) pair, 18 of the 162 triples (11%). The k-th
# pair takes position 2k mod 9, so each position is held out for two pairs, each shape at six positions and
# each colour at three: every single value, and every (shape, colour), (shape, position) and (colour,
# position) pair, is still seen in training - only the 18 triples are new.
HELD_OUT_ATTRIBUTES = ("shape", "color", "position")
HELD_OUT: tuple[tuple[str, str, str], ...] = tuple(
    (shape, color, list(POSITIONS)[(2 * (i * len(COLORS) + j)) % len(POSITIONS)])
    for i, shape in enumerate(SHAPES) for j, color in enumerate(COLORS))


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    color: str
    size: str
    position: str
    background: str
    dx: float = 0.0  # jitter of the centre, px
    dy: float = 0.0
    canvas: tuple[int, int] = (RESOLUTION, RESOLUTION)  # (height, width): the grid's thirds are the canvas's

    def __post_init__(self):
        if len(self.canvas) != 2 or min(self.canvas) < 3 * SIZES["large"] // 2:
            raise ValueError(f"canvas (height, width) {self.canvas} too small for the shapes")
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.color, COLORS, "color"),
                                     (self.size, SIZES, "size"), (self.position, POSITIONS, "position"),
                                     (self.background, BACKGROUNDS, "background")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")


def caption(spec: ShapeSpec) -> str:
    return f"a {spec.size} {spec.color} {spec.shape} in the {spec.position} on a {spec.background} background"


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_CAPTION_RE = re.compile(
    rf"a ({_alternatives(SIZES)}) ({_alternatives(COLORS)}) ({_alternatives(SHAPES)}) "
    rf"in the ({_alternatives(POSITIONS)}) on a ({_alternatives(BACKGROUNDS)}) background"
)


def parse_caption(text: str) -> ShapeSpec:
    """Inverse of `caption` (jitter is not in the caption: dx = dy = 0)."""
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a canonical shapes caption: {text!r}")
    size, color, shape, position, background = m.groups()
    return ShapeSpec(shape, color, size, position, background)


def caption_attributes(text: str) -> dict[str, str]:
    """``{attribute: value}`` of a canonical shapes caption (shape, color, size, position, background): the
    label function of the noisy classifier and of classifier guidance on this dataset."""
    spec = parse_caption(text)
    return {f.name: getattr(spec, f.name) for f in fields(spec) if isinstance(getattr(spec, f.name), str)}


def center(spec: ShapeSpec) -> tuple[float, float]:
    """(x, y) of the bounding-box centre in pixels (pixel i spans [i, i+1))."""
    row, col = POSITIONS[spec.position]
    height, width = spec.canvas
    return (col + 0.5) * width / 3 + spec.dx, (row + 0.5) * height / 3 + spec.dy


def bbox(spec: ShapeSpec) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the shape's bounding box in pixels, unclipped."""
    cx, cy = center(spec)
    h = SIZES[spec.size] / 2
    return cx - h, cy - h, cx + h, cy + h


def attributes(spec: ShapeSpec) -> dict:
    """A json-able description of the sample: attribute names, jitter, centre and bbox in pixels."""
    d = asdict(spec)
    d.update(
        center=[round(v, 4) for v in center(spec)],
        bbox=[round(v, 4) for v in bbox(spec)],
        size_px=SIZES[spec.size],
        color_rgb=list(COLORS[spec.color]),
        background_rgb=list(BACKGROUNDS[spec.background]),
        resolution=RESOLUTION,
    )
    if tuple(spec.canvas) == (RESOLUTION, RESOLUTION):
        del d["canvas"]  # the square samples' json stays as it always was
    else:  # img2dataset's keys: data_prep/make_manifest.py --sizes reads them
        d["canvas"], d["height"], d["width"] = list(spec.canvas), *spec.canvas
    return d


def coverage(spec: ShapeSpec) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float32 (height, width) of the canvas, in [0, 1]."""
    x0, y0, x1, y1 = bbox(spec)
    cx, cy = center(spec)
    h = SIZES[spec.size] / 2
    height, width = spec.canvas
    cov = np.zeros((height, width), np.float32)
    c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), width)
    r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), height)
    s = SUPERSAMPLE
    offsets = (np.arange(s) + 0.5) / s
    u = (np.arange(c0, c1)[:, None] + offsets).reshape(-1)[None, :]  # sample x, shape (1, W*s)
    v = (np.arange(r0, r1)[:, None] + offsets).reshape(-1)[:, None]  # sample y, shape (H*s, 1)
    if spec.shape == "square":
        inside = (u >= x0) & (u < x1) & (v >= y0) & (v < y1)
    elif spec.shape == "circle":
        inside = (u - cx) ** 2 + (v - cy) ** 2 <= h * h
    else:  # upright triangle: apex at (cx, y0), base from x0 to x1 at y1
        inside = (v >= y0) & (v < y1) & (np.abs(u - cx) <= (v - y0) / 2)
    block = inside.reshape(r1 - r0, s, c1 - c0, s).mean(axis=(1, 3), dtype=np.float32)
    cov[r0:r1, c0:c1] = block
    return cov


def render(spec: ShapeSpec) -> np.ndarray:
    """The image, uint8 (height, width, 3) of the canvas: background blended with the shape colour by pixel
    coverage."""
    a = coverage(spec)[..., None]
    bg = np.asarray(BACKGROUNDS[spec.background], np.float32)
    fg = np.asarray(COLORS[spec.color], np.float32)
    return np.rint(bg + (fg - bg) * a).astype(np.uint8)


def held_out_combinations() -> list[dict[str, str]]:
    """`HELD_OUT` as manifests record it: a list of {attribute: value}."""
    return [dict(zip(HELD_OUT_ATTRIBUTES, triple, strict=True)) for triple in HELD_OUT]


def is_held_out(spec: ShapeSpec) -> bool:
    return (spec.shape, spec.color, spec.position) in HELD_OUT


def random_specs(n: int, seed: int, exclude_held_out: bool = False) -> list[ShapeSpec]:
    """`n` specs uniform over all attributes, with jitter uniform in [-1, 1] px (rounded to 1e-3); with
    `exclude_held_out`, uniform over the combinations outside `HELD_OUT` (drawn in rounds from the same
    generator, so still a pure function of (n, seed))."""
    rng = np.random.default_rng(seed)
    specs = _draw(rng, n)
    while exclude_held_out and len(specs := [s for s in specs if not is_held_out(s)]) < n:
        specs += _draw(rng, n - len(specs))
    return specs


def held_out_specs(n: int, seed: int) -> list[ShapeSpec]:
    """`n` specs of the held-out compositions: a triple of `HELD_OUT` uniformly, size, background and
    jitter as `random_specs` draws them."""
    rng = np.random.default_rng(seed)
    triples = rng.integers(0, len(HELD_OUT), size=n)
    return [ShapeSpec(*HELD_OUT[t][:2], s.size, HELD_OUT[t][2], s.background, s.dx, s.dy)
            for t, s in zip(triples, _draw(rng, n), strict=True)]


def with_canvases(specs: list[ShapeSpec], canvases: list[tuple[int, int]], seed: int) -> list[ShapeSpec]:
    """`specs` on canvases drawn uniformly from `canvases` ((height, width) each), a pure function of `seed`."""
    pick = np.random.default_rng([seed, 0xCA]).integers(0, len(canvases), size=len(specs))
    return [replace(s, canvas=tuple(int(v) for v in canvases[k])) for s, k in zip(specs, pick, strict=True)]


def _draw(rng: np.random.Generator, n: int) -> list[ShapeSpec]:
    pick = {name: rng.integers(0, len(vals), size=n) for name, vals in
            (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", POSITIONS),
             ("background", BACKGROUNDS))}
    jitter = np.round(rng.uniform(-MAX_JITTER, MAX_JITTER, size=(n, 2)), 3)
    shapes, colors, sizes = list(SHAPES), list(COLORS), list(SIZES)
    positions, backgrounds = list(POSITIONS), list(BACKGROUNDS)
    return [
        ShapeSpec(shapes[pick["shape"][i]], colors[pick["color"][i]], sizes[pick["size"][i]],
                  positions[pick["position"][i]], backgrounds[pick["background"][i]],
                  float(jitter[i, 0]), float(jitter[i, 1]))
        for i in range(n)
    ]


def encode_sample(spec: ShapeSpec) -> dict[str, bytes | str]:
    """WebDataset fields of one sample: png bytes, caption, json (attributes + caption)."""
    buf = io.BytesIO()
    Image.fromarray(render(spec), "RGB").save(buf, format="PNG")
    text = caption(spec)
    meta = {**attributes(spec), "caption": text}
    return {"png": buf.getvalue(), "txt": text, "json": json.dumps(meta, sort_keys=True)}


def encode_chunk(specs: list[ShapeSpec]) -> list[dict[str, bytes | str]]:
    """`encode_sample` over a chunk (the unit of work for a process pool)."""
    return [encode_sample(s) for s in specs]
