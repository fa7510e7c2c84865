"""Our noise schedule and parameterization as a diffusers ``DDIMScheduler`` config (``scheduler_config.json``).

diffusers builds its schedule in float32 from a handful of options; :func:`diffusers_alphas_cumprod` replays that
computation exactly (without importing diffusers), so the config can be checked against ours
(:func:`t2i.diffusion.schedule.make_schedule`, float64) before it is written:

- ``kind: linear`` -> ``beta_schedule: linear`` with our ``beta_start``/``beta_end`` (defaults 1e-4 / 0.02);
- ``kind: scaled_linear`` -> ``beta_schedule: scaled_linear`` (defaults 0.00085 / 0.012);
- ``kind: cosine`` -> ``beta_schedule: squaredcos_cap_v2`` when ``s = 0.008`` and ``max_beta = 0.999``
  (diffusers' fixed values), else explicit ``trained_betas``;
- ``zero_terminal_snr: true`` -> ``rescale_betas_zero_snr: true`` (the same Algorithm 1 of Lin et al. 2024).

A named schedule is kept only when diffusers' ᾱ equals ours to `tol` (1e-6: float32 rounding over 1000 steps
gives ~5e-7); otherwise ``trained_betas`` (our β re-derived from our ᾱ) are written.

Parameterization: ``eps`` -> ``epsilon``, ``v`` -> ``v_prediction``, ``x0`` -> ``sample``.
Sampling: ``set_alpha_to_one: true`` (our last DDIM step goes to ᾱ_{-1} := 1), ``clip_sample: false`` and
``thresholding: false`` (ours is unthresholded in latent space), ``steps_offset: 0`` and ``timestep_spacing`` =
our sampler's spacing. diffusers' DDIM steps from ``t`` to ``t - T // N`` whatever the spacing, while ours steps
to the next timestep of its list: the two agree for "leading" (every N) and for "trailing" when N divides T;
:func:`ddim_timestep_mismatch` says where they do not (e.g. "linspace").

diffusers' ``StableDiffusionPipeline.__init__`` rewrites ``steps_offset`` to 1 (a legacy SD 1 fix), shifting
"leading" timesteps by one: set ``pipe.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")``
after constructing it to keep ours.

Nothing here imports diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from t2i.diffusion.samplers import timesteps as t2i_timesteps
from t2i.diffusion.schedule import make_schedule

SCHEDULER_CLASS = "DDIMScheduler"
CONFIG_NAME = "scheduler_config.json"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SPACINGS = ("leading", "trailing", "linspace")
TOLERANCE = 1e-6

# our β functions' defaults (t2i.diffusion.schedule) and the keys each kind takes
_KIND_DEFAULTS: dict[str, dict[str, float]] = {
    "linear": {"beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"s": 0.008, "max_beta": 0.999},
}
_DIFFUSERS_COSINE = {"s": 0.008, "max_beta": 0.999}  # betas_for_alpha_bar's fixed offset and its default cap


def diffusers_version() -> str:
    """The installed diffusers version (configs record it), or a recent one when diffusers is absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.30.0"


