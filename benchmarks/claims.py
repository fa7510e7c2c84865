"""The papers' claims measured in miniature on the shapes dataset with the tiny recipes' exports: each claim states
what the paper says and its figure, measures the same comparison here (prompt alignment judged by the shapes
oracle, domain FID on the tiny CLIP export's image features, wall time), and says whether we agree.

    make train-ldm && make train-imagen && make train-unclip && make train-glide   # the exports (runs/...)
    python benchmarks/claims.py --prompts 200 --out docs/claims.md  # writes docs/claims.{md,json} + plots

Claims measured here (``--only`` picks some; ``--merge`` keeps the other claims of an earlier ``--out`` page):

- ``ddim_ddpm``: DDIM (η=0) against DDPM-like ancestral sampling (η=1) over 2/3/5/10/20/50/1000 steps
  (Song et al. 2021, Table 1).
- ``cfg``: the classifier-free guidance scale sweep on seen and unseen combinations (Ho & Salimans 2022).
- ``thresholding``: static against dynamic thresholding at high guidance on the Imagen base (Saharia et al. 2022).
- ``latent_pixel``: the tiny LDM trained for equal wall time on latents and on pixels (Rombach et al. 2022).
- ``noise_augmentation``: the SR stage trained with and without noise-conditioning augmentation (CDM, Imagen).
- ``unclip_prior``: one unCLIP decoder given the caption alone, its CLIP text embedding, or the prior's image
  embedding, on seen and unseen combinations (Ramesh et al. 2022).
- ``classifier_vs_cfg``: classifier guidance against classifier-free guidance on the Imagen base.
- ``frozen_vs_joint``: the Imagen base (frozen CLIP text tower) against the GLIDE base (text encoder trained jointly)
  on unseen combinations (Saharia et al. 2022).

Every row is measured in this run; nothing is copied from earlier reports. Every accuracy carries its 95% Wilson
interval and every domain FID a bootstrap interval over the generated images; each verdict follows the rule written
beside its claim (agrees / does not agree / inconclusive: see `three_way`). Domain FID is comparable only within
one claim (same CLIP export, same real images): it is not the Inception FID of the papers.

The claims that train (``latent_pixel``, ``noise_augmentation``) train in this process through
``t2i.cli.train`` with the recipe export's own config (data, parents, model), changed only where the claim says;
their runs go under ``--work`` (default ``runs/claims``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

from t2i.allowed_targets import check_run_config
from t2i.cli.train import train
from t2i.conditioning.lowres import downsample
from t2i.conditioning.text_encoding import clip_text_condition
from t2i.config_layout import upgrade_model_config
from t2i.eval.cascade_report import saturation
from t2i.eval.fid import ClipImageFeatures, feature_stats
from t2i.eval.frechet import FeatureStats
from t2i.eval.intervals import percent, wilson
from t2i.eval.ldm_report import generate_for, real_images
from t2i.eval.psnr import psnr
from t2i.eval.shapes import ATTRIBUTES, compare, eval_prompts, judge_all, parse_caption, score
from t2i.eval.unclip_report import true_images
from t2i.pipelines.cascade import CascadePipeline
from t2i.pipelines.classifier_guidance import ClassifierGuidedPipeline
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline
from t2i.pipelines.unclip import UnclipPipeline

# ---- a claim, its measuring context and its verdict ---------------------------------------------------------
# A verdict follows the rule written beside the claim before anything is measured: every comparison the rule needs
# is decided only when the two figures' 95% intervals do not overlap. "Agrees" when each goes the paper's way,
# "Does not agree" when one goes against it, "Inconclusive" when a needed difference is inside the intervals.
AGREES, DISAGREES, INCONCLUSIVE = "Agrees", "Does not agree", "Inconclusive"
FID_RESAMPLES = 200  # bootstrap resamples of the generated images' features per domain FID


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two intervals share a point (a difference they do not resolve)."""
    return a[0] <= b[1] and b[0] <= a[1]


