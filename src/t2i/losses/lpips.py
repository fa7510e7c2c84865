"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, with weights from local files only."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import vgg16

from t2i.weights import load_tensor_file

# Indices in torchvision's ``vgg16().features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (3, 8, 15, 22, 29)
_CHANNELS = (64, 128, 256, 512, 512)


def _check_keys(path: str | Path, state: dict, expected: set[str], ignored_prefixes: tuple[str, ...] = ()) -> None:
    missing = sorted(expected - state.keys())
    unexpected = sorted(k for k in state.keys() - expected if not k.startswith(ignored_prefixes))
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match; missing keys: {missing}, "
                         f"unexpected keys: {unexpected}")


def _vgg16_features() -> nn.Sequential:
    """``vgg16(weights=None).features`` up to relu5_3, without allocating the 120M-parameter classifier."""
    with torch.device("meta"):
        features = vgg16(weights=None).features[: _TAPS[-1] + 1]
    features = features.to_empty(device="cpu")
    for module in features:
        if isinstance(module, nn.Conv2d):  # torchvision's VGG init; real weights come from from_files
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return features


class LPIPS(nn.Module):
    """Learned perceptual distance between images in [-1, 1]; returns one distance per image, shape ``[B]``.

    Build with :meth:`from_files`; the plain constructor gives random weights (tests only). The module is
    frozen (``requires_grad=False``) and always stays in eval mode; gradients still flow to the inputs.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self._freeze()

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Ignores ``mode``: LPIPS always stays in eval mode."""
        return super().train(False)

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> LPIPS:
        """Load a torchvision vgg16 state dict (``features.N.*``; ``classifier.*`` ignored) and the ``lpips``
        package's linear-layer file (``linK.model.1.weight``), each ``.pth`` or ``.safetensors``."""
        model = cls()
        vgg_state = load_tensor_file(vgg_path)
        feature_keys = {f"features.{k}" for k in model.features.state_dict()}
        _check_keys(vgg_path, vgg_state, feature_keys, ignored_prefixes=("classifier.",))
        lin_state = load_tensor_file(lin_path)
        _check_keys(lin_path, lin_state, {f"lin{i}.model.1.weight" for i in range(len(_CHANNELS))})
        try:
            model.features.load_state_dict({k[len("features."):]: vgg_state[k] for k in feature_keys})
            for i, lin in enumerate(model.lins):
                lin.load_state_dict({"weight": lin_state[f"lin{i}.model.1.weight"]})
        except RuntimeError as err:  # shape mismatch
            raise ValueError(f"{vgg_path} / {lin_path}: {err}") from err
        model._freeze()
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Distance per image; pass ``normalize=True`` for inputs in [0, 1]."""
        if normalize:
            x, y = 2 * x - 1, 2 * y - 1
        batch = x.shape[0]
        h = (torch.cat([x, y]) - self.shift) / self.scale
        dist = h.new_zeros(batch, dtype=torch.float32)
        taps = iter(zip(_TAPS, self.lins, strict=True))
        tap, lin = next(taps)
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index != tap:
                continue
            f = h.float()
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            diff = (f[:batch] - f[batch:]).pow(2)
            dist = dist + lin(diff.to(lin.weight.dtype)).float().mean(dim=(1, 2, 3))
            tap, lin = next(taps, (None, None))
        return dist
