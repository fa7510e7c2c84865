"""The claims measured by sampling the recipes' exports (see benchmarks/claims.py): DDIM vs DDPM over the number
of steps, the guidance scale, static vs dynamic thresholding, classifier vs classifier-free guidance, and the unCLIP
prior vs decoding from the caption alone or from its CLIP text embedding."""

from __future__ import annotations

import time

import torch
from claims_common import Claim, Context, better, cell, three_way

from t2i.eval.cascade_report import saturation
from t2i.eval.ldm_report import real_images
from t2i.eval.shapes import parse_caption
from t2i.eval.unclip_report import true_images
from t2i.pipelines.classifier_guidance import ClassifierGuidedPipeline
from t2i.pipelines.ldm import LatentDiffusionPipeline
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.unclip import UnclipPipeline
from t2i.pipelines.unclip_stages import clip_text_condition

STEPS = (2, 3, 5, 10, 20, 50, 1000)  # down to where DDIM and ancestral sampling part
FEW_STEPS = (2, 3, 5, 10)


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
                  ["steps", "η", "all-attribute accuracy", "domain FID", "seconds"],
                  rule=f"At {', '.join(map(str, FEW_STEPS))} steps, η=0 against η=1 on all-attribute accuracy and on "
                       "domain FID: agrees when η=0 is ahead in one of these comparisons at least and behind in none "
                       "(95% intervals apart), does not agree when it is behind in one, inconclusive otherwise.")
    results = {}
    for steps in STEPS:
        for eta in (0.0, 1.0):
            m = ctx.measure(pipe, SamplerSettings(steps=steps, eta=eta, guidance_scale=scale))
            results[(steps, eta)] = m
            claim.rows.append([steps, eta, cell(m, "all"), cell(m, "fid"), f"{m['seconds']:.1f}"])
    outcomes = {(s, key): better(results[(s, 0.0)], results[(s, 1.0)], key, lower_is_better=key == "fid")
                for s in FEW_STEPS for key in ("all", "fid")}

    def where(sign: int) -> str:
        return ", ".join(f"{s} steps ({'accuracy' if k == 'all' else 'FID'})"
                         for (s, k), o in outcomes.items() if o == sign) or "none"

    claim.verdict = (f"{three_way(list(outcomes.values()), any_suffices=True)}: η=0 is ahead of η=1 at "
                     f"{where(1)} and behind at {where(-1)} of the "
                     f"{len(outcomes)} comparisons at {', '.join(map(str, FEW_STEPS))} steps (95% intervals apart; "
                     f"guidance scale {scale:g}).")
    claim.data = {_key(s, e): m for (s, e), m in results.items()}
    return claim


SCALES = (1.0, 1.5, 3.0, 5.0, 8.0)


