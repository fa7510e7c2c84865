"""What every claim of benchmarks/claims.py shares: the Claim record (the paper's words, its figure, our rows and
verdict) and the measuring Context (held-out prompts, the shapes oracle, domain FID against real images)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from t2i.eval.cascade_report import saturation
from t2i.eval.fid import ClipImageFeatures, feature_stats
from t2i.eval.ldm_report import generate_for, real_images
from t2i.eval.shapes import compare, judge_all, parse_caption
from t2i.pipelines.sampling import SamplerSettings


@dataclass
class Claim:
    key: str
    title: str
    paper: str  # what the paper claims
    figure: str  # the paper's figure / table and its numbers
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    verdict: str = ""
    data: dict = field(default_factory=dict)  # the measured numbers behind the rows (for plots and the JSON)
    baseline: dict = field(default_factory=dict)  # resolution -> domain FID of as many REAL images (see Context)
    seconds: float = 0.0  # wall time of the whole claim, training included


@dataclass
class Context:
    prompts: list[str]
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

    def fid(self, images: torch.Tensor) -> float:
        res = images.shape[-1]
        if res not in self.real_stats:
            real, _ = real_images(self.val, res, 2000)
            self.real_stats[res] = feature_stats(self.clip, real, 256)
        self.judged.add(res)
        return self.real_stats[res].distance(feature_stats(self.clip, images, 256))

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

    def judge(self, images: torch.Tensor, seconds: float) -> dict:
        images = images.float().cpu()
        verdicts = judge_all(images)
        specs = [parse_caption(p) for p in self.prompts]
        s = compare(verdicts, specs)
        shape_color = sum(v.get("shape") == sp.shape and v.get("color") == sp.color
                          for v, sp in zip(verdicts, specs)) / len(specs)
        return {"all": s["all"], "shape": s["shape"], "color": s["color"], "shape_color": shape_color,
                "fid": self.fid(images), "seconds": seconds, "saturation": saturation(images)}

    def measure(self, pipe, settings: SamplerSettings) -> dict:
        start = time.time()
        images = generate_for(pipe, self.prompts, settings, self.batch_size, self.seed)
        if images.is_cuda:
            torch.cuda.synchronize()
        return self.judge(images, time.time() - start)
