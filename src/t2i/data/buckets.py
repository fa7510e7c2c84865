"""Aspect-ratio buckets (SDXL, Podell et al. 2023, §2.2 and appendix I): a set of training sizes of about one
pixel area, each image trained at the size nearest its own aspect ratio instead of cropped to a square.

`bucket_sizes` generates the set for any area: every (height, width) that is a multiple of ``multiple`` (the
latent factor times the UNet's total downsampling, so that every level of the UNet divides it), fills between
``min_fill`` and 1 of the target area, and is no more elongated than ``max_ratio``. For 1024² with multiple 64,
fill 0.9 and ratio 4 this is SDXL's list of 40 sizes (512×2048 ... 1024×1024 ... 2048×512) and one more: the
transpose of 704×1344, which SDXL's list has in one orientation only. The set here is symmetric, so that a
portrait and the same landscape image are treated alike.

`nearest_bucket` assigns an image by the log of its aspect ratio (so 1:2 and 2:1 are equally far from 1:1);
`cover_and_crop` gives the resize that covers the bucket and the crop offsets of the part kept (random in
training, centred in validation), which SDXL's micro-conditioning gives the network.
"""

from __future__ import annotations

import math


def bucket_sizes(area: int, multiple: int = 64, max_ratio: float = 4.0,
                 min_fill: float = 0.9) -> list[tuple[int, int]]:
    """(height, width) sizes, sorted from the tallest to the widest (the square, when there is one, in the
    middle). ``area``: the target pixel area (e.g. 1024 ** 2)."""
    if area <= 0 or multiple <= 0:
        raise ValueError(f"area and multiple must be positive, got {area} and {multiple}")
    if max_ratio < 1.0 or not 0.0 < min_fill <= 1.0:
        raise ValueError(f"max_ratio must be >= 1 and min_fill in (0, 1], got {max_ratio} and {min_fill}")
    sizes = []
    side = multiple
    while side * multiple <= area:
        for other in range(multiple, area // side + 1, multiple):
            fill = side * other / area
            if min_fill <= fill <= 1.0 and max(side, other) <= max_ratio * min(side, other):
                sizes.append((side, other))
        side += multiple
    if not sizes:
        raise ValueError(f"no size that is a multiple of {multiple} fills {min_fill:g} to 1 of the area {area}: "
                         f"lower min_fill or the multiple")
    return sorted(set(sizes), key=lambda hw: (hw[1] / hw[0], hw[0]))


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (in log ratio; a tie goes to the larger
    area, then to the first)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"an image of {height}x{width} pixels has no aspect ratio")
    ratio = math.log(height / width)
    return min(range(len(buckets)),
               key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), -buckets[i][0] * buckets[i][1]))


def bucket_of(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """The bucket of an image of ``size`` (height, width); (0, 0), an unknown size, goes to the squarest bucket
    (the sample is then planned there and skipped, counted, when it cannot be decoded)."""
    h, w = size
    return nearest_bucket(h, w, buckets) if h > 0 and w > 0 else nearest_bucket(1, 1, buckets)


def cover_and_crop(height: int, width: int, bucket: tuple[int, int],
                   offset: tuple[float, float] | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized height, width), (top, left)): the smallest resize of an image that covers ``bucket`` (aspect ratio
    kept), and where the bucket-sized crop of it starts. ``offset``: (u, v) in [0, 1] picks the crop along each
    axis (random draws in training); None centres it."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    u, v = offset if offset is not None else (0.5, 0.5)
    if not (0.0 <= u <= 1.0 and 0.0 <= v <= 1.0):
        raise ValueError(f"crop offset must be in [0, 1], got {offset}")
    return (rh, rw), (round((rh - bh) * u), round((rw - bw) * v))
