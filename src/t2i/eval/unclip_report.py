"""The evaluation step of the unCLIP recipe, stage by stage, on prompts of seen and of unseen (held out of
training) combinations:

- prior: cosine of its sampled image embeddings to the true ones (embeddings of the prompts' rendered
  images), beside the caption's text embedding and a shuffled pairing;
- decoder given the TRUE image embeddings (judged at its own resolution);
- the full chain prompt -> prior -> decoder (at its resolution) -> upsampler (at the final one);
- the upsampler alone on real low-res validation images (its ceiling), with PSNR against the originals.

Writes ``report.md`` / ``report.json``, sample grids and an image-variations grid into `out_dir`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i.conditioning.lowres import downsample
from t2i.conditioning.text_encoding import clip_text_condition
from t2i.data.shapes import caption, render
from t2i.eval.batches import in_batches
from t2i.eval.ldm_report import real_images
from t2i.eval.psnr import psnr
from t2i.eval.report_table import SPLIT_NAMES, drop_confusion, header, row
from t2i.eval.shapes import SPLITS, eval_specs, score, score_specs
from t2i.exports import read_export
from t2i.images import grid, save_png
from t2i.pipelines.unclip import UnclipPipeline


def evaluate_unclip(prior: str, decoder: str, upsampler: str | None, out_dir: str, val_manifest: str,
                    num_prompts: int = 200, batch_size: int = 100, seed: int = 0, num_real: int = 100,
                    sample_prompts: list[str] | None = None, device: str = "cpu") -> dict:
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = UnclipPipeline.from_exports(prior, decoder, upsampler, device=device)
    st = pipe.settings
    results: dict = {}
    for split in SPLITS:
        _evaluate_split(pipe, eval_specs(num_prompts, split), split, results, out, batch_size, seed)
    if pipe.upsampler is not None:
        res = pipe.upsampler.image_size
        real, captions = real_images(val_manifest, res, num_real)
        real = real.float() / 127.5 - 1
        real_up = _upsample(pipe, downsample(real, pipe.upsampler.low_res), batch_size, seed)
        results["upsampler_on_real_low_res"] = {**score(real_up, captions),
                                                "psnr_db": float(psnr(real_up, real, per_image=False))}
        results["oracle_on_real_validation"] = score(real, captions)
    if sample_prompts:
        save_png(grid(pipe(sample_prompts, seed=seed).cpu(), nrow=min(8, len(sample_prompts))), out / "samples.png")
    rendered = true_images(eval_specs(8, "seen"))
    variations = pipe.variations(rendered, seed=seed, num_variations=1).cpu()
    save_png(grid(torch.cat([F.interpolate(rendered, size=variations.shape[-2:], mode="area"), variations]),
                  nrow=8), out / "variations.png")

    clip_metrics = read_export(pipe.prior.config["model"]["text_encoder"]["export_dir"]).metrics
    results["clip_retrieval"] = {k: v for k, v in clip_metrics.items() if "r1" in k or "r5" in k}
    results["settings"] = {"prior": str(prior), "decoder": str(decoder), "upsampler": str(upsampler),
                           "num_prompts": num_prompts, "prior_sampler": vars(st.prior),
                           "decoder_sampler": vars(st.decoder), "upsampler_sampler": vars(st.upsampler),
                           "best_of": st.best_of, "seconds": round(time.time() - start, 1)}
    results = drop_confusion(results)
    (out / "report.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    lines = _report_lines(results, num_prompts)
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return results


def true_images(specs) -> torch.Tensor:
    """The specs' own renderings (the images their prompts describe): (B, 3, 64, 64) in [-1, 1]."""
    return torch.stack([torch.from_numpy(render(s)) for s in specs]).permute(0, 3, 1, 2).float() / 127.5 - 1