def bootstrap(sample: np.ndarray, statistic: Callable[[np.ndarray], float], resamples: int = 200,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(sample)``, resampling the rows of `sample`."""
    sample = np.asarray(sample)
    if len(sample) < 2:
        raise ValueError(f"a bootstrap needs at least 2 observations, got {len(sample)}")
    rng = np.random.default_rng(seed)
    values = [statistic(sample[rng.integers(0, len(sample), size=len(sample))]) for _ in range(resamples)]
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def better(a: dict, b: dict, key: str, lower_is_better: bool = False) -> int:
    """+1 when `a`'s figure `key` is better than `b`'s with their 95% intervals apart, -1 when worse, 0 when the
    intervals overlap (a difference these samples do not resolve)."""
    if overlap(a["ci"][key], b["ci"][key]):
        return 0
    sign = 1 if a[key] > b[key] else -1
    return -sign if lower_is_better else sign


def three_way(outcomes: list[int], any_suffices: bool = False) -> str:
    """The verdict from the comparisons a claim's rule needs (each +1 the paper's way, -1 against it, 0 unresolved):
    one against it is a disagreement; agreement needs every one (or, with `any_suffices`, one) the paper's way."""
    if any(o < 0 for o in outcomes):
        return DISAGREES
    enough = any(o > 0 for o in outcomes) if any_suffices else outcomes and all(o > 0 for o in outcomes)
    return AGREES if enough else INCONCLUSIVE


def cell(m: dict, key: str) -> str:
    """A measured figure with its 95% interval: accuracies in %, domain FID as is."""
    if key == "fid":
        low, high = m["ci"][key]
        return f"{m[key]:.4f} [{low:.4f}, {high:.4f}]"
    return percent(m[key], m["ci"][key])


@dataclass
class Claim:
    """One claim: the paper's words, its figure, the rule its verdict follows, our rows and verdict."""

    key: str
    title: str
    paper: str  # what the paper claims
    figure: str  # the paper's figure / table and its numbers
    columns: list[str]
    rule: str = ""  # how the verdict is decided, written before measuring
    rows: list[list] = field(default_factory=list)
    verdict: str = ""
    data: dict = field(default_factory=dict)  # the measured numbers behind the rows (for plots and the JSON)
    baseline: dict = field(default_factory=dict)  # resolution -> domain FID of as many REAL images (see Context)
    seconds: float = 0.0  # wall time of the whole claim, training included


@dataclass
class Context:
    """What every claim measures with: prompts of seen and unseen combinations, the shapes oracle, domain FID
    against real images, each figure with its 95% interval."""

    prompts: list[str]  # combinations seen in training
    unseen: list[str]  # combinations held out of training
    val: str  # validation shards (real images for domain FID)
    train: str  # training shards (claims that train)
    clip: ClipImageFeatures
    batch_size: int
    seed: int
    work: str = "runs/claims"  # where claims that train write their runs
    device: str = "cpu"  # where the pipelines sample (and the claims that train, train); judged on the CPU
    real_stats: dict = field(default_factory=dict)  # resolution -> FeatureStats of real validation images
    floors: dict = field(default_factory=dict)  # resolution -> domain FID of real training images (real_baseline)
    judged: set = field(default_factory=set)  # resolutions judged since the last real_baseline()

    def fid(self, images: torch.Tensor) -> tuple[float, tuple[float, float]]:
        """Domain FID of `images` against the real validation statistics, and its bootstrap interval over the
        generated images (the real statistics held fixed)."""
        res = images.shape[-1]
        if res not in self.real_stats:
            real, _ = real_images(self.val, res, 2000)
            self.real_stats[res] = feature_stats(self.clip, real, 256)
        self.judged.add(res)
        features = torch.cat([self.clip(images[i: i + 256]).cpu() for i in range(0, len(images), 256)])
        real = self.real_stats[res]

        def distance(sample) -> float:
            return real.distance(FeatureStats.of(torch.as_tensor(sample)))

        return distance(features.numpy()), bootstrap(features.numpy(), distance, FID_RESAMPLES, seed=self.seed)

    def real_baseline(self) -> dict[int, float]:
        """Domain FID of as many real training images as there are prompts against the same real validation
        statistics, at each resolution judged since the last call (one claim's): what real data scores at this
        sample count (FID's small-sample bias included), the floor to read the rows against."""
        for res in self.judged - set(self.floors):
            real, _ = real_images(self.train, res, len(self.prompts))
            self.floors[res] = self.real_stats[res].distance(feature_stats(self.clip, real, 256))
        out = {res: self.floors[res] for res in sorted(self.judged)}
        self.judged.clear()
        return out

    @staticmethod
    def settings_of(pipe, steps: int = 50) -> SamplerSettings:
        """DDIM (η=0) at the export's trained guidance scale."""
        scale = float(pipe.config["model"].get("sampler", {}).get("guidance_scale", 3.0))
        return SamplerSettings(steps=steps, eta=0.0, guidance_scale=scale)

    def split(self, name: str) -> list[str]:
        return {"seen": self.prompts, "unseen": self.unseen}[name]

    def judge(self, images: torch.Tensor, seconds: float, prompts: list[str] | None = None) -> dict:
        """Accuracy (all five attributes, each attribute, shape and colour together) and domain FID of images
        generated for `prompts` (default: the seen ones), each with its 95% interval under ``ci``."""
        prompts = self.prompts if prompts is None else prompts
        images = images.float().cpu()
        verdicts = judge_all(images)
        specs = [parse_caption(p) for p in prompts]
        s = compare(verdicts, specs)
        both = sum(v.get("shape") == sp.shape and v.get("color") == sp.color for v, sp in zip(verdicts, specs))
        fid, fid_ci = self.fid(images)
        return {"n": len(specs), **{a: s[a] for a in (*ATTRIBUTES, "all")}, "shape_color": both / len(specs),
                "fid": fid, "seconds": seconds, "saturation": saturation(images),
                "ci": {**s["ci95"], "shape_color": list(wilson(both, len(specs))), "fid": list(fid_ci)}}

    def measure(self, pipe, settings: SamplerSettings, split: str = "seen") -> dict:
        prompts = self.split(split)
        start = time.time()
        images = generate_for(pipe, prompts, settings, self.batch_size, self.seed)
        if images.is_cuda:
            torch.cuda.synchronize()
        return self.judge(images, time.time() - start, prompts)


