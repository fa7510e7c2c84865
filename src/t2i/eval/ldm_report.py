"""The evaluation step of a text-to-image recipe: prompt alignment of generated images on prompts of seen
and of unseen (held out of training) combinations, judged by the shapes oracle, beside the oracle's own
accuracy on real validation images.

Writes ``report.md`` and ``report.json`` (and a grid of samples for the fixed prompts) into `out_dir`, and returns
the results with a short ``"summary"`` (the headline accuracies and where the files are) that the recipe
runner prints at the end of the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i.data.decode import DecodeConfig, decode_image
from t2i.data.manifest import load_manifest
from t2i.data.tar_reader import read_samples
from t2i.eval.report_table import SPLIT_NAMES, drop_confusion, header, row
from t2i.eval.shapes import SPLITS, eval_prompts, percent_with_interval, score
from t2i.images import grid, save_png
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline


def real_images(manifest: str, resolution: int, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Up to `limit` validation images at `resolution` (uint8) with their captions."""
    cfg = DecodeConfig(resolution=resolution)
    images, captions = [], []
    for shard in load_manifest(manifest).shards:
        for raw in read_samples(shard.url, 0, shard.num_samples):
            if raw.error or "png" not in raw.fields:
                continue
            images.append(decode_image(raw.fields["png"], cfg))
            captions.append(raw.fields["txt"].decode("utf-8"))
            if len(images) >= limit:
                return torch.stack(images), captions
    return torch.stack(images), captions


def generate_for(pipe: TextToImagePipeline, prompts: list[str], settings: SamplerSettings,
                 batch_size: int, seed: int) -> torch.Tensor:
    out = [pipe(prompts[i: i + batch_size], settings, seed=seed + i) for i in range(0, len(prompts), batch_size)]
    return torch.cat(out)


def summary_lines(results: dict, out: Path, scale: float, samples: bool) -> list[str]:
    """Per split, all five attributes right at the trained CFG scale with its 95% interval and n; then where the
    samples and the report are."""
    lines = []
    for split in SPLITS:
        result = results[f"cfg{scale:g}_{split}"]
        lines.append(f"alignment, {SPLIT_NAMES[split]}: all five attributes {percent_with_interval(result)} at CFG "
                     f"scale {scale:g}, n={result['n']}")
    return [*lines, *([f"samples: {out / 'samples.png'}"] if samples else []), f"report: {out / 'report.md'}"]


def evaluate_ldm(export: str, out_dir: str, val_manifest: str, num_prompts: int = 200, steps: int = 50,
                 eta: float = 0.0, guidance_scale: float | None = None, batch_size: int = 100, seed: int = 0,
                 sample_prompts: list[str] | None = None, device: str = "cpu") -> dict:
    """`num_prompts` prompts of seen and as many of unseen combinations (`t2i.eval.shapes.eval_prompts`), each at
    the trained guidance scale and without guidance."""
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = TextToImagePipeline.from_export(export, device=device)
    trained_scale = pipe.config.get("model", {}).get("sampler", {}).get("guidance_scale", 3.0)
    scale = float(guidance_scale if guidance_scale is not None else trained_scale)
    res = pipe.image_size
    real, captions = real_images(val_manifest, res, 500)
    real = real.float() / 127.5 - 1
    results = {"oracle_on_real_validation": score(real, captions)}
    if pipe.first_stage is not None:  # the autoencoder's own reconstructions bound what the LDM can reach
        with torch.no_grad():
            rec = torch.cat([pipe.first_stage.decode(pipe.first_stage.encode(real[i: i + 250].to(pipe.device)))
                             for i in range(0, len(real), 250)])
        results["vae_reconstructions"] = score(rec.cpu(), captions)
    for split in SPLITS:
        prompts = eval_prompts(num_prompts, split)
        for label, s in ((f"cfg{scale:g}", scale), ("cfg1", 1.0)):
            settings = SamplerSettings(steps=steps, eta=eta, guidance_scale=s)
            images = generate_for(pipe, prompts, settings, batch_size, seed)
            results[f"{label}_{split}"] = score(images, prompts)
            save_png(grid(images[:64], nrow=8), out / f"{split}_{label}.png")
    if sample_prompts:
        images = pipe(sample_prompts, SamplerSettings(steps=steps, eta=eta, guidance_scale=scale), seed=seed)
        up = F.interpolate(images, scale_factor=max(1, 128 // res), mode="nearest")
        save_png(grid(up, nrow=min(8, len(sample_prompts))), out / "samples.png")
    results["settings"] = {"export": str(export), "num_prompts": num_prompts, "steps": steps, "eta": eta,
                           "guidance_scale": scale, "resolution": res, "seconds": round(time.time() - start, 1)}
    results = drop_confusion(results)
    results["summary"] = summary_lines(results, out, scale, samples=bool(sample_prompts))
    (out / "report.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    intro = (f"Export: `{export}`; {num_prompts} prompts of combinations seen in training and {num_prompts} of "
             f"combinations held out of it (`t2i.eval.shapes.eval_prompts`), DDIM {steps} steps (eta {eta}), "
             f"{res}x{res} images, judged by the deterministic shapes oracle. Accuracies with their 95% Wilson "
             f"intervals.")
    lines = ["# LDM evaluation", "", intro, "", *header(),
             row("real validation images (oracle sanity)", results["oracle_on_real_validation"]),
             *([row("VAE reconstructions of them (ceiling)", results["vae_reconstructions"])]
               if "vae_reconstructions" in results else []),
             *(row(f"generated, CFG scale {s:g}, {SPLIT_NAMES[split]}", results[f"{label}_{split}"])
               for label, s in ((f"cfg{scale:g}", scale), ("cfg1", 1.0)) for split in SPLITS),
             "", f"Evaluation took {results['settings']['seconds']} s."]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return results