def cfg(ctx: Context, ldm: str, **_) -> Claim:
    pipe = LatentDiffusionPipeline.from_export(ldm, device=ctx.device)
    claim = Claim("cfg", "Classifier-free guidance scale",
                  "Guidance trades diversity for fidelity: sample quality per image (and text alignment) rises "
                  "with the guidance scale while FID is best at a small scale and worsens beyond it.",
                  "Ho & Salimans 2022, Table 1 (ImageNet 64x64): FID best at a small guidance strength w "
                  "(scale 1 + w), IS rising with w.",
                  ["prompts", "guidance scale", "all-attribute accuracy", "shape accuracy", "domain FID", "seconds"],
                  rule="Accuracy: the best guided scale (1.5 to 8) against no guidance (scale 1), on prompts of seen "
                       "and of unseen combinations, must be ahead on both; FID: scale 8 against the scale with the "
                       "lowest domain FID (seen prompts) must be worse. Agrees when the three comparisons go the "
                       "paper's way (95% intervals apart), does not agree when one goes against it, inconclusive "
                       "otherwise.")
    results = {}
    for split in ("seen", "unseen"):
        for scale in SCALES:
            m = ctx.measure(pipe, SamplerSettings(steps=50, eta=0.0, guidance_scale=scale), split)
            results[(split, scale)] = m
            claim.rows.append([split, scale, cell(m, "all"), cell(m, "shape"), cell(m, "fid"), f"{m['seconds']:.1f}"])
    best = {sp: max(SCALES[1:], key=lambda s, sp=sp: results[(sp, s)]["all"]) for sp in ("seen", "unseen")}
    best_fid = min(SCALES, key=lambda s: results[("seen", s)]["fid"])
    outcomes = [better(results[(sp, best[sp])], results[(sp, 1.0)], "all") for sp in ("seen", "unseen")]
    outcomes.append(better(results[("seen", best_fid)], results[("seen", 8.0)], "fid", lower_is_better=True)
                    if best_fid != 8.0 else -1)
    claim.verdict = (f"{three_way(outcomes)}: accuracy is highest at scale {best['seen']:g} on seen combinations "
                     f"({cell(results[('seen', best['seen'])], 'all')} against {cell(results[('seen', 1.0)], 'all')} "
                     f"unguided) and at {best['unseen']:g} on unseen ones ({cell(results[('unseen', best['unseen'])], 'all')} "
                     f"against {cell(results[('unseen', 1.0)], 'all')}); domain FID is lowest at scale {best_fid:g} "
                     f"({cell(results[('seen', best_fid)], 'fid')}; scale 8: {cell(results[('seen', 8.0)], 'fid')}).")
    claim.data = {_key(sp, s): m for (sp, s), m in results.items()}
    return claim


def thresholding(ctx: Context, base: str, **_) -> Claim:
    pipe = LatentDiffusionPipeline.from_export(base, stage="base", device=ctx.device)
    claim = Claim("thresholding", "Static vs dynamic thresholding at high guidance (pixel-space base model)",
                  "At large guidance weights static thresholding gives over-saturated images; dynamic thresholding "
                  "(rescaling x̂0 by a high percentile of its absolute values) keeps fidelity and text alignment "
                  "better.",
                  "Saharia et al. 2022 (Imagen), Section 2.3 and its FID-CLIP Pareto curves over guidance weights: "
                  "dynamic better than static, static better than none, at large weights. t2i's percentile: 0.95.",
                  ["guidance scale", "thresholding", "all-attribute accuracy", "saturated pixels", "domain FID"],
                  rule="At guidance 8, dynamic against static thresholding on all-attribute accuracy: agrees when "
                       "dynamic is ahead (95% intervals apart), does not agree when it is behind, inconclusive "
                       "otherwise.")
    results = {}
    for scale in (1.0, 5.0, 8.0):
        for mode in ("none", "static", "dynamic"):
            m = ctx.measure(pipe, SamplerSettings(steps=25, eta=0.0, guidance_scale=scale, thresholding=mode))
            results[(scale, mode)] = m
            claim.rows.append([scale, mode, cell(m, "all"), f"{100 * m['saturation']:.1f}%", cell(m, "fid")])
    dyn, sta = results[(8.0, "dynamic")], results[(8.0, "static")]
    real, _ = real_images(ctx.val, pipe.image_size, 500)
    real_sat = saturation(real.float() / 127.5 - 1)
    claim.rows.append(["real images", "", "", f"{100 * real_sat:.1f}%", ""])
    why = (f" Real shapes images have {100 * real_sat:.1f}% of their pixels at the range edges (pure colours), so "
           f"dynamic thresholding's rescaling (which assumes natural images rarely saturate) greys them out "
           f"({100 * dyn['saturation']:.1f}% saturated pixels at guidance 8).") if real_sat > 0.3 else ""
    claim.verdict = (f"{three_way([better(dyn, sta, 'all')])}: at guidance 8 dynamic thresholding scores "
                     f"{cell(dyn, 'all')} against static {cell(sta, 'all')}." + why)
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
                  ["guidance", "scale", "shape+colour accuracy", "all-attribute accuracy", "domain FID", "seconds"],
                  rule="Shape+colour accuracy: the best classifier scale against the unconditional model must be "
                       "ahead, and the best classifier-free scale against the best classifier scale must not be "
                       "behind (95% intervals apart). Agrees when both hold, does not agree when either goes against, "
                       "inconclusive when the first is unresolved.")
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
                           cell(m, "shape_color"), cell(m, "all"), cell(m, "fid"), f"{m['seconds']:.1f}"])
    best_cg = max((k for k in results if k[0] == "classifier"), key=lambda k: results[k]["shape_color"])
    best_cfg = max((k for k in results if k[0] == "classifier-free"), key=lambda k: results[k]["shape_color"])
    cg, free, uncond = results[best_cg], results[best_cfg], results[("classifier", 0.0)]
    outcomes = [better(cg, uncond, "shape_color"), -1 if better(free, cg, "shape_color") < 0 else 1]
    claim.verdict = (f"{three_way(outcomes)}: the classifier lifts the unconditional model's "
                     f"shape+colour accuracy from {cell(uncond, 'shape_color')} to {cell(cg, 'shape_color')}"
                     f" (scale {best_cg[1]:g}, domain FID {cg['fid']:.3f}); classifier-free guidance reaches "
                     f"{cell(free, 'shape_color')} (scale {best_cfg[1]:g}, domain FID {free['fid']:.3f}) and "
                     f"also gets size, position and background, which the classifier has no heads for "
                     f"({cell(free, 'all')} against {cell(cg, 'all')} all-attribute).")
    claim.data = {_key(k, s): m for (k, s), m in results.items()}
    return claim