# ---- claims measured by sampling the recipes' exports -------------------------------------------------------
STEPS = (2, 3, 5, 10, 20, 50, 1000)  # down to where DDIM and ancestral sampling part
FEW_STEPS = (2, 3, 5, 10)


def _key(*parts) -> str:
    return " ".join(f"{p:g}" if isinstance(p, float) else str(p) for p in parts)


def ddim_ddpm(ctx: Context, ldm: str, **_) -> Claim:
    pipe = TextToImagePipeline.from_export(ldm, device=ctx.device)
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
    pipe = TextToImagePipeline.from_export(ldm, device=ctx.device)
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
    pipe = TextToImagePipeline.from_export(base, stage="base", device=ctx.device)
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
    pipe = TextToImagePipeline.from_export(base, stage="base", device=ctx.device)
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
        pipe = TextToImagePipeline.from_export(export, stage="base", device=ctx.device)
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


# ---- claims that train inside the run -----------------------------------------------------------------------
def export_config(export: str | Path) -> dict:
    """The full resolved training config an export was written with, its ``_target_``s checked against
    `t2i.allowed_targets` (the config is trained again: every node of it is instantiated)."""
    path = Path(export) / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config = {**config, "model": upgrade_model_config(config["model"])}  # an export of an older layout as today's
    check_run_config(config, path)
    return config


def _rebased(node, old: str, new: str):
    """Every string under ``node`` with the old run folder in it points into the new one instead (run_dir,
    export_dir, the checkpoint callbacks' paths)."""
    if isinstance(node, dict):
        return {k: _rebased(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebased(v, old, new) for v in node]
    return node.replace(old, new) if isinstance(node, str) else node


def retrain_config(export: str | Path, run_dir: str | Path, **changes) -> dict:
    """The export's own training config, moved to ``run_dir``, quiet (no sample grids, no validation, CSV logs)
    and with ``changes`` applied (dotted keys, e.g. ``{"model.image_size": 16}``)."""
    original = export_config(export)
    cfg = _rebased(original, str(original["run_dir"]), str(run_dir))
    quiet = {"model.sample_prompts": [], "model.sample_every_n_steps": 10**9, "final_validation": False,
             "trainer.limit_val_batches": 0, "trainer.enable_progress_bar": False, "ckpt_path": None,
             "logger": {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(run_dir),
                                "name": "csv"}}}
    for key, value in {**quiet, **changes}.items():
        parts = key.split(".")
        node = cfg
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


def on_device(device: str) -> dict:
    """Trainer settings for ``device``: the export's own (CPU) ones, or one GPU in bf16."""
    return {} if str(device) == "cpu" else {"trainer.accelerator": "gpu", "trainer.devices": 1,
                                            "trainer.precision": "bf16-mixed"}


