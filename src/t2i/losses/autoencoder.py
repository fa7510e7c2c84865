"""Pure loss functions for training the KL autoencoder (no modules, no Lightning)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from t2i.nn.autoencoder import DiagonalGaussian


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, kind: str = "l1",
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L1 (``kind="l1"``) or squared (``"l2"``) error, in float32.

    ``weights`` (broadcastable to ``x``, e.g. ``[B, 1, H, W]`` from :func:`foreground_weights`) turns the
    mean into a weighted mean ``sum(w * err) / sum(w)``.
    """
    diff = x_rec.float() - x.float()
    if kind == "l1":
        err = diff.abs()
    elif kind == "l2":
        err = diff.pow(2)
    else:
        raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
    if weights is None:
        return err.mean()
    w = weights.float().expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)


def _border_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixels on the 1-pixel image border, shape ``[B, C, N]`` (corners counted once)."""
    top, bottom = x[..., 0, :], x[..., -1, :]
    left, right = x[..., 1:-1, 0], x[..., 1:-1, -1]
    return torch.cat([top, bottom, left, right], dim=-1)


@torch.no_grad()
def foreground_weights(x: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """Per-pixel weights ``[B, 1, H, W]``: ``weight`` on foreground pixels, 1 elsewhere.

    The background colour of each image is the per-channel median of its border pixels; a pixel is
    foreground when it differs from that colour by more than ``threshold`` (images in [-1, 1], max over
    channels). Emphasising the foreground keeps small objects from being drowned out in a plain L1.
    """
    if x.ndim != 4:
        raise ValueError(f"expected [B, C, H, W] images, got shape {tuple(x.shape)}")
    xf = x.float()
    background = _border_pixels(xf).median(dim=-1).values[..., None, None]  # [B, C, 1, 1]
    foreground = (xf - background).abs().amax(dim=1, keepdim=True) > threshold
    ones = torch.ones_like(foreground, dtype=torch.float32)
    return torch.where(foreground, ones * float(weight), ones)


def kl_loss(posterior: DiagonalGaussian) -> torch.Tensor:
    """Mean over the batch of the per-sample KL(q(z|x) || N(0, I))."""
    return posterior.kl().mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (autoencoder) adversarial loss: ``-mean(logits_fake)``."""
    return -logits_fake.float().mean()


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """Adaptive GAN weight of Esser et al. (2021): ``||grad nll|| / (||grad g|| + eps)`` at ``last_layer``.

    Gradients are taken with ``retain_graph=True`` so both losses can still be backpropagated; the
    result is clamped to ``[0, max_weight]`` and detached.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