def unclip_prior(ctx: Context, prior: str, decoder: str, **_) -> Claim:
    """One decoder, four conditioning signals (Ramesh et al. 2022, Fig. 9): the caption alone (learned null image
    embedding), the caption with its CLIP text embedding in place of the image embedding, the caption with the
    prior's image embedding, and the true image embedding of the prompt's own rendering (an upper bound)."""
    pipe = UnclipPipeline.from_exports(prior, decoder, device=ctx.device)
    claim = Claim("unclip_prior", "unCLIP: the prior against conditioning the decoder on the text directly",
                  "A prior that maps the caption to a CLIP image embedding is worth its cost: the same decoder "
                  "conditioned on the caption alone, or on the caption's CLIP text embedding, gives worse samples "
                  "than with the prior's image embedding.",
                  "Ramesh et al. 2022, Section 5.1 (Importance of the prior) and Fig. 9: one decoder given the "
                  "caption with a zero CLIP embedding, the caption with its CLIP text embedding, and the caption "
                  "with a prior-generated image embedding; the prior's samples are the best, and human evaluators "
                  "prefer unCLIP with a prior (Section 5.2).",
                  ["prompts", "decoder conditioning", "all-attribute accuracy", "shape accuracy", "domain FID",
                   "seconds (prior included)"],
                  rule="All-attribute accuracy: the decoder with the prior's image embedding against the better of the "
                       "two direct conditionings (the caption alone, the caption's CLIP text embedding), on prompts of "
                       "seen and of unseen combinations: agrees when ahead on both (95% intervals apart), does not "
                       "agree when behind on one, inconclusive otherwise.")
    outcomes, results, summary = [], {}, []
    for split in ("seen", "unseen"):
        prompts = ctx.split(split)
        rows = _unclip_rows(ctx, pipe, prompts)
        for name, m in rows.items():
            results[f"{split}: {name}"] = m
            claim.rows.append([split, name, cell(m, "all"), cell(m, "shape"), cell(m, "fid"), f"{m['seconds']:.1f}"])
        with_prior = rows[PRIOR_ROW]
        direct = {k: rows[k] for k in DIRECT_ROWS}
        best_direct = max(direct, key=lambda k: direct[k]["all"])
        outcomes.append(better(with_prior, direct[best_direct], "all"))
        summary.append(f"on {split} combinations the prior gives {cell(with_prior, 'all')} against "
                       f"{cell(direct[best_direct], 'all')} for {best_direct}")
    claim.verdict = (f"{three_way(outcomes)}: " + "; ".join(summary) + ". The same decoder and sampler settings in "
                     "every row; the prior's sampling is in its rows' seconds.")
    claim.data = results
    return claim