def train_run(cfg: dict) -> dict:
    """Train one stage from a full config; its export, wall seconds (fit + export) and optimizer steps."""
    start = time.time()
    result = train(OmegaConf.create(cfg))
    seconds = time.time() - start
    return {"export": result.export_dir, "seconds": seconds, "steps": last_step(result.last_checkpoint)}


def last_step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])


def latent_pixel(ctx, ldm: str, work: str, minutes: float, **_):
    """The recipe's LDM config trained from scratch twice for ``minutes`` of wall time each: on its precomputed
    VAE latents, and on pixels at the same resolution with the same UNet (3 channels in and out)."""
    cfg = export_config(ldm)
    model = cfg["model"]
    if not str(model["target"]["_target_"]).endswith(".VaeLatents"):
        raise ValueError(f"latent_pixel needs a latent diffusion export, {ldm}'s target is "
                         f"{model['target']['_target_']}")
    precomputed = bool(model["target"].get("precomputed"))
    res = int(model["image_size"])
    hours, rest = divmod(round(60 * minutes), 3600)
    budget = {"trainer.max_steps": -1, "trainer.max_time": f"00:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"}
    pixel = {"model.target": {"_target_": "t2i.stages.targets.Pixels"}, "model.denoiser.in_channels": 3,
             "model.denoiser.out_channels": 3, "parents": {}}
    if precomputed:  # precomputed latents: the pixel model reads the images they came from
        pixel.update({"data.train_manifest": ctx.train, "data.val_manifest": ctx.val, "data.resolution": res,
                      "data.array_fields": []})
    device = on_device(ctx.device)
    runs = {"latent": retrain_config(ldm, f"{work}/latent", **budget, **device),
            "pixel": retrain_config(ldm, f"{work}/pixel", **budget, **pixel, **device)}
    claim = Claim("latent_pixel", f"Latent vs pixel diffusion at equal training wall time ({res}px)",
                  "Diffusion in a perceptually equivalent latent space of a pretrained autoencoder cuts training and "
                  "sampling cost by a large factor: at equal compute, LDMs with downsampling factors 4-16 reach far "
                  "better sample quality than pixel-based diffusion (LDM-1).",
                  "Rombach et al. 2022, Section 4.1 and Fig. 6: class-conditional ImageNet, FID after equal training "
                  "steps; LDM-1 (pixels) far behind LDM-4 to LDM-16 throughout training; Fig. 7: LDM-4/8 also reach "
                  "better FID at higher sampling throughput.",
                  ["space", "input", "steps in the budget", "wall s/step (start-up and export included)",
                   "all-attribute accuracy", "shape accuracy", "domain FID", f"sampling s ({len(ctx.prompts)} prompts)"],
                  rule="At equal training wall time, the latent model against the pixel model on all-attribute "
                       "accuracy and on domain FID: agrees when the latent model is ahead on both (95% intervals "
                       "apart), does not agree when behind on one, inconclusive otherwise.")
    results = {}
    for name, run_cfg in runs.items():
        trained = train_run(run_cfg)
        pipe = TextToImagePipeline.from_export(trained["export"], device=ctx.device)
        m = ctx.measure(pipe, ctx.settings_of(pipe))
        results[name] = {**m, **trained, "seconds_sampling": m["seconds"]}
        shape = (f"{pipe.first_stage.latent_channels}x{res // pipe.first_stage.downsample_factor}²"
                 if pipe.first_stage is not None else f"3x{res}²")
        claim.rows.append([name, shape, trained["steps"], f"{trained['seconds'] / max(trained['steps'], 1):.2f}",
                           cell(m, "all"), cell(m, "shape"), cell(m, "fid"), f"{m['seconds']:.1f}"])
    lat, pix = results["latent"], results["pixel"]
    ratio = (pix["seconds"] / max(pix["steps"], 1)) / (lat["seconds"] / max(lat["steps"], 1))
    outcomes = [better(lat, pix, "all"), better(lat, pix, "fid", lower_is_better=True)]
    claim.verdict = (f"{three_way(outcomes)}: in {minutes:g} minutes each, a pixel step cost "
                     f"{ratio:.1f}x a latent step ({pix['steps']} against {lat['steps']} steps); the latent model "
                     f"reached {cell(lat, 'all')} all-attribute accuracy against {cell(pix, 'all')} and "
                     f"domain FID {cell(lat, 'fid')} against {cell(pix, 'fid')}; sampling the prompts took {pix['seconds_sampling']:.0f} s "
                     f"in pixels against {lat['seconds_sampling']:.0f} s in latents. Not counted: the VAE's own training"
                     f"{' and the one-off latent encoding' if precomputed else ''} (the "
                     f"recipe's earlier steps), shared by every LDM trained on them.")
    claim.data = {k: {kk: vv for kk, vv in v.items() if kk != "export"} for k, v in results.items()}
    return claim


