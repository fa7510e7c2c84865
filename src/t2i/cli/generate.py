"""Generate images from a latent diffusion export, the unCLIP stage exports, or an Imagen / GLIDE cascade.

    python -m t2i.cli.generate prompt="a large red circle in the top left on a white background"
    python -m t2i.cli.generate prompts_file=prompts.txt out_dir=outputs/gen batch_size=16
    python -m t2i.cli.generate prompt="..." mode=interpolate seed=1 seed_b=2 frames=8
    python -m t2i.cli.generate pipeline=unclip prompt="a small blue square in the center on a black background"
    python -m t2i.cli.generate pipeline=unclip image=photo.png num_images=4      # image variations
    python -m t2i.cli.generate pipeline=imagen prompt="a large green triangle in the bottom right on a gray background"

Options (key=value): pipeline (ldm|unclip), export (default runs/tiny-ldm/export, the last
`make train-ldm`), vae_export, prompt, prompts_file, out_dir, steps, eta, guidance_scale, sampler
(ddim|ddpm), seed, batch_size, num_images (per prompt or input image), mode (images|interpolate),
seed_b, frames, device, height and width (pixels; default the trained square; an LDM trained with
aspect-ratio buckets draws any bucket's shape). unCLIP (defaults: the last `make train-unclip`): prior_export, decoder_export,
upsampler_export (none: stop at the decoder's resolution), image (a file or folder: variations),
prior_steps, prior_guidance_scale, best_of, upsampler_steps; steps/eta/guidance_scale/sampler are the
decoder's. Imagen / GLIDE cascades (defaults: the last `make train-imagen` / `make train-glide`): base_export,
sr_exports (comma-separated, in order; none: stop at the base; auto: the recipe's), thresholding (none|static|dynamic),
percentile, sr_steps, sr_guidance_scale, sr_noise_level (the SR stages' sampling-time noise-conditioning
level; default as trained); steps/eta/guidance_scale/sampler are the base model's, and thresholding defaults
to the base's trained setting. Each image is a PNG with the prompt and settings in its metadata and a .txt
beside it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2i.cli.options import parse_key_values
from t2i.images import save_png, to_uint8
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline


@dataclass
class GenerateOptions:
    pipeline: str = "ldm"
    export: str = "runs/tiny-ldm/export"
    vae_export: str | None = None
    prompt: str | None = None
    prompts_file: str | None = None
    out_dir: str = "outputs/generate"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 3.0
    sampler: str = "ddim"
    seed: int = 0
    batch_size: int = 16
    num_images: int = 1
    mode: str = "images"
    seed_b: int = 1
    frames: int = 8
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    prior_export: str = "runs/tiny-prior/export"
    decoder_export: str = "runs/tiny-decoder/export"
    upsampler_export: str = "runs/tiny-upsampler/export"
    image: str | None = None
    prior_steps: int | None = None
    prior_guidance_scale: float | None = None
    best_of: int | None = None
    upsampler_steps: int | None = None
    base_export: str | None = None
    sr_exports: str = "auto"
    thresholding: str | None = None
    percentile: float | None = None
    sr_steps: int | None = None
    sr_guidance_scale: float | None = None
    sr_noise_level: float | None = None
    height: int | None = None  # the image drawn (ldm / base pipelines; default: the trained square)
    width: int | None = None


def parse_options(argv: list[str]) -> GenerateOptions:
    return parse_key_values(GenerateOptions, argv)


def read_prompts(opts: GenerateOptions) -> list[str]:
    if opts.prompts_file:
        prompts = [ln.strip() for ln in Path(opts.prompts_file).read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p]
    elif opts.prompt:
        prompts = [opts.prompt]
    else:
        raise SystemExit("give prompt=... or prompts_file=...")
    if not prompts:
        raise SystemExit(f"{opts.prompts_file} holds no prompts")
    return prompts


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (keeps their norm, unlike a straight line)."""
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1, 1)
    theta = torch.acos(cos)
    if theta.abs() < 1e-4:
        return (1 - w) * a + w * b
    return (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)


