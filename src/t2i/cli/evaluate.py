"""Evaluate a folder of generated images against real images: domain FID, CLIP score, Inception FID.

    python -m t2i.cli.evaluate generated=outputs/gen real=data/shapes/val clip_export=runs/tiny-clip/export
    python -m t2i.cli.evaluate generated=outputs/gen real=photos/ clip_export=... \\
        inception_weights=/weights/pt_inception-2015-12-05-6726825d.pth out=eval.json

Options (key=value):
  generated          a folder of images (png/jpg/webp); each image's prompt is read from its PNG text metadata
                     ("prompt", what `t2i.cli.generate` writes) or else from the .txt file beside it
  real               a folder of images, or a shard set (a manifest.json, or the folder holding one)
  clip_export        a CLIP stage export (`make train-unclip` writes runs/tiny-clip/export): its image tower
                     gives the domain FID's features, both towers the CLIP score
  inception_weights  the local FID Inception weights file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or
                     torch-fidelity's weights-inception-2015-12-05-6726825d.pth): adds the Inception FID; needs
                     torch-fidelity (pip install 't2i[eval]'). Nothing is downloaded.
  out                write the results as JSON here (they are printed either way)
  resolution         side the images are resized (shorter side) and center-cropped to before the networks;
                     default: the first generated image's shorter side
  max_real, max_generated   use at most this many images of each set (0: all)
  batch_size (64), device (cuda when available), normalize (true: L2-normalised CLIP embeddings for the
  domain FID), antialias (false: Inception's 299 px resize as TF1 did; true: torchmetrics' antialiased one)

Domain FID is comparable only between evaluations with the same CLIP export, real set and sample counts;
Inception FID is the standard network but is comparable to published numbers only in spirit (see
`t2i.eval.fid`). Images without a prompt give no CLIP score (null in the JSON).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from t2i.cli.options import parse_key_values
from t2i.data.decode import BadSample, DecodeConfig, decode_image
from t2i.data.manifest import MANIFEST_NAME
from t2i.eval.clip_score import ClipEmbedder, ClipScore
from t2i.eval.fid import ClipImageFeatures, FrechetMetric, InceptionFeatures, InceptionUnavailable
from t2i.exports import ExportError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class EvaluateOptions:
    generated: str | None = None
    real: str | None = None
    clip_export: str | None = None
    inception_weights: str | None = None
    out: str | None = None
    resolution: int = 0
    max_real: int = 0
    max_generated: int = 0
    batch_size: int = 64
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    normalize: bool = True
    antialias: bool = False


def parse_options(argv: list[str]) -> EvaluateOptions:
    opts = parse_key_values(EvaluateOptions, argv)
    for name in ("generated", "real", "clip_export"):
        if not getattr(opts, name):
            raise SystemExit(f"give {name}=... (see --help)")
    if opts.batch_size < 1 or opts.resolution < 0 or opts.max_real < 0 or opts.max_generated < 0:
        raise SystemExit("batch_size must be >= 1; resolution, max_real and max_generated >= 0")
    return opts


# ---- reading images ---------------------------------------------------------------------------------------

def image_files(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"not a folder of images: {root}")
    files = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images (png, jpg, webp) in {root}")
    return files


def prompt_of(path: Path, data: bytes) -> str | None:
    """The prompt in a PNG's text metadata ("prompt"), else the .txt beside the image, else None."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            text = getattr(img, "text", None) or {}
            prompt = text.get("prompt")
    except Exception:  # noqa: BLE001 - an undecodable file is reported by decode_image
        prompt = None
    if prompt is None and path.with_suffix(".txt").is_file():
        prompt = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
    return prompt or None


def first_side(path: Path) -> int:
    with Image.open(path) as img:
        return min(img.size)


def folder_batches(files: list[Path], resolution: int, batch_size: int
                   ) -> Iterator[tuple[torch.Tensor, list[str | None]]]:
    """(uint8 images (B, 3, R, R), prompts or None) of image files, in order."""
    cfg = DecodeConfig(resolution=resolution)
    for start in range(0, len(files), batch_size):
        images, prompts = [], []
        for f in files[start:start + batch_size]:
            data = f.read_bytes()
            try:
                images.append(decode_image(data, cfg))
            except BadSample as e:
                raise SystemExit(f"{f}: {e}") from None
            prompts.append(prompt_of(f, data))
        yield torch.stack(images), prompts


def is_shard_set(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".json") or (path.is_dir() and (path / MANIFEST_NAME).is_file())