EARLY_FRACTION = 0.1  # noise_augmentation: the early base model's share of the recipe's base training steps


def noise_augmentation(ctx, base: str, sr: str, work: str, **_):
    """The recipe's SR stage against the same config trained with noise-conditioning augmentation off, each fed two
    base models: the recipe's, and an early one (its first tenth of training, same schedule) whose samples carry
    the artefacts the augmentation is meant to absorb; and each on real downsampled validation images."""
    cfg = export_config(sr)
    base_steps = int(export_config(base)["trainer"]["max_steps"])
    early_steps = max(1, round(EARLY_FRACTION * base_steps))
    trained = train_run(retrain_config(sr, f"{work}/sr_no_augmentation", **{
        "model.degradation.noise_prob": 0.0, "model.degradation.sample_noise_level": 0.0, **on_device(ctx.device)}))
    early = train_run(retrain_config(base, f"{work}/base_early", **{"trainer.max_steps": early_steps,
                                                                    **on_device(ctx.device)}))
    claim = Claim("noise_augmentation", "Noise-conditioning augmentation for the super-resolution stage",
                  "Conditioning augmentation (noising the low-resolution input in training, with the level given "
                  "to the network) makes the SR stage robust to the artefacts of the model below it: without it, "
                  "a cascade's sample quality drops, with it the cascade's FID improves markedly.",
                  "Ho et al. 2022 (Cascaded Diffusion Models), Section 4 ablations: Gaussian conditioning "
                  "augmentation is the most important ingredient for the 64→256 stage's FID; Saharia et al. 2022 "
                  "(Imagen), Section 2.5: used in all SR models, sampled at a fixed level (Imagen used ~0.2).",
                  ["base model", "SR stage (trained)", "sampling level", "cascade all-attribute accuracy",
                   "cascade domain FID (64px)", "PSNR to the 16px input"],
                  rule=f"On the early base model's samples ({early_steps} of {base_steps} steps: the artefacts the "
                       "claim is about), the cascade with the augmented SR stage (at its trained sampling level) "
                       "against the unaugmented one (at level 0), on domain FID and all-attribute accuracy: agrees "
                       "when it is ahead on one at least and behind on neither (95% intervals apart), does not agree "
                       "when behind on one, inconclusive otherwise. The recipe's base model's rows are shown beside.")
    real, captions = real_images(ctx.val, 64, len(ctx.prompts))
    real = real.float() / 127.5 - 1
    results, levels, on_real = {}, {}, {}
    bases = ((f"early ({early_steps} steps)", early["export"]), (f"recipe ({base_steps} steps)", base))
    for base_name, base_export in bases:
        small = None
        for name, export in (("augmentation on (recipe)", sr), ("augmentation off", trained["export"])):
            pipe = CascadePipeline.from_exports(base_export, [export], device=ctx.device)
            up = pipe.upsamplers[0]
            if small is None:  # the same base samples feed both SR stages
                small = torch.cat([pipe.base(ctx.prompts[i: i + ctx.batch_size], pipe.settings.base,
                                             seed=ctx.seed + i) for i in range(0, len(ctx.prompts), ctx.batch_size)])
                small = small.cpu()
            trained_level = levels[name] = float(up.net["degradation"].sample_noise_level)
            for level in sorted({0.0, trained_level}):
                def run(low, texts, up=up, settings=pipe.settings.sr[0], level=level):
                    return torch.cat([up(low[i: i + ctx.batch_size].to(up.device), settings, seed=ctx.seed + i,
                                         prompts=texts[i: i + ctx.batch_size] if up.takes_text else None,
                                         noise_level=level).cpu() for i in range(0, len(low), ctx.batch_size)])
                gen = run(small, ctx.prompts)
                row = {**ctx.judge(gen, 0.0), "psnr_input": float(psnr(downsample(gen, up.low_res), small, per_image=False))}
                results[(base_name, name, level)] = row
                claim.rows.append([base_name, name, f"{level:g}", cell(row, "all"), cell(row, "fid"),
                                   f"{row['psnr_input']:.1f} dB"])
                if (name, level) not in on_real:  # real low-res inputs: the SR stage alone, once per setting
                    up_real = run(downsample(real, up.low_res), captions)
                    r = score(up_real, captions)
                    on_real[(name, level)] = {"all": r["all"], "ci": {"all": r["ci95"]["all"]},
                                              "psnr_db": float(psnr(up_real, real, per_image=False))}
    for (name, level), r in on_real.items():
        claim.rows.append(["real low-res validation images", name, f"{level:g}", cell(r, "all"), "",
                           f"{r['psnr_db']:.1f} dB to the originals"])
    on_level = levels["augmentation on (recipe)"]
    pairs = {b: (results[(b, "augmentation on (recipe)", on_level)], results[(b, "augmentation off", 0.0)])
             for b, _ in bases}
    on, off = pairs[bases[0][0]]  # the early base: the rule's comparison
    outcomes = [better(on, off, "fid", lower_is_better=True), better(on, off, "all")]
    claim.verdict = (f"{three_way(outcomes, any_suffices=True)}: " + "; ".join(
        f"on the {name} base model's samples the cascade with the augmented SR stage (level {on_level:g}) scores "
        f"{cell(aug, 'all')} (domain FID {cell(aug, 'fid')}) against {cell(plain, 'all')} ({cell(plain, 'fid')}) "
        f"without augmentation" for name, (aug, plain) in pairs.items()) + f". Both SR stages trained "
        f"{cfg['trainer']['max_steps']} steps (the unaugmented one in {trained['seconds']:.0f} s here); the early "
        f"base in {early['seconds']:.0f} s.")
    claim.data = {**{f"{b} / {n} @ {lv:g}": v for (b, n, lv), v in results.items()},
                  **{f"real low-res / {n} @ {lv:g}": v for (n, lv), v in on_real.items()}}
    return claim


