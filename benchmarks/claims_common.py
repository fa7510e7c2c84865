"""What every claim of benchmarks/claims.py shares: the Claim record (the paper's words, its figure, the rule its
verdict follows, our rows and verdict), the measuring Context (prompts of seen and unseen combinations, the shapes
oracle, domain FID against real images, each figure with its 95% interval) and the three-way verdict.

A verdict follows the rule written beside the claim before anything is measured: every comparison the rule needs
is decided only when the two figures' 95% intervals do not overlap. "Agrees" when each goes the paper's way,
"Does not agree" when one goes against it, "Inconclusive" when a needed difference is inside the intervals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from t2i.eval.cascade_report import saturation
from t2i.eval.fid import ClipImageFeatures, feature_stats
from t2i.eval.frechet import FeatureStats
from t2i.eval.intervals import bootstrap, overlap, percent, wilson
from t2i.eval.ldm_report import generate_for, real_images
from t2i.eval.shapes import ATTRIBUTES, compare, judge_all, parse_caption
from t2i.pipelines.sampling import SamplerSettings

AGREES, DISAGREES, INCONCLUSIVE = "Agrees", "Does not agree", "Inconclusive"
FID_RESAMPLES = 200  # bootstrap resamples of the generated images' features per domain FID


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