PRIOR_ROW = "caption + prior's image embedding (unCLIP)"
DIRECT_ROWS = ("caption only", "caption + CLIP text embedding")


def _unclip_rows(ctx: Context, pipe: UnclipPipeline, prompts: list[str]) -> dict[str, dict]:
    """The one decoder on `prompts` under each conditioning, judged."""
    st = pipe.settings
    true = pipe.embed_images(true_images([parse_caption(p) for p in prompts])).cpu()

    def decode(embeds_for) -> dict:
        start = time.time()
        images = []
        for i in range(0, len(prompts), ctx.batch_size):
            chunk = prompts[i: i + ctx.batch_size]
            images.append(pipe.decoder(embeds_for(chunk, i), chunk, st.decoder, seed=ctx.seed + i + 1).cpu())
        return ctx.judge(torch.cat(images), time.time() - start, prompts)

    def text_embedding(chunk, _):
        return clip_text_condition(pipe.prior.text_encoder, chunk)[1]

    def from_prior(chunk, i):
        return pipe.prior(chunk, st.prior, seed=ctx.seed + i, best_of=st.best_of)

    return {"caption only": decode(lambda chunk, i: None),
            "caption + CLIP text embedding": decode(text_embedding),
            PRIOR_ROW: decode(from_prior),
            "caption + true image embedding (upper bound)": decode(lambda chunk, i: true[i: i + len(chunk)])}


def frozen_vs_joint(ctx: Context, base: str, glide_base: str, **_) -> Claim:
    """The Imagen recipe's base (frozen CLIP text tower) against the GLIDE recipe's base (text transformer trained
    jointly), both 16px pixel-space models at their own trained sampler settings."""
    claim = Claim("frozen_vs_joint", "A frozen pretrained text encoder against one trained jointly",
                  "Conditioning on a large frozen text encoder pretrained on text generalises better than a text "
                  "encoder trained jointly on the image-text pairs, most visibly on compositions of attributes.",
                  "Saharia et al. 2022 (Imagen), Sections 2.1 and 4.4: frozen pretrained text encoders (T5, CLIP) "
                  "condition the model, and scaling the frozen encoder improves image-text alignment more than "
                  "scaling the U-Net; on DrawBench, whose prompts probe compositions, raters prefer Imagen to "
                  "GLIDE, whose text transformer is trained jointly.",
                  ["prompts", "text encoder", "all-attribute accuracy", "position accuracy", "domain FID", "seconds"],
                  rule="All-attribute accuracy on prompts of unseen combinations: the frozen-encoder base against "
                       "the jointly trained one: agrees when ahead (95% intervals apart), does not agree when behind, "
                       "inconclusive otherwise. The seen rows show how much each model lost to the new combinations.")
    results = {}
    for name, export in (("frozen CLIP text tower (Imagen)", base), ("trained jointly (GLIDE)", glide_base)):
        pipe = LatentDiffusionPipeline.from_export(export, stage="base", device=ctx.device)
        settings = SamplerSettings(**{k: v for k, v in pipe.config["model"]["sampler"].items()
                                      if k in SamplerSettings.__dataclass_fields__})
        for split in ("seen", "unseen"):
            results[(split, name)] = m = ctx.measure(pipe, settings, split)
            claim.rows.append([split, name, cell(m, "all"), cell(m, "position"), cell(m, "fid"),
                               f"{m['seconds']:.1f}"])
    frozen, joint = (results[("unseen", n)] for n in ("frozen CLIP text tower (Imagen)", "trained jointly (GLIDE)"))
    claim.verdict = (f"{three_way([better(frozen, joint, 'all')])}: on unseen combinations the frozen-encoder base "
                     f"scores {cell(frozen, 'all')} against {cell(joint, 'all')} for the jointly trained one (position "
                     f"{cell(frozen, 'position')} against {cell(joint, 'position')}).")
    claim.data = {_key(sp, n): m for (sp, n), m in results.items()}
    return claim