# ---- one figure per claim -----------------------------------------------------------------------------------
# matplotlib, a PNG beside the page: the sweeps as lines over their axis (steps, guidance scale), the comparisons
# as bars; accuracy on the left, domain FID on the right, both from the same run as the table, with their 95%
# intervals as error bars.
def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("the claims plots need matplotlib (pip install -e '.[bench]'), or pass --no-plots") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _split(key: str) -> tuple[str, float]:
    """'classifier-free 3' -> ('classifier-free', 3.0); '10 0' -> ('0', 10.0) (ddim: steps then η)."""
    head, _, tail = key.rpartition(" ")
    return head, float(tail)


def _errors(points: list[dict], key: str, scale: float = 1.0) -> list[list[float]] | None:
    """Matplotlib's (below, above) error lengths from each point's 95% interval (None for records without one)."""
    if not all("ci" in m and key in m["ci"] for m in points):
        return None
    return [[scale * (m[key] - m["ci"][key][0]) for m in points], [scale * (m["ci"][key][1] - m[key]) for m in points]]


def _lines(ax_acc, ax_fid, series: dict[str, list[tuple[float, dict]]], acc_key: str, xlabel: str, log: bool):
    for label, points in series.items():
        points = sorted(points, key=lambda p: p[0])
        xs, ms = [x for x, _ in points], [m for _, m in points]
        ax_acc.errorbar(xs, [100 * m[acc_key] for m in ms], yerr=_errors(ms, acc_key, 100), marker="o", capsize=3,
                        label=label)
        ax_fid.errorbar(xs, [m["fid"] for m in ms], yerr=_errors(ms, "fid"), marker="o", capsize=3, label=label)
    for ax in (ax_acc, ax_fid):
        ax.set_xlabel(xlabel)
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)


def _bars(ax_acc, ax_fid, data: dict[str, dict], acc_key: str):
    names = list(data)
    ms = [data[n] for n in names]
    ax_acc.barh(names, [100 * m[acc_key] for m in ms], xerr=_errors(ms, acc_key, 100), capsize=3, color="tab:blue")
    ax_fid.barh(names, [m["fid"] for m in ms], xerr=_errors(ms, "fid"), capsize=3, color="tab:orange")
    ax_fid.set_yticklabels([])
    for ax in (ax_acc, ax_fid):
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")


