import pytest
import torch

from t2i.losses.autoencoder import (
    adaptive_weight,
    foreground_weights,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    reconstruction_loss,
)
from t2i.nn.autoencoder import DiagonalGaussian


def test_reconstruction_loss_plain_and_weighted():
    x = torch.zeros(1, 1, 2, 2)
    x_rec = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]]]])
    assert reconstruction_loss(x, x_rec, "l1").item() == pytest.approx(1.5)
    assert reconstruction_loss(x, x_rec, "l2").item() == pytest.approx(3.5)
    w = torch.tensor([[[[3.0, 1.0], [1.0, 1.0]]]])
    assert reconstruction_loss(x, x_rec, "l1", w).item() == pytest.approx((3 + 2 + 0 + 3) / 6)
    # per-pixel weights broadcast over channels
    x3, r3 = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    assert reconstruction_loss(x3, r3, "l1", torch.rand(2, 1, 2, 2) + 0.1).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        reconstruction_loss(x, x_rec, "huber")


def test_foreground_weights_marks_square_exactly():
    x = torch.empty(2, 3, 16, 16)
    x[0] = torch.tensor([0.9, 0.9, 0.9]).view(3, 1, 1)  # white-ish background
    x[1] = torch.tensor([-1.0, 0.2, -0.4]).view(3, 1, 1)
    x[0, :, 4:7, 9:12] = torch.tensor([0.9, 0.5, 0.9]).view(3, 1, 1)  # differs in one channel only
    x[1, :, 10:14, 2:5] = 0.0
    x[1, :, 0, 0] = 1.0  # a single odd border pixel does not move the median
    w = foreground_weights(x, weight=5.0)
    expected = torch.ones(2, 1, 16, 16)
    expected[0, :, 4:7, 9:12] = 5.0
    expected[1, :, 10:14, 2:5] = 5.0
    expected[1, :, 0, 0] = 5.0
    assert w.shape == (2, 1, 16, 16)
    assert torch.equal(w, expected)
    # below threshold -> background
    x[0, :, 4:7, 9:12] = 0.85
    assert foreground_weights(x, 5.0, threshold=0.1)[0].eq(1.0).all()


def test_kl_loss_matches_closed_form():
    mean, logvar = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    expected = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3)).mean()
    assert kl_loss(post).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_loss(DiagonalGaussian(torch.zeros(2, 8, 2, 2))).item() == 0.0


def test_hinge_and_generator_losses():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0
    assert generator_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_weight_analytic_ratio():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 4)
    y = layer(x)
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    nll = (a * y).sum()  # d/dW = a^T x
    g = (b * y).sum()
    expected = (a.T @ x).norm() / ((b.T @ x).norm() + 1e-4)
    w = adaptive_weight(nll, g, layer.weight)
    assert w.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not w.requires_grad
    (nll + w * g).backward()  # graph retained
    assert adaptive_weight((a * layer(x)).sum(), 0.0 * layer(x).sum(), layer.weight, max_weight=7.0).item() == 7.0
