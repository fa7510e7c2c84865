"""A tiny LDM trained on images of three aspect ratios through aspect-ratio buckets, on CPU: does it draw the
prompt's colour and position at each aspect ratio, for compositions seen in training and held out?

    python benchmarks/aspect_buckets.py --vae runs/tiny-vae/export [--steps 900] [--prompts 100]

1. `make_shapes.py --canvases 64x64,64x128,128x64`: the shapes data with every sample on a square, a wide (1:2)
   or a tall (2:1) canvas, positions in the canvas's thirds (data/shapes-aspect).
2. `encode_latents.py --buckets 48x48,32x64,64x32`: latents per bucket (each image resized to its bucket, with
   its original size and crop), with the tiny VAE.
3. The tiny LDM recipe's model, with SDXL's size/crop conditioning, on those latents with the same buckets.
4. Per bucket, `--prompts` seen and as many held-out (unseen) prompts sampled at that bucket's size (original size
   = the canvas, crop (0, 0)), judged for colour and position (`t2i.eval.shapes.judge_canvas`), with Wilson 95%
   intervals; and one picture of one prompt at the three aspect ratios (--picture).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.data.shapes import parse_caption
from t2i.eval.intervals import wilson
from t2i.eval.shapes import eval_prompts, judge_canvas
from t2i.images import to_uint8
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline

CANVASES = {(48, 48): (64, 64), (32, 64): (64, 128), (64, 32): (128, 64)}  # bucket -> the canvas it holds
REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)


def hwc(images: torch.Tensor) -> np.ndarray:
    return to_uint8(images).permute(0, 2, 3, 1).numpy()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="a tiny VAE export (make train-ldm's runs/tiny-vae/export)")
    p.add_argument("--data", default="data/shapes-aspect")
    p.add_argument("--run", default="runs/aspect-buckets")
    p.add_argument("--train", type=int, default=50000)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=128, help="training batch (the tiny recipe's)")
    p.add_argument("--resume", action="store_true", help="continue --run's training to --steps (data kept)")
    p.add_argument("--prompts", type=int, default=100, help="per bucket, seen and unseen each")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--picture", default=None, help="write one prompt at the three aspect ratios here (.png)")
    p.add_argument("--skip-training", action="store_true", help="evaluate --run's export")
    args = p.parse_args(argv)
    data, run_dir = Path(args.data), Path(args.run)
    buckets = ",".join(f"{h}x{w}" for h, w in CANVASES)
    if not args.skip_training:
        start = time.perf_counter()
        if not args.resume:
            prepare(args, data, buckets)
        prepared = time.perf_counter()
        cfg = compose_config([
            "experiment=tiny/ldm", f"run_dir={run_dir}", f"model.target.export={args.vae}",
            "model.target.precomputed=true", f"data.train_manifest={data}/latents/train",
            f"data.val_manifest={data}/latents/val", "data.resolution=0", f"data.batch_size={args.batch}",
            "data.array_fields=[latent.npy,original_size.npy,crop_top_left.npy]",
            "data.buckets=[" + ",".join(f"[{h},{w}]" for h, w in CANVASES) + "]", "model.image_size=48",
            "model.conditioner.size_embedding=32", "model.denoiser.vector_dim=192",
            f"trainer.max_steps={args.steps}", "model.sample_every_n_steps=0", "final_validation=false",
            *(["ckpt_path=last"] if args.resume else [])])
        train(cfg)
        print(f"data and latents {prepared - start:.0f} s, training to step {args.steps} "
              f"{time.perf_counter() - prepared:.0f} s", flush=True)
    evaluate(args, run_dir)


def prepare(args, data: Path, buckets: str) -> None:
    run(["data_prep/make_shapes.py", "--out", str(data), "--train", str(args.train), "--val", "512",
         "--canvases", ",".join(f"{h}x{w}" for h, w in CANVASES.values()), "--workers", "2"])
    for split in ("train", "val"):
        run(["data_prep/encode_latents.py", "--vae", str(args.vae), "--shards", str(data / split), "--out",
             str(data / f"latents/{split}"), "--resolution", "48", "--buckets", buckets])


def evaluate(args, run_dir: Path) -> None:
    pipe = TextToImagePipeline.from_export(run_dir / "export")
    settings = SamplerSettings(steps=args.sample_steps, guidance_scale=3.0)
    print("| bucket (h x w) | canvas | split | n | colour | position | both |\n|---|---|---|---|---|---|---|")
    for bucket, canvas in CANVASES.items():
        for split in ("seen", "unseen"):
            prompts = eval_prompts(args.prompts, split)
            hits = {"color": 0, "position": 0, "both": 0}
            for i in range(0, len(prompts), 50):
                chunk = prompts[i:i + 50]
                with torch.no_grad():
                    images = hwc(pipe(chunk, settings, seed=i, original_size=canvas, height=bucket[0],
                                           width=bucket[1]))
                for prompt, image in zip(chunk, images, strict=True):
                    spec, verdict = parse_caption(prompt), judge_canvas(image)
                    ok = {a: verdict[a] == getattr(spec, a) for a in ("color", "position")}
                    hits["color"] += ok["color"]
                    hits["position"] += ok["position"]
                    hits["both"] += ok["color"] and ok["position"]
            n = len(prompts)
            cells = [f"{100 * k / n:.0f}% [{100 * wilson(k, n)[0]:.0f}, {100 * wilson(k, n)[1]:.0f}]"
                     for k in hits.values()]
            print(f"| {bucket[0]}x{bucket[1]} | {canvas[0]}x{canvas[1]} | {split} | {n} | " + " | ".join(cells) + " |",
                  flush=True)
    if args.picture:
        prompt = "a large red circle in the top left on a white background"
        tiles = []
        for bucket, canvas in CANVASES.items():
            with torch.no_grad():
                tiles.append(hwc(pipe([prompt], settings, seed=0, original_size=canvas, height=bucket[0],
                                           width=bucket[1]))[0])
        scale, gap = 4, 8
        width = sum(t.shape[1] for t in tiles) * scale + gap * (len(tiles) - 1)
        sheet = Image.new("RGB", (width, max(t.shape[0] for t in tiles) * scale), (255, 255, 255))
        x = 0
        for tile in tiles:
            img = Image.fromarray(tile).resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.NEAREST)
            sheet.paste(img, (x, 0))
            x += img.width + gap
        Path(args.picture).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.picture)
        print(f"picture: {args.picture} ({prompt!r} at {', '.join(f'{h}x{w}' for h, w in CANVASES)})")


if __name__ == "__main__":
    main()