def _metadata(prompt: str, opts: GenerateOptions, seed: int) -> dict[str, str]:
    export = opts.export if opts.pipeline == "ldm" else opts.base_export or opts.pipeline
    return {"prompt": prompt, "settings": f"sampler={opts.sampler} steps={opts.steps} eta={opts.eta} "
            f"guidance_scale={opts.guidance_scale} thresholding={opts.thresholding} seed={seed} export={export}"}


def generate_images(pipe: TextToImagePipeline, opts: GenerateOptions, prompts: list[str]) -> list[Path]:
    settings = SamplerSettings(steps=opts.steps, eta=opts.eta, guidance_scale=opts.guidance_scale,
                               sampler=opts.sampler, thresholding=opts.thresholding or "none",
                               percentile=opts.percentile or SamplerSettings.percentile)
    if opts.pipeline in CASCADE_DEFAULTS:
        settings = None  # the cascade's own settings (load_cascade applied the options to them)
    jobs = [(p, k) for k in range(opts.num_images) for p in prompts]
    out, written = Path(opts.out_dir), []
    for start in range(0, len(jobs), opts.batch_size):
        chunk = jobs[start: start + opts.batch_size]
        seed = opts.seed + start  # each batch its own seed: the output does not depend on batch_size alone
        size = {k: v for k, v in (("height", opts.height), ("width", opts.width)) if v is not None}
        if size and not isinstance(pipe, TextToImagePipeline):
            raise SystemExit(f"height=/width= apply to the ldm and base pipelines, not pipeline={opts.pipeline}")
        images = to_uint8(pipe([p for p, _ in chunk], settings, seed=seed, **size))
        for i, ((prompt, k), image) in enumerate(zip(chunk, images)):
            name = f"{start + i:05d}-{slug(prompt)}" + (f"-{k}" if opts.num_images > 1 else "")
            written.append(save_png(image, out / f"{name}.png", _metadata(prompt, opts, seed)))
            (out / f"{name}.txt").write_text(prompt + "\n", encoding="utf-8")
    return written


def interpolate(pipe: TextToImagePipeline, opts: GenerateOptions, prompt: str) -> Path:
    """DDIM (eta=0) maps noise to image deterministically: walk between two seeds' noises."""
    shape = pipe.latent_shape(1)
    a = torch.randn(shape, generator=torch.Generator().manual_seed(opts.seed))
    b = torch.randn(shape, generator=torch.Generator().manual_seed(opts.seed_b))
    noise = torch.cat([slerp(a, b, i / max(1, opts.frames - 1)) for i in range(opts.frames)])
    settings = SamplerSettings(steps=opts.steps, eta=0.0, guidance_scale=opts.guidance_scale)
    images = to_uint8(pipe([prompt] * opts.frames, settings, noise=noise))
    strip = torch.cat(list(images), dim=2)
    path = Path(opts.out_dir) / f"interpolate-{slug(prompt)}-{opts.seed}-{opts.seed_b}.png"
    save_png(strip, path, _metadata(prompt, opts, opts.seed))
    path.with_suffix(".txt").write_text(prompt + "\n", encoding="utf-8")
    return path


def load_unclip(opts: GenerateOptions):
    from t2i.pipelines.unclip import UnclipPipeline
    upsampler = None if str(opts.upsampler_export).lower() in ("", "none") else opts.upsampler_export
    pipe = UnclipPipeline.from_exports(opts.prior_export, opts.decoder_export, upsampler, device=opts.device)
    st = pipe.settings
    st.decoder = SamplerSettings(steps=opts.steps, eta=opts.eta, guidance_scale=opts.guidance_scale,
                                 sampler=opts.sampler)
    if opts.prior_steps is not None:
        st.prior.steps = opts.prior_steps
    if opts.prior_guidance_scale is not None:
        st.prior.guidance_scale = opts.prior_guidance_scale
    if opts.upsampler_steps is not None:
        st.upsampler.steps = opts.upsampler_steps
    if opts.best_of is not None:
        st.best_of = opts.best_of
    return pipe


CASCADE_DEFAULTS = {"imagen": ("runs/tiny-imagen-base/export", "runs/tiny-imagen-sr/export"),
                    "glide": ("runs/tiny-glide-base/export", "runs/tiny-glide-sr/export")}


