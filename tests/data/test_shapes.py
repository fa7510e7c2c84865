"""The shapes dataset definition: determinism, exact colours, geometry, captions."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from t2i_testing import all_specs

from t2i.data.shapes import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    POSITIONS,
    RESOLUTION,
    SHAPES,
    SIZES,
    ShapeSpec,
    attributes,
    bbox,
    caption,
    encode_sample,
    held_out_specs,
    is_held_out,
    parse_caption,
    random_specs,
    render,
)

CELL = RESOLUTION / 3


def mask_of(img: np.ndarray, spec: ShapeSpec) -> np.ndarray:
    """Pixels at least half-way from the background colour to the shape colour."""
    bg = np.asarray(BACKGROUNDS[spec.background], np.float32)
    fg = np.asarray(COLORS[spec.color], np.float32)
    frac = ((img.astype(np.float32) - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
    return frac >= 0.5


def jittered(n: int, seed: int = 0) -> list[ShapeSpec]:
    """Every combination with a random jitter."""
    rng = np.random.default_rng(seed)
    return [ShapeSpec(s.shape, s.color, s.size, s.position, s.background, *rng.uniform(-1, 1, 2))
            for s in all_specs()][:n]


def test_constants():
    assert len(all_specs()) == 3 * 6 * 2 * 9 * 3 == 972
    assert SHAPES == ("circle", "square", "triangle") and SIZES == {"small": 14, "large": 26}
    assert sorted(POSITIONS.values()) == [(r, c) for r in range(3) for c in range(3)]


def test_random_specs_deterministic_and_uniform():
    a, b = random_specs(3000, seed=5), random_specs(3000, seed=5)
    assert a == b and a != random_specs(3000, seed=6)
    assert all(-1 <= s.dx <= 1 and -1 <= s.dy <= 1 for s in a)
    for name, values in (("shape", SHAPES), ("color", COLORS), ("position", POSITIONS)):
        counts = {v: sum(getattr(s, name) == v for s in a) for v in values}
        expected = len(a) / len(values)
        assert all(abs(c - expected) < 0.25 * expected for c in counts.values()), counts


def test_held_out_compositions_keep_every_value_and_pair_seen():
    """18 of the 162 (shape, colour, position) triples, one per (shape, colour) pair, two per position; each
    (shape, position) and (colour, position) pair is held out with at most one triple, so all pairs stay seen."""
    assert len(HELD_OUT) == len(set(HELD_OUT)) == 18
    assert {(s, c) for s, c, _ in HELD_OUT} == {(s, c) for s in SHAPES for c in COLORS}
    assert sorted(Counter(p for _, _, p in HELD_OUT).values()) == [2] * 9
    triples = {(s.shape, s.color, s.position) for s in all_specs()}
    for i, j in ((0, 1), (0, 2), (1, 2)):
        seen = {(t[i], t[j]) for t in triples - set(HELD_OUT)}
        assert seen == {(t[i], t[j]) for t in triples}, (i, j)


def test_random_specs_can_leave_the_held_out_compositions_out():
    specs = random_specs(4000, seed=3, exclude_held_out=True)
    assert len(specs) == 4000 and not any(is_held_out(s) for s in specs)
    assert specs == random_specs(4000, seed=3, exclude_held_out=True)
    assert specs[:100] != random_specs(4000, seed=4, exclude_held_out=True)[:100]
    unseen = held_out_specs(500, seed=3)
    assert all(is_held_out(s) for s in unseen) and {(s.shape, s.color, s.position) for s in unseen} == set(HELD_OUT)
    assert {s.size for s in unseen} == set(SIZES) and {s.background for s in unseen} == set(BACKGROUNDS)


def test_render_and_encode_deterministic():
    spec = random_specs(1, seed=1)[0]
    img = render(spec)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert np.array_equal(img, render(spec))
    assert encode_sample(spec) == encode_sample(spec)


def test_exact_colours_at_centre_and_far_corner():
    for spec in jittered(972):
        img = render(spec)
        x0, y0, x1, y1 = bbox(spec)
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        assert tuple(img[cy, cx]) == COLORS[spec.color], spec
        row, col = POSITIONS[spec.position]
        far_y, far_x = (63 if row < 1 else 0), (63 if col < 1 else 0)
        assert tuple(img[far_y, far_x]) == BACKGROUNDS[spec.background], spec


def test_antialiased_edges():
    img = render(ShapeSpec("circle", "red", "large", "center", "white", 0.3, 0.3))
    distinct = {tuple(p) for p in img.reshape(-1, 3)}
    assert len(distinct) > 5  # background, colour and blends


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_bbox_extent(shape, size):
    """Mask extent = box side ±1 px; large shapes off-centre are clipped by the border (up to ~3.3 px)."""
    for position in POSITIONS:
        for dx, dy in ((0, 0), (1, -1), (-0.6, 0.45), (-1, -1)):
            spec = ShapeSpec(shape, "blue", size, position, "white", dx, dy)
            mask = (render(spec) != BACKGROUNDS["white"]).any(axis=-1)
            rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            x0, y0, x1, y1 = np.clip(bbox(spec), 0, RESOLUTION)
            assert abs(height - (y1 - y0)) <= 1.01, (spec, height)
            if shape != "triangle" or bbox(spec)[3] <= RESOLUTION:  # a clipped base is narrower
                assert abs(width - (x1 - x0)) <= 1.01, (spec, width)
            assert SIZES[size] - 3.4 <= min(x1 - x0, y1 - y0)
            if position == "center":
                assert abs(height - SIZES[size]) <= 1 and abs(width - SIZES[size]) <= 1


@pytest.mark.parametrize("size", SIZES)
def test_triangle_apex_up(size):
    spec = ShapeSpec("triangle", "green", size, "center", "black", 0.2, -0.4)
    widths = mask_of(render(spec), spec).sum(axis=1)
    widths = widths[widths > 0]
    assert np.all(np.diff(widths) >= 0) and widths[-1] - widths[0] >= SIZES[size] - 4
    assert widths[0] <= 3 and widths[-1] >= SIZES[size] - 1


def test_centroid_in_grid_cell():
    for spec in jittered(972, seed=1):
        ys, xs = np.nonzero(mask_of(render(spec), spec))
        row, col = POSITIONS[spec.position]
        assert (int((ys.mean() + 0.5) // CELL), int((xs.mean() + 0.5) // CELL)) == (row, col), spec


def test_caption_round_trip_all_combinations():
    captions = set()
    for spec in all_specs():
        text = caption(spec)
        captions.add(text)
        assert parse_caption(text) == spec
    assert len(captions) == 972
    assert caption(ShapeSpec("circle", "red", "large", "top left", "white")) == \
        "a large red circle in the top left on a white background"


@pytest.mark.parametrize("text", [
    "a big red circle in the top left on a white background",
    "a large red circle in the top left on a white background.",
    "A large red circle in the top left on a white background",
    "a large red  circle in the top left on a white background",
    "a large red circle in the middle on a white background",
    "",
])
def test_parse_caption_rejects_non_canonical(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_spec_validation_and_attributes():
    with pytest.raises(ValueError):
        ShapeSpec("hexagon", "red", "small", "center", "black")
    spec = ShapeSpec("square", "orange", "small", "bottom right", "gray", 0.5, -1.0)
    attrs = json.loads(json.dumps(attributes(spec)))
    assert attrs["center"] == pytest.approx([2.5 * CELL + 0.5, 2.5 * CELL - 1.0])
    assert attrs["bbox"] == pytest.approx([attrs["center"][0] - 7, attrs["center"][1] - 7,
                                           attrs["center"][0] + 7, attrs["center"][1] + 7])
    assert attrs["shape"] == "square" and attrs["color_rgb"] == list(COLORS["orange"])


def test_canvases_of_several_aspect_ratios(tmp_path):
    """make_shapes.py --canvases: each sample on a canvas drawn from the list, the grid's thirds the canvas's;
    json and manifest hold the sizes (what buckets read); the default square data is unchanged."""
    from t2i_testing import load_data_prep

    from t2i.data.manifest import load_manifest
    from t2i.data.tar_reader import read_samples
    make = load_data_prep("make_shapes")
    canvases = [(64, 64), (64, 128), (128, 64)]
    make.make_shapes(tmp_path / "aspect", train=40, val=0, shard_size=16, workers=1, canvases=canvases)
    manifest = load_manifest(tmp_path / "aspect" / "train")
    sizes = [hw for s in manifest.shards for hw in s.sizes]
    assert len(sizes) == 40 and set(sizes) == set(canvases)
    first = next(read_samples(manifest.shards[0].url, 0, 1))
    meta = json.loads(first.fields["json"])
    import io

    from PIL import Image
    img = Image.open(io.BytesIO(first.fields["png"]))
    assert (meta["height"], meta["width"]) == (img.height, img.width) == sizes[0]
    make.make_shapes(tmp_path / "square", train=10, val=0, shard_size=16, workers=1)
    square = load_manifest(tmp_path / "square" / "train")
    assert square.shards[0].sizes is None
    assert "height" not in json.loads(next(read_samples(square.shards[0].url, 0, 1)).fields["json"])
    with pytest.raises(ValueError, match="too small"):
        ShapeSpec("circle", "red", "large", "center", "black", canvas=(20, 64))
