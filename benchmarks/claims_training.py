"""The claims whose comparison needs models trained inside the claims run (see benchmarks/claims.py):

- ``latent_pixel``: the tiny LDM's UNet trained for the same wall time on the VAE's latents and on pixels
  (Rombach et al. 2022's efficiency claim);
- ``noise_augmentation``: the tiny Imagen SR stage trained again with noise-conditioning augmentation off, at
  the recipe's settings otherwise, against the recipe's SR stage, on the samples of the recipe's base model and of
  an early one (a tenth of its training) whose samples carry artefacts (Ho et al. 2022, CDM; Saharia et al. 2022).

Each training runs in this process through ``t2i.cli.train`` with the recipe export's own config (data, parents,
model), changed only where the claim says; the runs go under ``--work`` (default ``runs/claims``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from claims_common import Claim, better, cell, three_way
from omegaconf import OmegaConf

from t2i.allowed_targets import check_run_config
from t2i.cli.train import train
from t2i.conditioning.lowres import downsample
from t2i.eval.ldm_report import real_images
from t2i.eval.shapes import score
from t2i.eval.unclip_report import psnr_of_batch
from t2i.pipelines.cascade import CascadePipeline
from t2i.pipelines.ldm import LatentDiffusionPipeline


def export_config(export: str | Path) -> dict:
    """The full resolved training config an export was written with, its ``_target_``s checked against
    `t2i.allowed_targets` (the config is trained again: every node of it is instantiated)."""
    path = Path(export) / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    and with ``changes`` applied (dotted keys, e.g. ``{"model.latents_from": "pixels"}``)."""
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
    if model.get("latents_from") not in ("batch", "image"):
        raise ValueError(f"latent_pixel needs a latent diffusion export, {ldm} is latents_from="
                         f"{model.get('latents_from')!r}")
    res = int(model["image_size"])
    hours, rest = divmod(round(60 * minutes), 3600)
    budget = {"trainer.max_steps": -1, "trainer.max_time": f"00:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"}
    pixel = {"model.latents_from": "pixels", "model.first_stage_export": None, "model.denoiser.in_channels": 3,
             "model.denoiser.out_channels": 3, "parents": {}}
    if model["latents_from"] == "batch":  # precomputed latents: the pixel model reads the images they came from
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
        pipe = LatentDiffusionPipeline.from_export(trained["export"], device=ctx.device)
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
                     f"{' and the one-off latent encoding' if model['latents_from'] == 'batch' else ''} (the "
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
                row = {**ctx.judge(gen, 0.0), "psnr_input": psnr_of_batch(downsample(gen, up.low_res), small)}
                results[(base_name, name, level)] = row
                claim.rows.append([base_name, name, f"{level:g}", cell(row, "all"), cell(row, "fid"),
                                   f"{row['psnr_input']:.1f} dB"])
                if (name, level) not in on_real:  # real low-res inputs: the SR stage alone, once per setting
                    up_real = run(downsample(real, up.low_res), captions)
                    r = score(up_real, captions)
                    on_real[(name, level)] = {"all": r["all"], "ci": {"all": r["ci95"]["all"]},
                                              "psnr_db": psnr_of_batch(up_real, real)}
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
