"""Wrappers around a denoiser: classifier-free guidance, classifier guidance, x̂0 thresholding."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from t2i.diffusion.schedule import extract

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _concat(cond, uncond):
    """Concatenate conditional and unconditional conditioning along the batch dim (cond first)."""
    if cond is None or uncond is None:
        if cond is not None or uncond is not None:
            raise ValueError("cond and uncond must both be None or both be given")
        return None
    if isinstance(cond, torch.Tensor):
        return torch.cat([cond, uncond], dim=0)
    if isinstance(cond, dict):
        if cond.keys() != uncond.keys():
            raise ValueError(f"cond/uncond keys differ: {sorted(cond)} vs {sorted(uncond)}")
        return {k: _concat(cond[k], uncond[k]) for k in cond}
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        fields = {f.name: _concat(getattr(cond, f.name), getattr(uncond, f.name))
                  for f in dataclasses.fields(cond) if f.init}
        return dataclasses.replace(cond, **fields)
    raise TypeError(f"conditioning must be a tensor, a dict/dataclass of tensors or None, got {type(cond)}")


def classifier_free_guidance(model_fn: Callable, scale: float) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) in ONE batched model call.

    Returns ``guided(x_t, t, cond, uncond)`` that calls ``model_fn(cat[x_t, x_t], cat[t, t], cat[cond, uncond])``
    once and combines ``out_u + scale·(out_c - out_u)``. Conditioning may be a tensor, a dict or dataclass
    of tensors (concatenated field by field, recursively) or None. The combination is applied to the
    output in the model's own parameterization; since x̂0 (and ε̂) are affine in the output with
    coefficients that depend only on (x_t, t) and the weights (1 - scale) + scale sum to 1, this equals
    guiding x̂0 (or ε̂) linearly for ε-, x0- and v-prediction alike. ``scale == 1`` skips the
    unconditional half (a single conditional call of batch B).
    """

    def guided(x_t: torch.Tensor, t: torch.Tensor, cond, uncond) -> torch.Tensor:
        if scale == 1:
            return model_fn(x_t, t, cond)
        t2 = torch.cat([t, t]) if t.dim() else t
        out = model_fn(torch.cat([x_t, x_t]), t2, _concat(cond, uncond))
        out_c, out_u = out.chunk(2, dim=0)
        return out_u + scale * (out_c - out_u)

    return guided


def static_threshold(x0: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """Clip x̂0 to the data range ``[lo, hi]`` (Ho et al. 2020 / Saharia et al. 2022, §2.3)."""
    return x0.clamp(lo, hi)


def _row_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q``-quantile with linear interpolation (as ``torch.quantile``/``np.percentile``), via
    ``kthvalue`` so that it has no input-size limit."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile must be in [0, 1], got {q}")
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    pos = q * (rows.shape[1] - 1)
    lo, frac = int(pos), pos - int(pos)
    v_lo = rows.kthvalue(lo + 1, dim=1).values
    if frac == 0:
        return v_lo
    v_hi = rows.kthvalue(lo + 2, dim=1).values
    return v_lo + frac * (v_hi - v_lo)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.95, max_value: float | None = None) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3).

    Per sample ``s = max(1, quantile(|x̂0|, percentile))`` (optionally capped at ``max_value``), then
    ``x̂0 ← clamp(x̂0, -s, s) / s``. Samples already inside [-1, 1] with ``percentile = 1`` are unchanged.
    """
    s = _row_quantile(x0.detach().flatten(1).abs(), percentile).clamp(min=1.0)
    if max_value is not None:
        s = s.clamp(max=max_value)
    s = s.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.minimum(torch.maximum(x0, -s), s) / s


def thresholded(x0_fn: X0Fn, kind: str = "none", percentile: float = 0.95) -> X0Fn:
    """Wrap ``x0_fn`` so its x̂0 is thresholded: "none", "static" ([-1, 1]) or "dynamic" (at ``percentile``)."""
    if kind == "none":
        return x0_fn
    if kind == "static":
        return lambda x_t, t: static_threshold(x0_fn(x_t, t))
    if kind == "dynamic":
        return lambda x_t, t: dynamic_threshold(x0_fn(x_t, t), percentile)
    raise ValueError(f"threshold kind must be 'none', 'static' or 'dynamic', got {kind!r}")


def classifier_guidance(x0_fn: X0Fn, classifier_logp_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        scale: float, alphas_cumprod: torch.Tensor) -> X0Fn:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 / eq. 14) on an x0-denoiser.

    ``ε̂' = ε̂ - sqrt(1-ᾱ_t)·s·∇_{x_t} log p(y|x_t)``, which in x0 terms is
    ``x̂0' = x̂0 + s·(1-ᾱ_t)/sqrt(ᾱ_t)·∇`` (substituting into x̂0 = (x_t - sqrt(1-ᾱ)ε̂)/sqrt(ᾱ)); this form
    needs no round trip through ε̂, so a zero gradient is exactly the identity. Where ᾱ_t = 0 (zero terminal
    SNR) x_t holds no information about y and the shift is taken as 0. ``classifier_logp_grad(x_t, t)``
    returns the gradient (see :func:`logp_grad`); the class label lives in its closure.
    """

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = extract(alphas_cumprod, t, x_t.dim())
        coef = torch.where(ab > 0, (1 - ab) / ab.clamp(min=torch.finfo(ab.dtype).tiny).sqrt(), 0.0)
        grad = classifier_logp_grad(x_t, t)
        return x0_fn(x_t, t) + (scale * coef).to(device=x_t.device, dtype=x_t.dtype) * grad

    return guided


def logp_grad(log_prob_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    """``∇_{x_t} Σ_b log p(y_b | x_t, t)`` by autograd, from ``log_prob_fn(x_t, t) -> [B]`` log-probabilities.

    Gradients are enabled inside, so it works under the samplers' ``torch.no_grad``.
    """

    def grad_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(log_prob_fn(x, t).sum(), x)
        return g

    return grad_fn
