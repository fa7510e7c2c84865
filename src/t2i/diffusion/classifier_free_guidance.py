"""Classifier-free guidance (Ho & Salimans 2022): one batched call on conditional and unconditional inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


def concat_cond(cond, uncond):
    """Conditional and unconditional conditioning concatenated along the batch dim (cond first): tensors,
    dicts or dataclasses of tensors (field by field, recursively), or both None."""
    if cond is None or uncond is None:
        if cond is not None or uncond is not None:
            raise ValueError("cond and uncond must both be None or both be given")
        return None
    if isinstance(cond, torch.Tensor):
        return torch.cat([cond, uncond], dim=0)
    if isinstance(cond, dict):
        if cond.keys() != uncond.keys():
            raise ValueError(f"cond/uncond keys differ: {sorted(cond)} vs {sorted(uncond)}")
        return {k: concat_cond(cond[k], uncond[k]) for k in cond}
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        fields = {f.name: concat_cond(getattr(cond, f.name), getattr(uncond, f.name))
                  for f in dataclasses.fields(cond) if f.init}
        return dataclasses.replace(cond, **fields)
    raise TypeError(f"conditioning must be a tensor, a dict/dataclass of tensors or None, got {type(cond)}")


def classifier_free_guidance(model_fn: Callable, scale: float) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) in ONE batched model call.

    Returns ``guided(x_t, t, cond, uncond)`` that calls ``model_fn(cat[x_t, x_t], cat[t, t], cat[cond, uncond])``
    once and combines ``out_u + scale·(out_c - out_u)``. The combination is applied to the output in the
    model's own parameterization; since x̂0 (and ε̂) are affine in the output with coefficients that depend
    only on (x_t, t) and the weights (1 - scale) + scale sum to 1, this equals guiding x̂0 (or ε̂) linearly
    for ε-, x0- and v-prediction alike. ``scale == 1`` skips the unconditional half (one call of batch B).
    """

    def guided(x_t: torch.Tensor, t: torch.Tensor, cond, uncond) -> torch.Tensor:
        if scale == 1:
            return model_fn(x_t, t, cond)
        t2 = torch.cat([t, t]) if t.dim() else t
        out = model_fn(torch.cat([x_t, x_t]), t2, concat_cond(cond, uncond))
        out_c, out_u = out.chunk(2, dim=0)
        return out_u + scale * (out_c - out_u)

    return guided
