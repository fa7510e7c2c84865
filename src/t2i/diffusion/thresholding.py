"""Thresholding of the predicted clean sample x̂0: static clipping and Imagen's dynamic thresholding."""

from __future__ import annotations

import torch

from t2i.diffusion.parameterization import X0Fn


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
