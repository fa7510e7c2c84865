"""PatchGAN discriminator (pix2pix NLayerDiscriminator, as used by taming-transformers and LDM)."""

from __future__ import annotations

import torch
from torch import nn

from t2i.nn.layers import group_norm

_NORMS = ("batch", "group", "none")


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return group_norm(channels, 32, eps=1e-5)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """Fully convolutional discriminator producing one logit per (overlapping) image patch.

    Layers (``main`` Sequential, same indices as taming's ``NLayerDiscriminator``): conv4x4/s2 + LeakyReLU,
    ``n_layers - 1`` x (conv4x4/s2, norm, LeakyReLU), conv4x4/s1, norm, LeakyReLU, conv4x4/s1 -> 1 channel.
    For 256x256 inputs and ``n_layers=3`` the output is 30x30 (70x70 receptive field).
    ``norm="batch"`` matches the reference; use ``"group"`` when batch statistics are unreliable
    (tiny per-device batches) or ``"none"``.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        use_bias = norm != "batch"  # BatchNorm has its own shift
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev_mult, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(base_channels * prev_mult, base_channels * mult, 4, stride=stride, padding=1,
                          bias=use_bias),
                _norm_layer(norm, base_channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN init: conv weights ~ N(0, 0.02); norm weights ~ N(1, 0.02), norm biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
