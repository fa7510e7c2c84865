"""Aspect-ratio buckets: the generated set, the assignment of an image to a bucket, the cover-and-crop geometry."""

from __future__ import annotations

import pytest

from t2i.data.buckets import bucket_sizes, cover_and_crop, nearest_bucket

# SDXL's training sizes for 1024² (Podell et al. 2023, appendix I), as (height, width): the tall half, the square
# and the wide half, which is the tall half transposed less one size (704 x 1344 has no 1344 x 704 there).
SDXL_TALL = [(2048, 512), (1984, 512), (1920, 512), (1856, 512), (1792, 576), (1728, 576), (1664, 576),
             (1600, 640), (1536, 640), (1472, 704), (1408, 704), (1344, 704), (1344, 768), (1280, 768),
             (1216, 832), (1152, 832), (1152, 896), (1088, 896), (1088, 960), (1024, 960)]


def test_the_1024_set_is_sdxls():
    sizes = bucket_sizes(1024 ** 2, multiple=64)
    sdxl = {*SDXL_TALL, (1024, 1024), *((w, h) for h, w in SDXL_TALL if (h, w) != (1344, 704))}
    assert len(sdxl) == 40 and set(sizes) == sdxl | {(704, 1344)} and len(sizes) == 41
    assert sizes[0] == (2048, 512) and sizes[20] == (1024, 1024) and sizes[-1] == (512, 2048)  # tall to wide


@pytest.mark.parametrize(("area", "multiple"), [(256 ** 2, 64), (512 ** 2, 64), (64 ** 2, 16), (32 ** 2, 8)])
def test_every_size_is_a_multiple_near_the_area_and_not_too_elongated(area, multiple):
    sizes = bucket_sizes(area, multiple)
    assert (int(area ** 0.5),) * 2 in sizes  # the square, when the side is a multiple
    for h, w in sizes:
        assert h % multiple == 0 and w % multiple == 0
        assert 0.9 * area <= h * w <= area and max(h, w) <= 4 * min(h, w)
    assert sizes == sorted(sizes, key=lambda hw: hw[1] / hw[0])
    assert {(w, h) for h, w in sizes} == set(sizes)  # every shape has its transpose


def test_sizes_refuse_what_cannot_be_met():
    with pytest.raises(ValueError, match="no size that is a multiple of 64"):
        bucket_sizes(100 ** 2, 64)
    with pytest.raises(ValueError, match="must be positive"):
        bucket_sizes(0)


def test_nearest_bucket_by_log_aspect_ratio():
    sizes = bucket_sizes(1024 ** 2)
    assert sizes[nearest_bucket(1000, 1000, sizes)] == (1024, 1024)
    assert sizes[nearest_bucket(3000, 750, sizes)] == (2048, 512)  # 4:1 and beyond: the tallest
    assert sizes[nearest_bucket(100, 10_000, sizes)] == (512, 2048)
    assert sizes[nearest_bucket(1080, 1920, sizes)] == (768, 1344)  # 16:9 (log 0.575; 7:4 is 0.560)
    # 1:2 and 2:1 are equally far from the square: the assignment is symmetric
    for h, w in [(480, 640), (600, 900), (333, 1000)]:
        a, b = sizes[nearest_bucket(h, w, sizes)], sizes[nearest_bucket(w, h, sizes)]
        assert a == (b[1], b[0])
    with pytest.raises(ValueError, match="no aspect ratio"):
        nearest_bucket(0, 10, sizes)


def test_cover_and_crop():
    (rh, rw), (top, left) = cover_and_crop(1080, 1920, (768, 1344))
    assert rh >= 768 and rw >= 1344 and (rh == 768 or rw == 1344)  # the smallest cover
    assert abs(rw / rh - 1920 / 1080) < 0.01  # aspect ratio kept
    assert (top, left) == (round((rh - 768) / 2), round((rw - 1344) / 2))  # centred by default
    (rh, rw), (top, left) = cover_and_crop(400, 1000, (256, 256), offset=(0.0, 1.0))
    assert (rh, rw) == (256, 640) and (top, left) == (0, 640 - 256)  # the right end
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        cover_and_crop(10, 10, (8, 8), offset=(1.5, 0))