def normalize_schedule(schedule_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Our ``model.objective.schedule`` node with make_schedule's defaults filled in: ``{kind, T, zero_terminal_snr, <β
    keys of the kind>}``. Unknown keys raise (make_schedule would)."""
    cfg = dict(schedule_cfg or {})
    kind = cfg.pop("kind", "linear")
    if kind not in _KIND_DEFAULTS:
        raise ValueError(f"schedule kind must be one of {sorted(_KIND_DEFAULTS)}, got {kind!r}")
    T = int(cfg.pop("T", 1000))
    zero = bool(cfg.pop("zero_terminal_snr", False))
    unknown = sorted(set(cfg) - set(_KIND_DEFAULTS[kind]))
    if unknown:
        raise ValueError(f"schedule {kind!r} takes {sorted(_KIND_DEFAULTS[kind])}, not {unknown}")
    return {"kind": kind, "T": T, "zero_terminal_snr": zero,
            **{k: float(cfg.get(k, v)) for k, v in _KIND_DEFAULTS[kind].items()}}


def _diffusers_cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' ``betas_for_alpha_bar(T)`` (python floats, then float32)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def _diffusers_rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``rescale_zero_terminal_snr`` (float32, on β)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def diffusers_alphas_cumprod(config: Mapping[str, Any]) -> torch.Tensor:
    """The ``alphas_cumprod`` that diffusers' DDIMScheduler computes from `config` (float32, as diffusers
    does it, returned as float64 for comparison)."""
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    else:
        schedule = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if schedule == "linear":
            betas = torch.linspace(start, end, T, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = _diffusers_cosine_betas(T)
        else:
            raise ValueError(f"beta_schedule {schedule!r} is not one DDIMScheduler implements")
    if config.get("rescale_betas_zero_snr", False):
        betas = _diffusers_rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0).double()


def betas_from_alphas_cumprod(ac: torch.Tensor) -> list[float]:
    """β_t = 1 - ᾱ_t / ᾱ_{t-1} (ᾱ_{-1} = 1): the ``trained_betas`` that give `ac` back."""
    ac = ac.double()
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    return (1 - ac / prev).clamp(0.0, 1.0).tolist()


@dataclass
class SchedulerExport:
    """A DDIMScheduler config and how it relates to our schedule."""
    config: dict[str, Any]
    exact: bool  # diffusers' ᾱ equals ours to `tol`
    max_abs_error: float  # max |ᾱ_diffusers - ᾱ_ours|
    named: bool  # a named beta_schedule (else trained_betas)
    notes: list[str] = field(default_factory=list)


def scheduler_export(schedule_cfg: Mapping[str, Any] | None, prediction: str, *, spacing: str = "leading",
                     tol: float = TOLERANCE) -> SchedulerExport:
    """The DDIMScheduler config reproducing our `schedule_cfg` (``model.objective.schedule``) and `prediction`
    (eps | v | x0) with our DDIM's timestep `spacing`, checked numerically against make_schedule."""
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {sorted(PREDICTION_TYPES)}, got {prediction!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    s = normalize_schedule(schedule_cfg)
    T, kind = s["T"], s["kind"]
    ours = make_schedule(**s)
    base = {"_class_name": SCHEDULER_CLASS, "_diffusers_version": diffusers_version(), "num_train_timesteps": T,
            "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None,
            "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True, "steps_offset": 0,
            "prediction_type": PREDICTION_TYPES[prediction], "thresholding": False,
            "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "timestep_spacing": spacing,
            "rescale_betas_zero_snr": bool(s["zero_terminal_snr"])}
    notes: list[str] = []
    candidate = None
    if kind in ("linear", "scaled_linear"):
        candidate = {**base, "beta_schedule": kind, "beta_start": s["beta_start"], "beta_end": s["beta_end"]}
    elif all(s[k] == v for k, v in _DIFFUSERS_COSINE.items()):
        candidate = {**base, "beta_schedule": "squaredcos_cap_v2"}
    else:
        notes.append(f"cosine schedule with s={s['s']}, max_beta={s['max_beta']}: diffusers' squaredcos_cap_v2 "
                     f"fixes s=0.008, max_beta=0.999")
    if candidate is not None:
        err = float((diffusers_alphas_cumprod(candidate) - ours).abs().max())
        if err <= tol:
            return SchedulerExport(candidate, True, err, True, notes)
        notes.append(f"beta_schedule={candidate['beta_schedule']!r} gives alphas_cumprod {err:.2e} away from ours")
    trained = {**base, "trained_betas": betas_from_alphas_cumprod(ours), "rescale_betas_zero_snr": False}
    err = float((diffusers_alphas_cumprod(trained) - ours).abs().max())
    notes.append(f"trained_betas written explicitly (alphas_cumprod within {err:.2e} of ours)")
    return SchedulerExport(trained, err <= tol, err, False, notes)


def diffusers_ddim_timesteps(config: Mapping[str, Any], steps: int) -> list[int]:
    """``DDIMScheduler.set_timesteps(steps).timesteps`` for `config` (numpy, as diffusers computes them)."""
    T = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].copy().astype(np.int64)
        ts += int(config.get("steps_offset", 0))
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r}")
    return [int(t) for t in ts]


def ddim_timestep_mismatch(config: Mapping[str, Any], steps: int, spacing: str | None = None) -> str | None:
    """None when diffusers' DDIM with `config` and `steps` visits the same (t, t_prev) pairs as our
    ``ddim_sample(steps=steps, spacing=spacing)`` (spacing: the config's ``timestep_spacing`` by default), else
    what differs. diffusers steps from t to ``t - T // steps`` (ᾱ = 1 below 0 with set_alpha_to_one)."""
    T = int(config.get("num_train_timesteps", 1000))
    spacing = spacing or config.get("timestep_spacing", "leading")
    ours = [int(t) for t in t2i_timesteps(T, steps, spacing)]
    theirs = diffusers_ddim_timesteps(config, steps)
    if ours != theirs:
        return f"{steps} steps: diffusers' timesteps {_brief(theirs)} != ours {_brief(ours)}"
    our_pairs = list(zip(ours, ours[1:] + [-1], strict=True))
    their_pairs = [(t, t - T // steps if t - T // steps >= 0 else -1) for t in theirs]
    if our_pairs != their_pairs:
        bad = next(i for i, (a, b) in enumerate(zip(our_pairs, their_pairs, strict=True)) if a != b)
        return (f"{steps} steps: diffusers steps {their_pairs[bad][0]} -> {their_pairs[bad][1]} (t - T//N), ours "
                f"{our_pairs[bad][0]} -> {our_pairs[bad][1]} (the next timestep)")
    if not config.get("set_alpha_to_one", True):
        return "set_alpha_to_one is false: diffusers' last step goes to alphas_cumprod[0], ours to 1"
    return None


def _brief(ts: list[int]) -> str:
    return str(ts) if len(ts) <= 8 else f"[{', '.join(map(str, ts[:4]))}, ..., {', '.join(map(str, ts[-3:]))}]"
