"""Two Fréchet distances between real and generated images. They are NOT the same number:

- **Inception FID** (`InceptionFeatures`, `inception_fid`): the standard FID network (the TF 2015-12-05
  Inception v3 pool features, 2048-d, as ported by pytorch-fid / torch-fidelity), through torchmetrics'
  ``NoTrainInceptionV3`` (which needs the optional ``torch-fidelity`` package: ``pip install 't2i[eval]'``),
  with weights read from a LOCAL file that you give (``pt_inception-2015-12-05-6726825d.pth`` of pytorch-fid
  or ``weights-inception-2015-12-05-6726825d.pth`` of torch-fidelity). Nothing is downloaded. The file is
  read with ``weights_only=True`` (a file holding pickled code is refused) before the network sees it.
  Comparable to published FIDs only in spirit: papers use tens of thousands of samples at 256-512 px of
  ImageNet/COCO, and FID depends on the sample count, the resizing and the data; shapes at 32 px are far
  from what Inception was trained on.
- **Domain FID** (`ClipImageFeatures`, `domain_fid`): the same Fréchet distance over the image embeddings
  of a CLIP stage export that THIS project trained on the dataset (`t2i.stages.clip`), L2-normalised by
  default (the space CLIP's cosine similarities live in; the numbers are then small: a distance of 0.1
  is large). Cheap (no 299 px Inception pass), meaningful for the dataset the CLIP was trained on, and
  comparable ONLY between runs judged by the same export on the same dataset with the same sample count.

Both go through `t2i.eval.frechet` (float64 statistics, ``frechet_distance``). FID is biased by the number
of samples (smaller sets give larger values): compare only at equal counts.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from t2i.conditioning.clip import STAGE as CLIP_STAGE
from t2i.conditioning.clip import ClipImageEncoder
from t2i.eval.frechet import FeatureStats
from t2i.exports import Export, read_export
from t2i.images import to_uint8
from t2i.weights import load_tensor_file

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_DIM = 2048


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) as is; float images in [-1, 1] -> uint8 (rounded, as when saved to PNG)."""
    return images if images.dtype == torch.uint8 else to_uint8(images)


def as_float(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] as is; uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images


# ---- features ---------------------------------------------------------------------------------------------

class InceptionUnavailable(ModuleNotFoundError):
    """Inception FID was asked for without torch-fidelity installed."""


def _require_torch_fidelity(weights: Path) -> None:
    if importlib.util.find_spec("torch_fidelity") is None:
        raise InceptionUnavailable(
            f"Inception FID needs the optional package torch-fidelity (the FID Inception network that torchmetrics "
            f"uses): pip install 't2i[eval]' (or pip install torch-fidelity). Its weights are read from the file "
            f"you gave ({weights}); nothing is downloaded.", name="torch_fidelity")