def shard_batches(manifest: str | Path, resolution: int, batch_size: int, limit: int) -> Iterator[torch.Tensor]:
    """uint8 images of a shard set, read as validation reads them (every sample once, center crop, bad samples
    skipped and counted), at most `limit` (0: all)."""
    from t2i.data.datamodule import ShardDataModule
    dm = ShardDataModule(str(manifest), str(manifest), batch_size=batch_size, resolution=resolution,
                         caption_required=False, num_workers=0, val_num_workers=0)
    dm.setup("validate")
    n = 0
    for batch in dm.loader(dm.val_data, train=False, rank=0, world=1):
        images = batch["image"]
        if limit:
            images = images[:limit - n]
        if images.shape[0]:
            n += images.shape[0]
            yield images
        if limit and n >= limit:
            return


# ---- evaluation -------------------------------------------------------------------------------------------

def evaluate(opts: EvaluateOptions) -> dict:
    gen_files = image_files(opts.generated)
    if opts.max_generated:
        gen_files = gen_files[:opts.max_generated]
    resolution = opts.resolution or first_side(gen_files[0])
    clip = ClipEmbedder.from_clip_export(opts.clip_export, opts.device)
    domain = FrechetMetric(ClipImageFeatures(clip.image_encoder, opts.device, normalize=opts.normalize))
    inception = (FrechetMetric(InceptionFeatures(opts.inception_weights, opts.device, opts.antialias))
                 if opts.inception_weights else None)
    metrics = [m for m in (domain, inception) if m is not None]
    score = ClipScore(clip)

    real_path = Path(opts.real)
    if is_shard_set(real_path):
        real_source, real_iter = "shards", shard_batches(real_path, resolution, opts.batch_size, opts.max_real)
    else:
        real_files = image_files(real_path)[:opts.max_real or None]
        real_source = "folder"
        real_iter = (images for images, _ in folder_batches(real_files, resolution, opts.batch_size))
    for images in real_iter:
        for m in metrics:
            m.update(images, real=True)

    with_prompt = without_prompt = 0
    for images, prompts in folder_batches(gen_files, resolution, opts.batch_size):
        for m in metrics:
            m.update(images, real=False)
        keep = [i for i, p in enumerate(prompts) if p is not None]
        with_prompt += len(keep)
        without_prompt += len(prompts) - len(keep)
        if keep:
            score.update(images[keep], [prompts[i] for i in keep])

    results = {
        "domain_fid": domain.compute(),
        "clip_score": score.compute() if score.count else None,
        "generated": {"path": str(opts.generated), "images": domain.fake.n, "with_prompt": with_prompt,
                      "without_prompt": without_prompt},
        "real": {"path": str(opts.real), "source": real_source, "images": domain.real.n},
        "resolution": resolution,
        "clip_export": str(opts.clip_export),
        "domain_fid_features": f"{'L2-normalised ' if opts.normalize else ''}CLIP image embeddings "
                               f"({domain.features.dim}-d) of the CLIP stage export",
        "notes": "domain_fid: comparable only with the same CLIP export, real set and sample counts; "
                 "clip_score: 100 * mean(max(cos(image, prompt), 0)) with that export; inception_fid: the "
                 "standard FID Inception, comparable to published FIDs only in spirit (sample count, resolution "
                 "and data differ)",
    }
    if inception is not None:
        results["inception_fid"] = inception.compute()
        results["inception_weights"] = str(opts.inception_weights)
        results["inception_resize"] = "antialiased bilinear" if opts.antialias else "TF1-compatible bilinear"
    return results


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    opts = parse_options(argv)
    try:
        results = evaluate(opts)
    except (InceptionUnavailable, FileNotFoundError, ExportError) as e:  # a missing file or package: say which
        raise SystemExit(f"error: {e}") from None
    g, r = results["generated"], results["real"]
    print(f"generated: {g['images']} images ({g['with_prompt']} with prompts) from {g['path']}")
    print(f"real:      {r['images']} images from {r['path']} ({r['source']}), at {results['resolution']} px")
    print(f"domain FID ({results['domain_fid_features']}): {results['domain_fid']:.6g}")
    cs = results["clip_score"]
    print(f"CLIP score: {'n/a (no prompts in the generated images)' if cs is None else f'{cs:.4g}'}")
    if "inception_fid" in results:
        print(f"Inception FID: {results['inception_fid']:.6g}")
    if opts.out:
        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
