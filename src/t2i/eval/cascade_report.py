"""The evaluation step of the Imagen and GLIDE recipes, on shapes prompts judged by the oracle, accuracies with
their 95% Wilson intervals:

- the base model at its trained settings (at its own resolution) and the full cascade (final resolution), on
  prompts of seen and of unseen (held out of training) combinations;
- on the seen prompts: classifier-free guidance scale x thresholding (none / static / dynamic) on the base model: alignment and
  the share of saturated pixels (what dynamic thresholding is for: Saharia et al. 2022, sec. 2.3);
- each SR stage with and without noise-conditioning augmentation at sampling time, fed the base model's
  outputs and real low-res images: alignment, and the PSNR of its output downsampled back against its input
  (and against the original, for real inputs);
- with a noisy-image classifier export: the base model's unconditional branch with classifier guidance at a
  few scales (Dhariwal & Nichol 2021), shape and colour accuracy.

Writes ``report.md`` / ``report.json`` and sample grids into `out_dir`.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from t2i.conditioning.lowres import downsample
from t2i.data.shapes import caption
from t2i.eval.batches import in_batches
from t2i.eval.intervals import percent, wilson
from t2i.eval.ldm_report import real_images
from t2i.eval.psnr import psnr
from t2i.eval.report_table import SPLIT_NAMES, drop_confusion, header, row
from t2i.eval.shapes import SPLITS, compare, eval_specs, judge_all, percent_with_interval, score, score_specs
from t2i.images import grid, save_png
from t2i.pipelines.cascade import CascadePipeline

SATURATED = 0.98  # |pixel| at or above this counts as saturated (clipped at the data range)


def _enlarged(images: torch.Tensor, side: int) -> torch.Tensor:
    """Nearest-neighbour enlargement to at least ``side`` pixels, so that small images stay readable in grids."""
    factor = max(1, side // images.shape[-1])
    return torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def saturation(images: torch.Tensor) -> float:
    """Share of pixel values at the edge of the data range."""
    return float((images.abs() >= SATURATED).float().mean())


def evaluate_cascade(base: str, upsamplers: list[str], out_dir: str, val_manifest: str, num_prompts: int = 200,
                     batch_size: int = 100, seed: int = 0, guidance_scales: tuple[float, ...] = (1, 3, 5, 8),
                     thresholds: tuple[str, ...] = ("none", "static", "dynamic"), table_steps: int | None = None,
                     classifier: str | None = None, classifier_scales: tuple[float, ...] = (0, 1, 3, 10),
                     num_real: int = 100, sample_prompts: list[str] | None = None, device: str = "cpu") -> dict:
    """``table_steps``: DDIM steps of the guidance x thresholding table (default: the base's trained steps)."""
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = CascadePipeline.from_exports(base, list(upsamplers), device=device)
    st = pipe.settings
    results: dict = {}
    res0 = pipe.base.image_size

    def base_images(settings, prompts: list[str]) -> torch.Tensor:
        return in_batches(lambda s: pipe.base(prompts[s], settings, seed=seed + s.start), num_prompts, batch_size)

    # the base model and the whole cascade at the trained settings, on seen and unseen combinations
    seen = None
    for split in SPLITS:
        specs = eval_specs(num_prompts, split)
        prompts = [caption(s) for s in specs]
        small = base_images(st.base, prompts)
        seen = seen or (specs, prompts, small)
        results[f"base_{res0}px_{split}"] = score_specs(small, specs)
        final = small
        if pipe.upsamplers:
            final = in_batches(lambda s, small=small, prompts=prompts: pipe.upsample(
                small[s], prompts[s], seed=seed + s.start)[-1], num_prompts, batch_size)
            results[f"cascade_{pipe.image_size}px_{split}"] = score_specs(final, specs)
        save_png(grid(final[:64], nrow=8), out / f"{split}_cascade.png")
    specs, prompts, small = seen  # the tables below measure the sampler's settings on the seen prompts

    # guidance scale x thresholding on the base model
    table_settings = replace(st.base, steps=table_steps or st.base.steps)
    table, rows = {}, []
    for scale in guidance_scales:
        strip = []
        for kind in thresholds:
            images = base_images(replace(table_settings, guidance_scale=float(scale), thresholding=kind), prompts)
            table[f"cfg{scale:g}_{kind}"] = {**score_specs(images, specs), "saturated": saturation(images)}
            strip.append(images[:8])
        rows.append(torch.cat(strip))
    real, _ = real_images(val_manifest, res0, num_real)
    table["real_validation_images"] = {"saturated": saturation(real.float() / 127.5 - 1)}  # the data's own share
    results["guidance_x_thresholding"] = table
    save_png(grid(_enlarged(torch.cat(rows), 64), nrow=8 * len(thresholds)), out / "guidance_x_thresholding.png")

    # each SR stage with and without noise-conditioning augmentation at sampling
    if pipe.upsamplers:
        results["sr_noise_augmentation"] = _sr_noise_table(pipe, small, prompts, specs, val_manifest, num_real,
                                                           batch_size, seed)
    if classifier:
        results["classifier_guidance"] = _classifier_guidance(pipe.base, classifier, prompts, specs, classifier_scales,
                                                              table_settings, batch_size, seed, device, out)
    if sample_prompts:
        stage_images = pipe.stages(sample_prompts, seed=seed)
        save_png(grid(torch.cat([torch.nn.functional.interpolate(x.cpu(), size=pipe.image_size, mode="nearest")
                                 for x in stage_images]), nrow=len(sample_prompts)), out / "samples.png")
    results["settings"] = {"base": str(base), "upsamplers": [str(u) for u in upsamplers], "num_prompts": num_prompts,
                           "base_sampler": vars(st.base), "sr_samplers": [vars(s) for s in st.sr],
                           "table_steps": table_settings.steps, "base_resolution": res0,
                           "seconds": round(time.time() - start, 1)}
    results = drop_confusion(results)
    (out / "report.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    lines = report_lines(results, num_prompts)
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return results


def _sr_noise_table(pipe: CascadePipeline, small: torch.Tensor, prompts: list[str], specs, val_manifest: str,
                    num_real: int, batch_size: int, seed: int) -> dict:
    """The first SR stage at sampling noise level 0 and at its trained level, on the base's outputs and on real
    low-res validation images."""
    up = pipe.upsamplers[0]
    trained_level = float(up.net["degradation"].sample_noise_level)
    real, captions = real_images(val_manifest, up.image_size, num_real)
    real = real.float() / 127.5 - 1
    real_low = downsample(real, up.low_res)
    table = {}
    for level in sorted({0.0, trained_level}):
        def run(low, texts, level=level):
            return in_batches(lambda s: up(low[s].to(up.device), pipe.settings.sr[0], seed=seed + s.start,
                                           prompts=texts[s] if up.takes_text else None, noise_level=level),
                              len(low), batch_size)

        gen = run(small, prompts)
        on_real = run(real_low, captions)
        table[f"level{level:g}"] = {
            "base_outputs": {**score_specs(gen, specs),
                             "psnr_to_input_db": float(psnr(downsample(gen, up.low_res), small, per_image=False))},
            "real_low_res": {**score(on_real, captions),
                             "psnr_to_original_db": float(psnr(on_real, real, per_image=False)),
                             "psnr_to_input_db": float(psnr(downsample(on_real, up.low_res), real_low,
                                                            per_image=False))}}
    table["trained_level"] = trained_level
    return table


def _classifier_guidance(base, classifier: str, prompts: list[str], specs, scales, settings, batch_size: int,
                         seed: int, device: str, out: Path) -> dict:
    """The base's unconditional branch guided by the classifier towards each prompt's shape and colour (``base``:
    the cascade's already loaded base pipeline)."""
    from t2i.pipelines.classifier_guidance import ClassifierGuidedPipeline

    guided = ClassifierGuidedPipeline.from_exports(base, classifier, device=device)
    table, rows = {}, []
    for scale in scales:
        images = in_batches(lambda s, scale=scale: guided(prompts[s], scale=float(scale), settings=settings,
                                                          seed=seed + s.start), len(prompts), batch_size)
        verdicts = judge_all(images)
        both = sum(v.get("shape") == sp.shape and v.get("color") == sp.color for v, sp in zip(verdicts, specs))
        table[f"scale{scale:g}"] = {**compare(verdicts, specs), "shape_and_color": both / len(specs),
                                    "shape_and_color_ci95": list(wilson(both, len(specs)))}
        rows.append(images[:16])
    save_png(grid(_enlarged(torch.cat(rows), 64), nrow=16), out / "classifier_guidance.png")
    return table


def report_lines(results: dict, num_prompts: int) -> list[str]:
    s = results["settings"]
    b = s["base_sampler"]
    lines = ["# Cascade evaluation", "",
             f"{num_prompts} prompts of combinations seen in training and {num_prompts} of combinations held out of it "
             f"(`t2i.eval.shapes.eval_prompts`; the tables after the first use the seen ones), judged by the "
             f"deterministic shapes oracle; accuracies with their 95% Wilson intervals. Base: DDIM {b['steps']} steps, CFG {b['guidance_scale']:g}, thresholding {b['thresholding']}"
             + "".join(f"; SR {i + 1}: DDIM {x['steps']} steps, CFG {x['guidance_scale']:g}"
                       for i, x in enumerate(s["sr_samplers"])) + ".", "", *header()]
    for key, value in results.items():
        if key.startswith(("base_", "cascade_")):
            name = "base model" if key.startswith("base") else "full cascade"
            resolution, split = key.rsplit("_", 2)[1:]
            lines.append(row(f"{name} ({resolution}), {SPLIT_NAMES[split]}", value))
    table = results["guidance_x_thresholding"]
    cells = [k for k in table if k.startswith("cfg")]
    kinds = list(dict.fromkeys(k.split("_", 1)[1] for k in cells))
    scales = list(dict.fromkeys(k.split("_", 1)[0] for k in cells))
    lines += ["", (f"Base model, DDIM {s['table_steps']} steps: all-attribute accuracy (share of saturated pixels, "
                   f"|x| >= {SATURATED}) by guidance scale and thresholding:"), "",
              "| CFG scale | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for sc in scales:
        cells = [f"{percent_with_interval(table[f'{sc}_{k}'])} ({100 * table[f'{sc}_{k}']['saturated']:.1f}%)"
                 for k in kinds]
        lines.append(f"| {sc[3:]} | " + " | ".join(cells) + " |")
    if "real_validation_images" in table:
        lines.append(f"\nReal validation images at {s['base_resolution']}px: "
                     f"{100 * table['real_validation_images']['saturated']:.1f}% saturated pixels (flat black and "
                     f"white backgrounds, pure colours).")
    if "sr_noise_augmentation" in results:
        t = results["sr_noise_augmentation"]
        lines += ["", (f"SR stage 1 with and without noise-conditioning augmentation at sampling (trained level "
                       f"{t['trained_level']:g}):"), "",
                  ("| sampling noise level | on base outputs: all | PSNR to its input | on real low-res: all "
                   "| PSNR to original | PSNR to input |"), "|---|---|---|---|---|---|"]
        for key, v in t.items():
            if key.startswith("level"):
                g, r = v["base_outputs"], v["real_low_res"]
                lines.append(f"| {key[5:]} | {percent_with_interval(g)} | {g['psnr_to_input_db']:.2f} dB | "
                             f"{percent_with_interval(r)} | {r['psnr_to_original_db']:.2f} dB | "
                             f"{r['psnr_to_input_db']:.2f} dB |")
    if "classifier_guidance" in results:
        lines += ["", "Unconditional base model + classifier guidance (classes: shape and colour):", "",
                  "| scale | shape | color | shape and color |", "|---|---|---|---|"]
        for key, v in results["classifier_guidance"].items():
            lines.append(f"| {key[5:]} | {percent_with_interval(v, 'shape')} | {percent_with_interval(v, 'color')} "
                         f"| {percent(v['shape_and_color'], v['shape_and_color_ci95'])} |")
    lines.append(f"\nEvaluation took {s['seconds']} s.")
    return lines
