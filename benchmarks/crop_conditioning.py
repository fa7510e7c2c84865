"""Does the size/crop micro-conditioning (SDXL §2.2) work in t2i? A tiny LDM is trained on the shapes data in one
wide aspect-ratio bucket with random crops, so the crop offset is the only thing that says where the 64x64 image
was cut; then each prompt is sampled twice with the same seed, asking for crop top 0 and crop top T. If the
model learnt the conditioning, the shape moves up by about T pixels (the content that a crop starting T rows
lower would show). Prints the mean vertical and horizontal shift with a 95% bootstrap interval over prompts.

    python benchmarks/crop_conditioning.py --vae runs/tiny-vae/export [--steps 600] [--prompts 100]

The images are 64x64; the bucket is 32 rows x 48 columns, so each image is resized to 48x48 and 16 of its rows
are cropped at a random top in [0, 16] (the offsets are in the resized image's pixels, as SDXL's).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.data.manifest import ShardInfo, load_manifest, write_manifest
from t2i.eval.shapes import eval_prompts, shape_centre
from t2i.images import to_uint8
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline

BUCKET = (32, 48)
ORIGINAL = (64, 64)


def bootstrap(values: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n, len(values))).mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def sized_manifest(split: Path, out: Path) -> Path:
    """A copy of a shapes split's manifest that records every image's size (all are 64x64), which buckets need."""
    manifest = load_manifest(split)
    infos = [ShardInfo(s.url, s.num_samples, (ORIGINAL,) * s.num_samples) for s in manifest.shards]
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, infos, source=str(manifest.source))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="a tiny VAE export (make train-ldm's runs/tiny-vae/export)")
    p.add_argument("--shapes", default="data/shapes", help="the shapes data (make data)")
    p.add_argument("--run", default="runs/crop-conditioning")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--top", type=int, default=16, help="crop top asked for, against 0")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--skip-training", action="store_true", help="sample from --run's export")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not args.skip_training:
        start = time.perf_counter()
        train_data = sized_manifest(Path(args.shapes) / "train", run / "data" / "train")
        val_data = sized_manifest(Path(args.shapes) / "val", run / "data" / "val")
        cfg = compose_config(["experiment=tiny/ldm", f"run_dir={run}", f"model.target.export={args.vae}",
                              f"data.train_manifest={train_data}", f"data.val_manifest={val_data}",
                              f"data.buckets=[[{BUCKET[0]},{BUCKET[1]}]]", "data.crop=random", "data.resolution=64",
                              "model.conditioner.size_embedding=32", "model.denoiser.vector_dim=192",
                              f"trainer.max_steps={args.steps}", "model.sample_every_n_steps=0",
                              "final_validation=false"])
        train(cfg)
        print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")
    pipe = TextToImagePipeline.from_export(run / "export")
    settings = SamplerSettings(steps=args.sample_steps, guidance_scale=3.0)
    prompts = eval_prompts(args.prompts, "seen")
    shifts, missing = [], 0
    for i, prompt in enumerate(prompts):
        centres = []
        for top in (0, args.top):
            with torch.no_grad():
                image = pipe([prompt], settings, seed=i, original_size=ORIGINAL, crop_top_left=(top, 0),
                             height=BUCKET[0], width=BUCKET[1])[0]
            centres.append(shape_centre(to_uint8(image[None])[0].permute(1, 2, 0).numpy()))
        if None in centres:
            missing += 1
            continue
        shifts.append(np.subtract(centres[1], centres[0]))
    shifts = np.array(shifts)
    print(f"prompts where a sample showed no shape: {missing} of {len(prompts)}")
    if not len(shifts):
        print("no prompt gave a shape in both samples: no shift to measure")
        return
    for axis, name in ((0, "vertical (rows; negative: up)"), (1, "horizontal (columns)")):
        lo, hi = bootstrap(shifts[:, axis])
        print(f"{name}: mean shift {shifts[:, axis].mean():+.2f} px, 95% interval [{lo:+.2f}, {hi:+.2f}] "
              f"(n={len(shifts)} prompts; crop top {args.top} against 0)")


if __name__ == "__main__":
    main()
