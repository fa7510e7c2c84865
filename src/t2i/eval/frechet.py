"""The Fréchet distance between two Gaussians fitted to features, and streaming feature statistics.

Pure math, no networks: `t2i.eval.fid` turns images into features (Inception, or a CLIP stage export's
image tower) and hands them here.

- `frechet_distance(mu1, sigma1, mu2, sigma2)`: ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64.
  ``Tr((S1 S2)^(1/2))`` is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
  ``S1^(1/2) S2 S1^(1/2)`` (similar to ``S1 S2``, so the eigenvalues are the same): two symmetric eigen-
  decompositions (``eigh``), no scipy, and no complex eigenvalues of a non-symmetric product (torchmetrics
  takes ``eigvals(S1 @ S2)``; the results agree to float64 rounding on well-conditioned matrices).
- `FeatureStats`: running count, mean and centred scatter (sum of outer products about the mean) in
  float64, updated batch by batch and merged across batches with Chan et al.'s pairwise formula
  (stable where the plain sum of ``x x^T`` minus ``n mu mu^T`` cancels). ``cov`` is the unbiased covariance
  (divided by n - 1, as ``numpy.cov``, pytorch-fid and torchmetrics do).
"""

from __future__ import annotations

import torch


def _sym(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2


def psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below 0 from
    rounding are clipped to 0)."""
    w, v = torch.linalg.eigh(_sym(m))
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``Tr((sigma1 sigma2)^(1/2))`` for symmetric PSD matrices, as ``sum(sqrt(eig(S1^½ S2 S1^½)))``."""
    root = psd_sqrt(sigma1)
    return torch.linalg.eigvalsh(_sym(root @ sigma2 @ root)).clamp(min=0).sqrt().sum()


def _as64(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} holds NaN or Inf")
    return t


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), computed in
    float64 on the CPU; ``mu`` (D,), ``sigma`` (D, D) symmetric PSD (tensors or arrays of any float dtype).

    Mathematically >= 0; a result below 0 from rounding (e.g. a set against itself) is returned as 0.0.
    """
    mu1, mu2 = _as64(mu1, "mu1"), _as64(mu2, "mu2")
    sigma1, sigma2 = _as64(sigma1, "sigma1"), _as64(sigma2, "sigma2")
    d = mu1.shape[-1] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != mu1.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"expected mu (D,) and sigma (D, D) of one D, got mu1 {tuple(mu1.shape)}, sigma1 "
                         f"{tuple(sigma1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}")
    diff = mu1 - mu2
    value = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


class FeatureStats:
    """Running statistics of D-dimensional features, float64 on the CPU: ``n``, ``mean`` (D,) and
    ``scatter`` (D, D) = sum over samples of ``(x - mean)(x - mean)^T``.

    ``update(features)`` adds a (B, D) batch; ``merge(other)`` adds another `FeatureStats` (another batch
    stream): the result does not depend on how the samples were split (up to rounding). Updates replace the
    tensors rather than writing into them, so stats made under ``torch.inference_mode`` stay usable.
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"feature dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.n = 0
        self.mean = torch.zeros(self.dim, dtype=torch.float64)
        self.scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStats:
        """The stats of one (N, D) feature matrix."""
        stats = cls(features.shape[-1])
        stats.update(features)
        return stats

    def update(self, features: torch.Tensor) -> FeatureStats:
        x = torch.as_tensor(features).detach().to(device="cpu", dtype=torch.float64)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features (B, {self.dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        if not torch.isfinite(x).all():
            raise ValueError("features hold NaN or Inf")
        batch = FeatureStats(self.dim)
        batch.n = x.shape[0]
        batch.mean = x.mean(0)
        centred = x - batch.mean
        batch.scatter = centred.T @ centred
        return self.merge(batch)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add `other`'s samples to these stats (Chan et al.'s pairwise update); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-dim stats into {self.dim}-dim stats")
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.scatter = other.n, other.mean.clone(), other.scatter.clone()
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.n / n)
        self.scatter = self.scatter + other.scatter + torch.outer(delta, delta) * (self.n * other.n / n)
        self.n = n
        return self

    @property
    def cov(self) -> torch.Tensor:
        """The unbiased covariance (D, D), ``scatter / (n - 1)``; needs n >= 2."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, these stats hold {self.n}")
        return _sym(self.scatter) / (self.n - 1)

    def distance(self, other: FeatureStats) -> float:
        """`frechet_distance` between the Gaussians fitted to these stats and to `other`'s."""
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, n={self.n})"
