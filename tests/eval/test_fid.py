"""Fréchet distance math (analytic Gaussians, torchmetrics' own FID), streaming feature statistics, the domain FID
with a CLIP stage export (sanity on the shapes validation set) and the Inception FID plumbing (local weights only)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from t2i.eval.fid import (
    ClipImageFeatures,
    FrechetMetric,
    InceptionUnavailable,
    domain_fid,
    feature_stats,
    load_inception,
)
from t2i.eval.frechet import FeatureStats, frechet_distance, psd_sqrt

F64 = torch.float64


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


def _spd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a @ a.T / d


# ---- the formula --------------------------------------------------------------------------------------------

def test_frechet_distance_of_gaussians_with_commuting_covariances_is_analytic():
    """Sigma1 = R diag(a) R^T, Sigma2 = R diag(b) R^T: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    d = 6
    rot = _rotation(d, 0)
    a = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1, 4.0], dtype=F64)
    b = torch.tensor([1.5, 0.2, 2.0, 1.0, 0.9, 0.0], dtype=F64)  # a zero variance: a singular covariance
    mu1, mu2 = torch.arange(d, dtype=F64), torch.arange(d, dtype=F64).flip(0) * 0.5
    s1, s2 = rot @ torch.diag(a) @ rot.T, rot @ torch.diag(b) @ rot.T
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    # sqrt of an eigenvalue that rounding left at ~1e-16 instead of 0: ~1e-8 off, inherent to any method
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-6)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, abs=1e-6)  # symmetric
    b[-1] = 0.3  # non-singular: float64 precision
    s2 = rot @ torch.diag(b) @ rot.T
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-11)


def test_frechet_distance_in_one_dimension_and_of_a_gaussian_with_itself():
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)
    s = _spd(32, 1)
    assert abs(frechet_distance(torch.zeros(32), s, torch.zeros(32), s)) < 1e-9
    assert frechet_distance(torch.zeros(3), torch.eye(3), torch.ones(3), torch.eye(3)) == pytest.approx(3.0)


def test_frechet_distance_matches_torchmetrics_compute_fid_on_non_commuting_covariances():
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    compute_fid = getattr(fid_module, "_compute_fid", None)
    if compute_fid is None:
        pytest.skip("this torchmetrics has no _compute_fid")
    for seed, d in ((0, 8), (1, 64)):
        s1, s2 = _spd(d, seed) + 0.01 * torch.eye(d, dtype=F64), _spd(d, seed + 100)
        mu1 = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=F64)
        ours = frechet_distance(mu1, s1, torch.zeros(d), s2)
        assert ours == pytest.approx(float(compute_fid(mu1, s1, torch.zeros(d, dtype=F64), s2)), rel=1e-8)


class _Identity(nn.Module):
    """A "feature network" returning its input: torchmetrics' FID over given features."""

    def __init__(self, num_features: int = 24):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_streaming_stats_and_distance_match_torchmetrics_frechet_inception_distance_on_random_features():
    from torchmetrics.image.fid import FrechetInceptionDistance
    g = torch.Generator().manual_seed(3)
    real = torch.randn(500, 24, generator=g, dtype=F64) @ torch.randn(24, 24, generator=g, dtype=F64)
    fake = torch.randn(300, 24, generator=g, dtype=F64) * 1.3 + 0.2
    metric = FrechetInceptionDistance(feature=_Identity())
    ours = FrechetMetric(lambda x: x)
    for chunk in real.split(64):
        metric.update(chunk, real=True)
        ours.update(chunk, real=True)
    for chunk in fake.split(50):
        metric.update(chunk, real=False)
        ours.update(chunk, real=False)
    assert ours.compute() == pytest.approx(float(metric.compute()), rel=1e-6)


def test_psd_sqrt_squares_back_and_clips_rounding_negatives():
    s = _spd(10, 4, rank=3)  # singular: eigenvalues at 0 (slightly negative after rounding)
    r = psd_sqrt(s)
    torch.testing.assert_close(r @ r, s, atol=1e-10, rtol=0)
    assert torch.isfinite(r).all()


def test_frechet_distance_refuses_bad_shapes_and_nonfinite_values():
    with pytest.raises(ValueError, match="of one D"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.tensor([float("nan")]), torch.eye(1), torch.zeros(1), torch.eye(1))


# ---- streaming statistics ---------------------------------------------------------------------------------------

def test_feature_stats_do_not_depend_on_how_samples_are_split_or_merged():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1000, 8, generator=g, dtype=F64) * 3 + 1e4  # a large mean: the naive formula would cancel
    whole = FeatureStats.of(x)
    torch.testing.assert_close(whole.mean, x.mean(0), atol=1e-9, rtol=0)
    torch.testing.assert_close(whole.cov, torch.cov(x.T), atol=1e-9, rtol=1e-10)
    streamed = feature_stats(lambda batch: batch, x.split(77))
    parts = [FeatureStats.of(part) for part in (x[:10], x[10:600], x[600:])]
    merged = FeatureStats(8)
    for part in reversed(parts):  # any order
        merged.merge(part)
    for other in (streamed, merged):
        assert other.n == 1000
        torch.testing.assert_close(other.mean, whole.mean, atol=1e-9, rtol=0)
        torch.testing.assert_close(other.cov, whole.cov, atol=1e-8, rtol=1e-10)
    assert whole.distance(merged) < 1e-9


