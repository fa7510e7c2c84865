"""The claims measured by sampling the recipes' exports (see benchmarks/claims.py): DDIM vs DDPM over the number
of steps, the guidance scale, static vs dynamic thresholding, classifier vs classifier-free guidance, and the unCLIP
prior vs decoding from the caption alone or from its CLIP text embedding."""

from __future__ import annotations

import time

import torch
from claims_common import Claim, Context

from t2i.data.shapes import render
from t2i.eval.cascade_report import saturation
from t2i.eval.ldm_report import real_images
from t2i.eval.shapes import parse_caption
from t2i.pipelines.classifier_guidance import ClassifierGuidedPipeline
from t2i.pipelines.ldm import LatentDiffusionPipeline
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.unclip import UnclipPipeline
from t2i.pipelines.unclip_stages import clip_text_condition


def _key(*parts) -> str:
    return " ".join(f"{p:g}" if isinstance(p, float) else str(p) for p in parts)


def ddim_ddpm(ctx: Context, ldm: str, **_) -> Claim:
    pipe = LatentDiffusionPipeline.from_export(ldm, device=ctx.device)
    scale = ctx.settings_of(pipe).guidance_scale
    claim = Claim("ddim_ddpm", "DDIM vs DDPM over the number of steps",
                  "DDIM (η=0) keeps most of its quality with 10-50 steps, while ancestral sampling (η=1, DDPM) "
                  "degrades quickly as steps are cut; with 1000 steps both are good.",
                  "Song et al. 2021, Table 1 (CIFAR10 FID, S = 10/20/50/100/1000): η=0 13.36/6.84/4.67/4.16/4.04; "
                  "η=1 41.07/18.36/8.01/5.78/4.73.",
                  ["steps", "η", "all-attribute accuracy", "domain FID", "seconds"])
    results = {}
    for steps in (10, 25, 50, 100, 1000):
        for eta in (0.0, 1.0):
            m = ctx.measure(pipe, SamplerSettings(steps=steps, eta=eta, guidance_scale=scale))
            results[(steps, eta)] = m
            claim.rows.append([steps, eta, f"{100 * m['all']:.1f}%", f"{m['fid']:.4f}", f"{m['seconds']:.1f}"])
    few = all(results[(s, 0.0)]["fid"] <= results[(s, 1.0)]["fid"] for s in (10, 25))
    drop0 = results[(1000, 0.0)]["all"] - results[(10, 0.0)]["all"]
    drop1 = results[(1000, 1.0)]["all"] - results[(10, 1.0)]["all"]
    claim.verdict = (f"{'Agrees' if few and drop0 <= drop1 else 'Does not agree'}: from 1000 to 10 steps accuracy "
                     f"drops {100 * drop0:.1f} points with η=0 and {100 * drop1:.1f} with η=1; at 10 and 25 steps "
                     f"η=0's domain FID is {'lower' if few else 'not lower'} than η=1's (guidance scale {scale:g}).")
    claim.data = {_key(s, e): m for (s, e), m in results.items()}
    return claim


def cfg(ctx: Context, ldm: str, **_) -> Claim:
    pipe = LatentDiffusionPipeline.from_export(ldm, device=ctx.device)
    claim = Claim("cfg", "Classifier-free guidance scale",
                  "Guidance trades diversity for fidelity: sample quality per image (and text alignment) rises "
                  "with the guidance scale while FID is best at a small scale and worsens beyond it.",
                  "Ho & Salimans 2022, Table 1 (ImageNet 64x64): FID best at a small guidance strength w "
                  "(scale 1 + w), IS rising with w.",
                  ["guidance scale", "all-attribute accuracy", "shape accuracy", "domain FID", "seconds"])
    results = {}
    for scale in (1.0, 1.5, 3.0, 5.0, 8.0):
        m = ctx.measure(pipe, SamplerSettings(steps=50, eta=0.0, guidance_scale=scale))
        results[scale] = m
        claim.rows.append([scale, f"{100 * m['all']:.1f}%", f"{100 * m['shape']:.1f}%", f"{m['fid']:.4f}",
                           f"{m['seconds']:.1f}"])
    best_fid = min(results, key=lambda s: results[s]["fid"])
    best_acc = max(results, key=lambda s: results[s]["all"])
    agrees = results[best_acc]["all"] > results[1.0]["all"] and best_fid < 8.0 and best_fid <= best_acc
    claim.verdict = (f"{'Agrees' if agrees else 'Does not agree'}: accuracy is highest at scale {best_acc:g} "
                     f"({100 * results[best_acc]['all']:.1f}% against {100 * results[1.0]['all']:.1f}% unguided); "
                     f"domain FID is lowest at scale {best_fid:g} and "
                     f"{'rises' if results[8.0]['fid'] > results[best_fid]['fid'] else 'does not rise'} by scale 8.")
    claim.data = {_key(s): m for s, m in results.items()}
    return claim


