"""Diffusion math as pure functions over tensors: schedules, parameterizations, loss, samplers, guidance,
thresholding."""

from t2i.diffusion.classifier_free_guidance import classifier_free_guidance
from t2i.diffusion.classifier_guidance import classifier_guidance, logp_grad
from t2i.diffusion.loss import diffusion_loss, loss_weights, offset_noise, sample_timesteps
from t2i.diffusion.parameterization import (
    X0Fn,
    eps_from_x0,
    q_sample,
    to_x0_eps,
    training_target,
    v_target,
    x0_denoiser,
    x0_from_eps,
)
from t2i.diffusion.samplers import (
    alpha_bars,
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    timesteps,
)
from t2i.diffusion.schedule import (
    alphas_cumprod,
    cosine_betas,
    extract,
    linear_betas,
    make_schedule,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    snr,
)
from t2i.diffusion.thresholding import dynamic_threshold, static_threshold, thresholded

__all__ = [
    "X0Fn", "alpha_bars", "alphas_cumprod", "classifier_free_guidance", "classifier_guidance", "cosine_betas", "ddim_invert",
    "ddim_sample", "ddim_step", "ddpm_sample", "ddpm_step", "diffusion_loss", "dynamic_threshold",
    "eps_from_x0", "extract", "linear_betas", "logp_grad", "loss_weights", "make_schedule", "offset_noise",
    "q_sample", "rescale_zero_terminal_snr", "sample_timesteps", "scaled_linear_betas", "snr",
    "static_threshold", "thresholded", "timesteps", "to_x0_eps", "training_target", "v_target",
    "x0_denoiser", "x0_from_eps",
]