def test_feature_stats_converge_to_the_analytic_distance_of_the_sampled_gaussians():
    d, n = 4, 40_000
    g = torch.Generator().manual_seed(6)
    s1, s2 = _spd(d, 7) + 0.5 * torch.eye(d, dtype=F64), _spd(d, 8) + 0.2 * torch.eye(d, dtype=F64)
    mu1, mu2 = torch.zeros(d, dtype=F64), torch.full((d,), 0.5, dtype=F64)
    x1 = mu1 + torch.randn(n, d, generator=g, dtype=F64) @ torch.linalg.cholesky(s1).T
    x2 = mu2 + torch.randn(n, d, generator=g, dtype=F64) @ torch.linalg.cholesky(s2).T
    exact = frechet_distance(mu1, s1, mu2, s2)
    assert FeatureStats.of(x1).distance(FeatureStats.of(x2)) == pytest.approx(exact, rel=0.05)


def test_feature_stats_errors():
    s = FeatureStats(3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = s.cov
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        s.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        s.update(torch.tensor([[0.0, float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="merge"):
        s.merge(FeatureStats(2))
    with pytest.raises(ValueError, match="at least 2"):
        FrechetMetric(lambda x: x).compute()


# ---- domain FID: a CLIP stage export's image tower ----------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_val(small_shapes):
    from t2i.eval.ldm_report import real_images
    images, _ = real_images(f"{small_shapes}/val/manifest.json", 32, 128)
    return images  # uint8 (128, 3, 32, 32)


def test_domain_fid_sanity_on_shapes_self_halves_noise(shapes_val, tiny_clip_export, single_thread):
    """The same set: ~0; two disjoint halves of the validation set: small; noise against a half: large."""
    features = ClipImageFeatures(tiny_clip_export)
    assert features.dim == 32
    real = feature_stats(features, shapes_val, batch_size=64)
    self_fid = real.distance(feature_stats(features, shapes_val.flip(0), batch_size=50))  # other order and batches
    halves = domain_fid(shapes_val[:64], shapes_val[64:], features)
    noise = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise_fid = domain_fid(shapes_val[:64], noise, features)
    print(f"\ndomain FID (tiny CLIP export, 128 shapes val images): self {self_fid:.3g}, halves {halves:.4g}, "
          f"noise {noise_fid:.4g}")
    assert abs(self_fid) < 1e-6
    assert 0 < halves < noise_fid / 3
    assert math.isfinite(noise_fid)
    # features: unit-norm embeddings of the export; float and uint8 inputs agree
    f = features(shapes_val[:4])
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(4, dtype=F64), atol=1e-6, rtol=0)
    torch.testing.assert_close(features(shapes_val[:4].float() / 127.5 - 1), f)


# ---- Inception FID: local weights only --------------------------------------------------------------------------

def test_inception_fid_needs_a_local_weights_file_and_names_the_extra(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_inception(tmp_path / "missing.pth")
    weights = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_fidelity" else real_find_spec(name, *a))
    with pytest.raises(InceptionUnavailable, match=r"t2i\[eval\].*w\.pth"):
        load_inception(weights)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """FID-Inception-shaped weights (pytorch-fid's layout: torchvision's Inception3, 1008 classes, no aux
    logits), randomly initialised, batch-norm statistics set on noise so that the features are O(1)."""
    pytest.importorskip("torch_fidelity")
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 299, 299) * 2 - 1)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_fid_with_local_weights_matches_torchmetrics(random_inception_weights, single_thread):
    """Our features are torchmetrics' FrechetInceptionDistance's (same file, TF1 resize); the distance is its."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from t2i.eval.fid import InceptionFeatures
    features = InceptionFeatures(random_inception_weights)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8) // 4
    fa, fb = features(a), features(b)
    assert fa.shape == (3, 2048) and torch.isfinite(fa).all()
    reference = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(random_inception_weights),
                                         antialias=False)
    torch.testing.assert_close(reference.inception(a).double(), fa, rtol=1e-5, atol=1e-4)
    metric = FrechetInceptionDistance(feature=_Identity(2048))  # torchmetrics' own statistics and formula
    metric.update(fa, real=True)
    metric.update(fb, real=False)
    fid = FeatureStats.of(fa).distance(FeatureStats.of(fb))  # (2048-d eigendecompositions: seconds on a CPU)
    assert fid > 0 and fid == pytest.approx(float(metric.compute()), rel=1e-4)
    torch.testing.assert_close(features(a[:1].float() / 127.5 - 1), fa[:1])  # [-1, 1] floats quantised like PNGs


def test_inception_weights_holding_pickled_code_are_refused(tmp_path):
    pytest.importorskip("torch_fidelity")
    bad = tmp_path / "bad.pth"
    torch.save({"weights": torch.zeros(1), "payload": _Identity}, bad)  # a class: not loadable with weights_only
    with pytest.raises(ValueError, match="refusing to load"):
        load_inception(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="FID Inception v3 weights"):
        load_inception(wrong)