def thresholding(ctx: Context, base: str, **_) -> Claim:
    pipe = LatentDiffusionPipeline.from_export(base, stage="base", device=ctx.device)
    claim = Claim("thresholding", "Static vs dynamic thresholding at high guidance (pixel-space base model)",
                  "At large guidance weights static thresholding gives over-saturated images; dynamic thresholding "
                  "(rescaling x̂0 by a high percentile of its absolute values) keeps fidelity and text alignment "
                  "better.",
                  "Saharia et al. 2022 (Imagen), Section 2.3 and its FID-CLIP Pareto curves over guidance weights: "
                  "dynamic better than static, static better than none, at large weights. t2i's percentile: 0.95.",
                  ["guidance scale", "thresholding", "all-attribute accuracy", "saturated pixels", "domain FID"])
    results = {}
    for scale in (1.0, 5.0, 8.0):
        for mode in ("none", "static", "dynamic"):
            m = ctx.measure(pipe, SamplerSettings(steps=25, eta=0.0, guidance_scale=scale, thresholding=mode))
            results[(scale, mode)] = m
            claim.rows.append([scale, mode, f"{100 * m['all']:.1f}%", f"{100 * m['saturation']:.1f}%",
                               f"{m['fid']:.4f}"])
    dyn, sta = results[(8.0, "dynamic")], results[(8.0, "static")]
    real, _ = real_images(ctx.val, pipe.image_size, 500)
    real_sat = saturation(real.float() / 127.5 - 1)
    claim.rows.append(["real images", "", "", f"{100 * real_sat:.1f}%", ""])
    why = (f" Real shapes images have {100 * real_sat:.1f}% of their pixels at the range edges (pure colours), so "
           f"dynamic thresholding's rescaling (which assumes natural images rarely saturate) greys them out "
           f"({100 * dyn['saturation']:.1f}% saturated pixels at guidance 8).") if real_sat > 0.3 else ""
    claim.verdict = (f"{'Agrees' if dyn['all'] >= sta['all'] else 'Does not agree'}: at guidance 8 dynamic "
                     f"thresholding scores {100 * dyn['all']:.1f}% against static {100 * sta['all']:.1f}%." + why)
    claim.data = {**{_key(s, mode): m for (s, mode), m in results.items()}, "real saturation": real_sat}
    return claim


def classifier_vs_cfg(ctx: Context, base: str, classifier: str, **_) -> Claim:
    """The Imagen base's unconditional model guided by the noisy-image classifier (shape and colour heads), against
    the same base under classifier-free guidance, at the base's sampler settings otherwise."""
    pipe = LatentDiffusionPipeline.from_export(base, stage="base", device=ctx.device)
    settings = pipe.config["model"]["sampler"]
    steps, mode = int(settings.get("steps", 25)), settings.get("thresholding", "none")
    guided = ClassifierGuidedPipeline.from_exports(pipe, classifier, device=ctx.device)
    claim = Claim("classifier_vs_cfg", "Classifier guidance vs classifier-free guidance",
                  "Classifier guidance (the gradient of a classifier trained on noisy images, added to an "
                  "unconditional model's score) trades diversity for fidelity; classifier-free guidance reaches the "
                  "same kind of trade-off with no classifier, and text-conditional models guided without a "
                  "classifier give better samples.",
                  "Dhariwal & Nichol 2021, Table 4 and Fig. 4: the classifier scale raises precision/IS and lowers "
                  "recall; Ho & Salimans 2022, Section 4 and Table 1: classifier-free guidance gives the same FID/IS "
                  "trade-off; Nichol et al. 2022 (GLIDE), Section 5: classifier-free guidance preferred to CLIP "
                  "guidance by human raters.",
                  ["guidance", "scale", "shape+colour accuracy", "all-attribute accuracy", "domain FID", "seconds"])
    results = {}
    for scale in (0.0, 3.0, 10.0, 30.0):
        start = time.time()
        images = torch.cat([guided(ctx.prompts[i: i + ctx.batch_size], scale=scale,
                                   settings=SamplerSettings(steps=steps, eta=0.0, guidance_scale=1.0,
                                                            thresholding=mode), seed=ctx.seed + i)
                            for i in range(0, len(ctx.prompts), ctx.batch_size)]).cpu()
        results[("classifier", scale)] = ctx.judge(images, time.time() - start)
    for scale in (1.0, 3.0, 5.0):
        results[("classifier-free", scale)] = ctx.measure(
            pipe, SamplerSettings(steps=steps, eta=0.0, guidance_scale=scale, thresholding=mode))
    for (kind, scale), m in results.items():
        claim.rows.append([kind if scale or kind != "classifier" else "none (unconditional model)", scale,
                           f"{100 * m['shape_color']:.1f}%", f"{100 * m['all']:.1f}%", f"{m['fid']:.4f}",
                           f"{m['seconds']:.1f}"])
    best_cg = max((k for k in results if k[0] == "classifier"), key=lambda k: results[k]["shape_color"])
    best_cfg = max((k for k in results if k[0] == "classifier-free"), key=lambda k: results[k]["shape_color"])
    cg, free, uncond = results[best_cg], results[best_cfg], results[("classifier", 0.0)]
    agrees = cg["shape_color"] > uncond["shape_color"] and free["shape_color"] >= cg["shape_color"]
    claim.verdict = (f"{'Agrees' if agrees else 'Does not agree'}: the classifier lifts the unconditional model's "
                     f"shape+colour accuracy from {100 * uncond['shape_color']:.1f}% to {100 * cg['shape_color']:.1f}%"
                     f" (scale {best_cg[1]:g}, domain FID {cg['fid']:.3f}); classifier-free guidance reaches "
                     f"{100 * free['shape_color']:.1f}% (scale {best_cfg[1]:g}, domain FID {free['fid']:.3f}) and "
                     f"also gets size, position and background, which the classifier has no heads for "
                     f"({100 * free['all']:.1f}% against {100 * cg['all']:.1f}% all-attribute).")
    claim.data = {_key(k, s): m for (k, s), m in results.items()}
    return claim