def load_inception(weights_path: str | Path, antialias: bool = False) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` (2048-d pool features, uint8 input) with the FID Inception weights
    of a local file. ``antialias=False`` resizes to 299 px as TF1 did (torch-fidelity's and the papers'
    reference); ``True`` is torchmetrics' default, a bilinear antialiased resize ("clean" FID)."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path} (give the local FID Inception file, e.g. "
                                f"pytorch-fid's {INCEPTION_FILE}; nothing is downloaded)")
    _require_torch_fidelity(path)
    from torchmetrics.image.fid import NoTrainInceptionV3

    state = load_tensor_file(path)  # weights_only: a file with pickled code is refused here
    buffer = io.BytesIO()  # torch-fidelity unpickles what it is given: give it only the checked tensors
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_DIM)],
                                 feature_extractor_weights_path=buffer, antialias=antialias)
    except RuntimeError as e:
        raise ValueError(f"{path} does not hold the FID Inception v3 weights (pytorch-fid's {INCEPTION_FILE} or "
                         f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth): {e}") from e
    return net.eval()


class InceptionFeatures:
    """Images (uint8, or float in [-1, 1]; any size) -> (B, 2048) Inception pool features (float64).

    ``source`` names the weights file (reported beside the numbers)."""

    dim = INCEPTION_DIM
    kind = "inception"

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu", antialias: bool = False):
        self.net = load_inception(weights_path, antialias).to(device)
        self.source = str(weights_path)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(as_uint8(images).to(self.device)).double().cpu()


class ClipImageFeatures:
    """Images (float in [-1, 1], or uint8; any size) -> (B, D) image embeddings of a CLIP stage export
    (float64), L2-normalised unless ``normalize=False``: the features of the domain FID."""

    kind = "domain"

    def __init__(self, export: str | Path | Export | ClipImageEncoder, device: str | torch.device = "cpu",
                 normalize: bool = True):
        if isinstance(export, ClipImageEncoder):
            self.encoder, self.source = export, "a ClipImageEncoder"
        else:
            export = export if isinstance(export, Export) else read_export(export, CLIP_STAGE)
            self.encoder, self.source = ClipImageEncoder.from_clip_export(export), str(export.path)
        self.encoder.to(device)
        self.normalize = normalize
        self.dim = self.encoder.embed_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(as_float(images), normalize=self.normalize).double().cpu()


Features = Callable[[torch.Tensor], torch.Tensor]


def feature_stats(features: Features, images: torch.Tensor | Iterable[torch.Tensor],
                  batch_size: int = 256) -> FeatureStats:
    """`FeatureStats` of the features of images: one (N, 3, H, W) tensor (run in batches of `batch_size`) or
    an iterable of batches."""
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    stats = FeatureStats(features.dim) if hasattr(features, "dim") else None
    for batch in batches:
        if batch.shape[0] == 0:
            continue
        f = features(batch)
        stats = stats or FeatureStats(f.shape[-1])
        stats.update(f)
    if stats is None or stats.n < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 images per set, got {0 if stats is None else stats.n}")
    return stats


class FrechetMetric:
    """Streaming FID with any feature network: ``update(images, real=...)`` per batch, ``compute()`` at the
    end. Real stats can be kept across resets (``reset(keep_real=True)``), since the real set rarely changes."""

    def __init__(self, features: Features):
        self.features = features
        self.real: FeatureStats | None = None
        self.fake: FeatureStats | None = None

    def update(self, images: torch.Tensor, real: bool) -> None:
        if images.shape[0] == 0:
            return
        f = self.features(images)
        attr = "real" if real else "fake"
        if getattr(self, attr) is None:
            setattr(self, attr, FeatureStats(f.shape[-1]))
        getattr(self, attr).update(f)

    def compute(self) -> float:
        for name, stats in (("real", self.real), ("generated", self.fake)):
            if stats is None or stats.n < 2:
                raise ValueError(f"a Fréchet distance needs at least 2 {name} images, got "
                                 f"{0 if stats is None else stats.n}")
        return self.real.distance(self.fake)

    def reset(self, keep_real: bool = False) -> None:
        self.fake = None
        if not keep_real:
            self.real = None


def domain_fid(real_images: torch.Tensor, generated_images: torch.Tensor,
               clip: str | Path | Export | ClipImageFeatures, batch_size: int = 256, normalize: bool = True) -> float:
    """Domain FID (see the module doc) between two image sets (uint8, or float in [-1, 1]), with the image tower
    of a CLIP stage export (a path, or loaded `ClipImageFeatures`)."""
    features = clip if isinstance(clip, ClipImageFeatures) else ClipImageFeatures(clip, normalize=normalize)
    return feature_stats(features, real_images, batch_size).distance(
        feature_stats(features, generated_images, batch_size))


def inception_fid(real_images: torch.Tensor, generated_images: torch.Tensor,
                  inception: str | Path | InceptionFeatures, batch_size: int = 64) -> float:
    """Inception FID (see the module doc) between two image sets (uint8, or float in [-1, 1]), with the FID
    Inception weights of a local file (or loaded `InceptionFeatures`). Needs torch-fidelity (``t2i[eval]``)."""
    features = inception if isinstance(inception, InceptionFeatures) else InceptionFeatures(inception)
    return feature_stats(features, real_images, batch_size).distance(
        feature_stats(features, generated_images, batch_size))