def plot_claim(claim: Claim, path: Path, page_dir: Path) -> str:
    """Draw the claim's figure into ``path``; returns its path relative to the page's folder."""
    plt = _pyplot()
    data = {k: v for k, v in claim.data.items() if isinstance(v, dict) and "fid" in v}
    acc_key, acc_label = "all", "all-attribute accuracy (%)"
    fig, (ax_acc, ax_fid) = plt.subplots(1, 2, figsize=(10, 3.6))
    if claim.key == "ddim_ddpm":
        series: dict[str, list] = {}
        for key, m in data.items():
            steps, eta = key.split(" ")
            series.setdefault(f"η={float(eta):g}", []).append((float(steps), m))
        _lines(ax_acc, ax_fid, series, acc_key, "sampling steps", log=True)
    elif claim.key in ("cfg", "thresholding", "classifier_vs_cfg"):
        series = {}
        for key, m in data.items():
            if claim.key == "cfg":
                split, scale = key.split(" ")
                name, x = f"{split} combinations", float(scale)
            elif claim.key == "thresholding":
                scale, mode = key.split(" ")
                name, x = mode, float(scale)
            else:
                name, x = _split(key)
            series.setdefault(name, []).append((x, m))
        if claim.key == "classifier_vs_cfg":
            acc_key, acc_label = "shape_color", "shape+colour accuracy (%)"
        _lines(ax_acc, ax_fid, series, acc_key, "guidance scale", log=False)
    else:
        _bars(ax_acc, ax_fid, data, acc_key)
    ax_acc.set_title(acc_label, fontsize=10)
    ax_fid.set_title("domain FID (lower is better)", fontsize=10)
    fig.suptitle(claim.title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(os.path.relpath(path, page_dir)).as_posix()


# ---- the page and the command line --------------------------------------------------------------------------
CLAIMS = {"ddim_ddpm": ddim_ddpm, "cfg": cfg, "thresholding": thresholding, "latent_pixel": latent_pixel,
          "noise_augmentation": noise_augmentation, "unclip_prior": unclip_prior,
          "classifier_vs_cfg": classifier_vs_cfg, "frozen_vs_joint": frozen_vs_joint}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, no GPU"


def markdown(claims: list[dict], prompts: int) -> str:
    lines = ["# The papers' claims, measured in miniature", "",
             ("Written by `benchmarks/claims.py`: every row below was measured by that script, each claim in one "
              f"run (its machine, date and wall time under its table). Shapes dataset, the tiny recipes' exports; "
              f"{prompts} prompts of combinations seen in training, and as many of combinations held out of it where "
              f"a claim says (`t2i.eval.shapes.eval_prompts`), judged by the shapes oracle; every accuracy with its "
              f"95% Wilson interval, every domain FID with a bootstrap interval over the generated images; each "
              f"verdict follows the rule written beside its claim before measuring: agrees, does not agree, or "
              f"inconclusive when a difference it needs is inside the intervals. Domain FID = Fréchet "
              "distance of the tiny CLIP export's L2-normalised image embeddings against 2,000 real validation "
              "images (comparable within one claim only, never with the papers' Inception FIDs: see "
              "[metrics](metrics.md)). Regenerate with `make claims` (`benchmarks/claims.py`) after the three recipes "
              "(`make train-ldm train-imagen train-unclip`)."), "",
             "| claim | verdict |", "|---|---|"]
    lines += [f"| [{c['title']}](#{c['key']}) | {c['verdict'].split(':', 1)[0]} |" for c in claims]
    lines.append("")
    missing = [key for key in CLAIMS if key not in {c["key"] for c in claims}]
    if missing:
        lines += [(f"Not measured on this page yet: {', '.join(f'`{k}`' for k in missing)} (run `benchmarks/claims.py "
                  f"--only {' '.join(missing)} --merge` once the recipes they read have been trained)."), ""]
    for c in claims:
        lines += [f'<a id="{c["key"]}"></a>', "", f"## {c['title']}", "", f"**Paper:** {c['paper']}", "",
                  f"**Paper's figure:** {c['figure']}", "",
                  *([f"**Rule:** {c['rule']}", ""] if c.get("rule") else []),
                  "| " + " | ".join(c["columns"]) + " |", "|" + "---|" * len(c["columns"])]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in c["rows"]]
        lines += ["", f"**Measured:** {c['verdict']}", ""]
        if c.get("baseline"):
            floor = "; ".join(f"{fid:.4f} at {res}px" for res, fid in c["baseline"].items())
            lines += [(f"Real-data floor: {prompts} real training images score domain FID {floor} against the same "
                       "validation images (FID's small-sample bias included): a row near it is as close to the real "
                       f"data as {prompts} samples can show."), ""]
        if c.get("plot"):
            lines += [f"![{c['title']}]({c['plot']})", ""]
        lines += [f"*{c.get('machine', '?')}; {c.get('date', '?')}; {c.get('seconds', 0):.0f} s.*", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm", default="runs/tiny-ldm/export")
    p.add_argument("--base", default="runs/tiny-imagen-base/export")
    p.add_argument("--sr", default="runs/tiny-imagen-sr/export")
    p.add_argument("--classifier", default="runs/tiny-noisy-classifier/export")
    p.add_argument("--glide-base", default="runs/tiny-glide-base/export", help="frozen_vs_joint: the GLIDE base")
    p.add_argument("--prior", default="runs/tiny-prior/export")
    p.add_argument("--decoder", default="runs/tiny-decoder/export")
    p.add_argument("--clip", default="runs/tiny-clip/export")
    p.add_argument("--val", default="data/shapes/val")
    p.add_argument("--train", default="data/shapes/train", help="training shards of the claims that train")
    p.add_argument("--work", default="runs/claims", help="run folders of the claims that train")
    p.add_argument("--minutes", type=float, default=5.0, help="latent_pixel: training wall time of each model")
    p.add_argument("--prompts", type=int, default=300, help="prompts per row (and per split where a claim has two)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cuda: sample and train the training claims on one GPU")
    p.add_argument("--only", nargs="*", choices=sorted(CLAIMS), default=None)
    p.add_argument("--merge", action="store_true", help="keep the claims of an existing --out JSON not run now")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--replot", action="store_true", help="only redraw the plots and the page from the --out JSON "
                   "(e.g. after a GPU run on a machine without matplotlib)")
    p.add_argument("--out", default="docs/claims.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    record_path = out.with_suffix(".json")
    kept = {}
    if args.replot:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        fields = set(Claim.__dataclass_fields__)
        for c in record["claims"]:
            c["plot"] = plot_claim(Claim(**{k: v for k, v in c.items() if k in fields}),
                                   out.parent / "images" / f"claims_{c['key']}.png", out.parent)
        write_page(out, record["claims"], record["prompts"])
        print(f"[claims] redrew {len(record['claims'])} plots and {out}")
        return
    if args.merge and record_path.exists():
        old = json.loads(record_path.read_text(encoding="utf-8"))
        if old.get("prompts") != args.prompts:
            raise SystemExit(f"--merge: {record_path} was measured on {old.get('prompts')} prompts, not "
                             f"{args.prompts}")
        kept = {c["key"]: c for c in old["claims"]}
    torch.manual_seed(args.seed)
    ctx = Context(eval_prompts(args.prompts, "seen"), eval_prompts(args.prompts, "unseen"), args.val, args.train,
                  ClipImageFeatures(args.clip), args.batch_size, args.seed, args.work, args.device)
    paths = {"ldm": args.ldm, "base": args.base, "sr": args.sr, "classifier": args.classifier,
             "prior": args.prior, "decoder": args.decoder, "glide_base": args.glide_base}
    for key in args.only or list(CLAIMS):
        start = time.time()
        claim: Claim = CLAIMS[key](ctx, work=args.work, minutes=args.minutes, **paths)
        claim.seconds = time.time() - start
        claim.baseline = ctx.real_baseline()  # at this claim's resolutions (real statistics are shared)
        record = {**claim.__dict__, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
        if not args.no_plots:
            record["plot"] = plot_claim(claim, out.parent / "images" / f"claims_{key}.png", out.parent)
        kept[key] = record
        print(f"[claims] {key}: {claim.seconds:.0f} s — {claim.verdict}", flush=True)
        write_page(out, [kept[k] for k in CLAIMS if k in kept], args.prompts)  # after each claim: a later
        # claim's failure keeps the ones measured before it
    print(f"[claims] wrote {out} and {record_path}")


def write_page(out: Path, claims: list[dict], prompts: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(claims, prompts) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"prompts": prompts, "claims": claims}, indent=1, default=str)
                                        + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