def load_cascade(opts: GenerateOptions):
    """The base + SR exports as one pipeline, the base's settings from the options (thresholding as trained
    unless given), each SR stage's as trained unless given."""
    from t2i.pipelines.cascade import CascadePipeline

    base_default, sr_default = CASCADE_DEFAULTS[opts.pipeline]
    srs = sr_default if opts.sr_exports == "auto" else opts.sr_exports
    srs = [] if srs.lower() in ("", "none") else [p.strip() for p in srs.split(",") if p.strip()]
    pipe = CascadePipeline.from_exports(opts.base_export or base_default, srs, device=opts.device)
    st = pipe.settings
    st.base = dataclasses.replace(st.base, steps=opts.steps, eta=opts.eta, guidance_scale=opts.guidance_scale,
                                  sampler=opts.sampler, thresholding=opts.thresholding or st.base.thresholding,
                                  percentile=opts.percentile or st.base.percentile)
    for i, sr in enumerate(st.sr):
        st.sr[i] = dataclasses.replace(sr, steps=opts.sr_steps or sr.steps,
                                       guidance_scale=opts.sr_guidance_scale or sr.guidance_scale)
        if opts.sr_noise_level is not None:
            st.sr_noise_levels[i] = opts.sr_noise_level
    return pipe


def read_images(path: str) -> tuple[list[Path], torch.Tensor]:
    """A file or a folder of images -> (paths, [-1, 1] tensors (B, 3, 64, 64))."""
    from PIL import Image
    root = Path(path)
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) \
        if root.is_dir() else [root]
    if not files or not all(f.is_file() for f in files):
        raise SystemExit(f"no images at {path}")
    images = []
    for f in files:
        with Image.open(f) as img:
            arr = torch.from_numpy(np.asarray(img.convert("RGB").resize((64, 64), Image.BICUBIC)).copy())
        images.append(arr.permute(2, 0, 1).float() / 127.5 - 1)
    return files, torch.stack(images)


def generate_variations(pipe, opts: GenerateOptions) -> list[Path]:
    files, images = read_images(opts.image)
    variations = to_uint8(pipe.variations(images, seed=opts.seed, num_variations=opts.num_images))
    out, written = Path(opts.out_dir), []
    for i, image in enumerate(variations):
        source = files[i // opts.num_images]
        name = f"{source.stem}-variation-{i % opts.num_images}"
        meta = {"source": str(source), "settings": f"unclip variations seed={opts.seed}"}
        written.append(save_png(image, out / f"{name}.png", meta))
    return written


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    opts = parse_options(argv)
    if opts.mode not in ("images", "interpolate"):
        raise SystemExit(f"mode must be images or interpolate, got {opts.mode!r}")
    if opts.pipeline not in ("ldm", "unclip", "imagen", "glide"):
        raise SystemExit(f"pipeline must be ldm, unclip, imagen or glide, got {opts.pipeline!r}")
    if opts.thresholding not in (None, "none", "static", "dynamic"):
        raise SystemExit(f"thresholding must be none, static or dynamic, got {opts.thresholding!r}")
    if opts.pipeline in ("imagen", "glide"):
        if opts.mode != "images" or opts.image:
            raise SystemExit(f"pipeline={opts.pipeline} supports mode=images only")
        pipe = load_cascade(opts)
    elif opts.pipeline == "unclip":
        if opts.mode != "images":
            raise SystemExit("pipeline=unclip supports mode=images (and image=... for variations)")
        pipe = load_unclip(opts)
        if opts.image:
            paths = generate_variations(pipe, opts)
            print(f"wrote {len(paths)} variations to {opts.out_dir}")
            return
    else:
        if opts.image:
            raise SystemExit("image variations need pipeline=unclip")
        pipe = TextToImagePipeline.from_export(opts.export, opts.vae_export, device=opts.device)
    prompts = read_prompts(opts)
    torch.manual_seed(opts.seed)
    if opts.mode == "interpolate":
        print(f"wrote {interpolate(pipe, opts, prompts[0])}")
        return
    paths = generate_images(pipe, opts, prompts)
    print(f"wrote {len(paths)} images to {opts.out_dir}" + ("" if len(paths) > 1 else f": {paths[0]}"))


if __name__ == "__main__":
    main()