def unclip_prior(ctx: Context, prior: str, decoder: str, **_) -> Claim:
    """One decoder, four conditioning signals (Ramesh et al. 2022, Fig. 9): the caption alone (learned null image
    embedding), the caption with its CLIP text embedding in place of the image embedding, the caption with the
    prior's image embedding, and the true image embedding of the prompt's own rendering (an upper bound)."""
    pipe = UnclipPipeline.from_exports(prior, decoder, device=ctx.device)
    st = pipe.settings
    claim = Claim("unclip_prior", "unCLIP: the prior against conditioning the decoder on the text directly",
                  "A prior that maps the caption to a CLIP image embedding is worth its cost: the same decoder "
                  "conditioned on the caption alone, or on the caption's CLIP text embedding, gives worse samples "
                  "than with the prior's image embedding.",
                  "Ramesh et al. 2022, Section 5.1 (Importance of the prior) and Fig. 9: one decoder given the "
                  "caption with a zero CLIP embedding, the caption with its CLIP text embedding, and the caption "
                  "with a prior-generated image embedding; the prior's samples are the best, and human evaluators "
                  "prefer unCLIP with a prior (Section 5.2).",
                  ["decoder conditioning", "all-attribute accuracy", "shape accuracy", "domain FID",
                   "seconds (prior included)"])
    rendered = torch.stack([torch.from_numpy(render(parse_caption(p))) for p in ctx.prompts])
    true = pipe.embed_images(rendered.permute(0, 3, 1, 2).float() / 127.5 - 1).cpu()

    def decode(embeds_for) -> dict:
        start = time.time()
        images = []
        for i in range(0, len(ctx.prompts), ctx.batch_size):
            chunk = ctx.prompts[i: i + ctx.batch_size]
            images.append(pipe.decoder(embeds_for(chunk, i), chunk, st.decoder, seed=ctx.seed + i + 1).cpu())
        return ctx.judge(torch.cat(images), time.time() - start)

    def text_embedding(chunk, _):
        return clip_text_condition(pipe.prior.text_encoder, chunk)[1]

    def from_prior(chunk, i):
        return pipe.prior(chunk, st.prior, seed=ctx.seed + i, best_of=st.best_of)

    results = {"caption only": decode(lambda chunk, i: None),
               "caption + CLIP text embedding": decode(text_embedding),
               "caption + prior's image embedding (unCLIP)": decode(from_prior),
               "caption + true image embedding (upper bound)": decode(lambda chunk, i: true[i: i + len(chunk)])}
    for name, m in results.items():
        claim.rows.append([name, f"{100 * m['all']:.1f}%", f"{100 * m['shape']:.1f}%", f"{m['fid']:.4f}",
                           f"{m['seconds']:.1f}"])
    with_prior = results["caption + prior's image embedding (unCLIP)"]
    direct = {k: v for k, v in results.items() if k in ("caption only", "caption + CLIP text embedding")}
    best_direct = max(direct, key=lambda k: direct[k]["all"])
    agrees = all(with_prior["all"] > v["all"] and with_prior["fid"] < v["fid"] for v in direct.values())
    claim.verdict = (f"{'Agrees' if agrees else 'Does not agree'}: with the prior the decoder scores "
                     f"{100 * with_prior['all']:.1f}% (domain FID {with_prior['fid']:.3f}); the best direct "
                     f"conditioning, {best_direct}, scores {100 * direct[best_direct]['all']:.1f}% "
                     f"({direct[best_direct]['fid']:.3f}). The same decoder and sampler settings in every row; the "
                     f"prior adds {with_prior['seconds'] - direct['caption only']['seconds']:.1f} s of sampling for "
                     f"{len(ctx.prompts)} prompts.")
    claim.data = results
    return claim