def _upsample(pipe: UnclipPipeline, x: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    return in_batches(lambda s: pipe.upsample(x[s].to(pipe.decoder.device), seed + s.start), len(x), batch_size)


def _evaluate_split(pipe: UnclipPipeline, specs: list, split: str, results: dict, out: Path, batch_size: int,
                    seed: int) -> None:
    """The prior's cosines, the decoder from the true embeddings and the full chain on one split's prompts,
    into ``results`` (keys suffixed with the split), and their sample grids."""
    st = pipe.settings
    prompts = [caption(s) for s in specs]
    true = pipe.embed_images(true_images(specs)).cpu()
    sampled = in_batches(lambda s: pipe.prior(prompts[s], st.prior, seed=seed + s.start, best_of=st.best_of),
                         len(prompts), batch_size)
    _, text_embed = clip_text_condition(pipe.prior.text_encoder, prompts)
    results[f"prior_cosine_{split}"] = {"prior_sample": float((sampled * true).sum(-1).mean()),
                                        "text_embedding": float((text_embed.cpu() * true).sum(-1).mean()),
                                        "shuffled_pairing": float((true.roll(1, 0) * true).sum(-1).mean())}

    def decode(embeds: torch.Tensor, label: str) -> torch.Tensor:
        small = in_batches(lambda s: pipe.decoder(embeds[s], prompts[s], st.decoder, seed=seed + s.start + 1),
                           len(prompts), batch_size)
        results[f"{label}_{pipe.decoder.image_size}px_{split}"] = score_specs(small, specs)
        return small

    small_true, final = decode(true, "decoder_true_embedding"), decode(sampled, "chain")
    if pipe.upsampler is not None:  # the decoder itself is judged at its own resolution
        final = _upsample(pipe, final, batch_size, seed)
        results[f"chain_{pipe.upsampler.image_size}px_{split}"] = score_specs(final, specs)
    save_png(grid(final[:64], nrow=8), out / f"{split}_chain.png")
    save_png(grid(small_true[:64], nrow=8), out / f"{split}_decoder_true_embedding.png")


def _report_lines(results: dict, num_prompts: int) -> list[str]:
    s = results["settings"]
    intro = (f"{num_prompts} prompts of combinations seen in training and {num_prompts} of combinations held out "
             f"of it (`t2i.eval.shapes.eval_prompts`), judged by the deterministic shapes oracle; accuracies with "
             f"their 95% Wilson intervals. Prior: DDIM {s['prior_sampler']['steps']} steps, CFG "
             f"{s['prior_sampler']['guidance_scale']:g}, best of {s['best_of']}; decoder: DDIM "
             f"{s['decoder_sampler']['steps']} steps, CFG {s['decoder_sampler']['guidance_scale']:g}; upsampler: "
             f"DDIM {s['upsampler_sampler']['steps']} steps.")
    lines = ["# unCLIP evaluation", "", intro, "", *header()]
    names = {"oracle_on_real_validation": "real validation images (oracle sanity)",
             "upsampler_on_real_low_res": "upsampler on real low-res validation images (its ceiling)"}
    for key, value in results.items():
        if key.startswith(("decoder_true_embedding", "chain")):
            what = "decoder from TRUE image embeddings" if key.startswith("decoder") else "full chain: prompt -> prior -> decoder"
            resolution, split = key.rsplit("_", 2)[1:]
            lines.append(row(f"{what} ({resolution}), {SPLIT_NAMES[split]}", value))
        elif key in names:
            lines.append(row(names[key], value))
    lines += ["", "| prior: mean cosine to the true image embedding | " + " | ".join(SPLITS) + " |", "|---|---|---|"]
    for label, key in (("prior samples", "prior_sample"), ("baseline: the caption's CLIP text embedding",
                                                           "text_embedding"),
                       ("baseline: shuffled pairing (another prompt's image embedding)", "shuffled_pairing")):
        lines.append(f"| {label} | " + " | ".join(f"{results[f'prior_cosine_{sp}'][key]:.3f}" for sp in SPLITS) + " |")
    if "upsampler_on_real_low_res" in results:
        lines.append(f"\nUpsampler PSNR on real validation images: {results['upsampler_on_real_low_res']['psnr_db']:.2f} dB.")
    if results.get("clip_retrieval"):
        lines.append("\nCLIP zero-shot retrieval (validation): " + ", ".join(
            f"{k.split('/')[-1]} {v:.3f}" for k, v in sorted(results["clip_retrieval"].items())))
    lines.append(f"\nEvaluation took {s['seconds']} s.")
    return lines
