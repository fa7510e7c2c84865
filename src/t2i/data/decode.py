"""Turn a raw sample (bytes per field) into training tensors, or say precisely why not.

Images: jpg/png/webp in any mode (grayscale, palette, RGBA, 16-bit) become RGB uint8 CHW tensors,
resized on the shorter side and cropped square. Captions come from ``.txt`` or a json field, with
NUL and the other non-whitespace control characters removed anywhere in them. Derived array keys
(``latent.npy``, ``clip_img.npy``...) pass through as tensors. Every failure raises
`BadSample` with a reason; the stream skips and counts it.
"""

from __future__ import annotations

import io
import json
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from t2i.data.buckets import cover_and_crop

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")

# NUL and the other C0/C1 control characters (Unicode category Cc, all below U+0100) are not text: a
# caption made of them is no caption, and inside one they only feed the tokenizer noise. Tab, newline
# and the other whitespace controls stay whitespace.
_CONTROL_CHARS = dict.fromkeys(c for c in range(0x100)
                               if unicodedata.category(chr(c)) == "Cc" and not chr(c).isspace())


class BadSample(ValueError):
    """A sample that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class DecodeConfig:
    resolution: int = 64  # output side; 0 keeps no image (e.g. latent-only training)
    crop: str = "center"  # center | random
    image_fields: tuple[str, ...] = IMAGE_FIELDS
    caption_field: str = "txt"  # "txt", or "json:<key>" for a field of the sample's json
    caption_required: bool = True
    array_fields: tuple[str, ...] = ()  # derived keys that must be present, e.g. ("latent.npy",)
    array_shapes: tuple[tuple[int, ...] | None, ...] = ()  # expected shape per array field (or None)
    max_pixels: int = 64_000_000  # larger images are skipped (decompression bombs)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _open_image(data: bytes, cfg: DecodeConfig, cover: tuple[int, int]) -> Image.Image:
    """The RGB image, decoded at a reduced JPEG scale where that still covers ``cover`` (height, width)."""
    if not data:
        raise BadSample("empty image file")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > cfg.max_pixels:
            raise BadSample(f"image exceeds max_pixels ({w}x{h} > {cfg.max_pixels})")
        if img.format == "JPEG":  # decode at a reduced scale when the image is much larger
            ch, cw = cover
            by_height = ch * w >= cw * h  # the height binds: scale ch / h (integer maths, exact)
            size = (w * ch // h, ch) if by_height else (cw, h * cw // w)
            img.draft("RGB", (max(cw, size[0]), max(ch, size[1])))
        img.load()
    except BadSample:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit (Image.MAX_IMAGE_PIXELS), below max_pixels
        raise BadSample(f"image exceeds PIL's decompression-bomb limit ({e})") from None
    except Exception as e:  # PIL raises many types for bad bytes  # noqa: BLE001
        raise BadSample(f"undecodable image ({type(e).__name__}: {e})") from None
    return _to_rgb(img)


def decode_image(data: bytes, cfg: DecodeConfig, crop_rng: np.random.Generator | None = None) -> torch.Tensor:
    side = cfg.resolution
    img = _open_image(data, cfg, (side, side))
    w, h = img.size
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
    if cfg.crop == "random" and crop_rng is not None:
        left, top = int(crop_rng.integers(0, nw - side + 1)), int(crop_rng.integers(0, nh - side + 1))
    else:
        left, top = (nw - side) // 2, (nh - side) // 2
    if (nw, nh) != (side, side):
        img = img.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def decode_image_to(data: bytes, cfg: DecodeConfig, bucket: tuple[int, int],
                    offset: tuple[float, float] | None = None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(image (3, height, width) of ``bucket``, the image's own (height, width), the (top, left) of the crop kept
    on the resized image): resized to cover the bucket, aspect ratio kept, and cropped; ``offset`` (u, v) in
    [0, 1] places the crop (random draws in training), None centres it."""
    img = _open_image(data, cfg, bucket)
    with Image.open(io.BytesIO(data)) as header:  # the file's own size: a JPEG may have been decoded reduced
        original = (header.size[1], header.size[0])
    (rh, rw), (top, left) = cover_and_crop(*original, bucket, offset)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.BICUBIC, reducing_gap=3.0 if rh < img.size[1] / 2 else None)
    if (rh, rw) != bucket:
        img = img.crop((left, top, left + bucket[1], top + bucket[0]))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), original, (top, left)


def decode_caption(fields: dict[str, bytes], cfg: DecodeConfig) -> str:
    if cfg.caption_field.startswith("json:"):
        name = cfg.caption_field[5:]
        raw = fields.get("json")
        if raw is None:
            text = None
        else:
            try:
                text = json.loads(raw.decode("utf-8")).get(name)
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                raise BadSample(f"unreadable json ({e})") from None
            if text is not None and not isinstance(text, str):
                raise BadSample(f"json field {name!r} is not a string")
    else:
        raw = fields.get(cfg.caption_field)
        if raw is None:
            text = None
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadSample("caption is not valid UTF-8") from None
    text = (text or "").strip()
    if not text:
        if cfg.caption_required:
            raise BadSample("missing or empty caption")
        return ""
    text = text.translate(_CONTROL_CHARS).strip()
    if not text and cfg.caption_required:
        raise BadSample("caption holds only control characters")
    return text


def decode_array(data: bytes, name: str, expected: tuple[int, ...] | None) -> torch.Tensor:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise BadSample(f"unreadable array {name} ({type(e).__name__}: {e})") from None
    if expected is not None and tuple(arr.shape) != tuple(expected):
        raise BadSample(f"array {name} has shape {tuple(arr.shape)}, expected {tuple(expected)}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def decode_sample(fields: dict[str, bytes], cfg: DecodeConfig,
                  crop_rng: np.random.Generator | None = None, bucket: tuple[int, int] | None = None) -> dict:
    """The sample's tensors. With a ``bucket`` (height, width) the image is resized and cropped to it (the crop
    placed by ``crop_rng``, else centred) and ``original_size`` and ``crop_top_left`` say how, for SDXL's
    micro-conditioning; else it is the square of side ``cfg.resolution``."""
    out: dict = {}
    if cfg.resolution > 0:
        name = next((f for f in cfg.image_fields if f in fields), None)
        if name is None:
            raise BadSample(f"no image field (looked for {', '.join(cfg.image_fields)})")
        if bucket is None:
            out["image"] = decode_image(fields[name], cfg, crop_rng)
        else:
            offset = tuple(crop_rng.random(2)) if crop_rng is not None else None
            out["image"], original, crop = decode_image_to(fields[name], cfg, bucket, offset)
            out["original_size"], out["crop_top_left"] = torch.tensor(original), torch.tensor(crop)
    out["caption"] = decode_caption(fields, cfg)
    shapes = cfg.array_shapes or (None,) * len(cfg.array_fields)
    for name, shape in zip(cfg.array_fields, shapes):
        if name not in fields:
            raise BadSample(f"missing derived key {name}")
        out[name.removesuffix(".npy")] = decode_array(fields[name], name, shape)
    return out


def image_size_of(fields: dict[str, bytes], image_fields: tuple[str, ...] = IMAGE_FIELDS) -> tuple[int, int]:
    """(height, width) of a sample's image without decoding its pixels: the ``width`` and ``height`` of its json
    (img2dataset writes those of the stored image), else the image file's header; (0, 0) when it has no
    readable image."""
    raw = fields.get("json")
    if raw is not None:
        try:
            meta = json.loads(raw.decode("utf-8"))
            h, w = meta.get("height"), meta.get("width")
            if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
                return h, w
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            pass
    name = next((f for f in image_fields if fields.get(f)), None)
    if name is None:
        return 0, 0
    try:
        with Image.open(io.BytesIO(fields[name])) as img:  # reads the header only
            w, h = img.size
    except Exception:  # PIL raises many types for bad bytes  # noqa: BLE001
        return 0, 0
    return h, w


def fields_used(cfg: DecodeConfig) -> frozenset[str]:
    """The fields `decode_sample` looks at under `cfg`: the only ones the stream needs read."""
    caption = "json" if cfg.caption_field.startswith("json:") else cfg.caption_field
    return frozenset((*(cfg.image_fields if cfg.resolution > 0 else ()), caption, *cfg.array_fields))
