"""Min-SNR-γ weights, timestep/noise sampling, offset noise and the training loss."""

import pytest
import torch

from t2i.diffusion.loss import diffusion_loss, loss_weights, offset_noise, sample_timesteps
from t2i.diffusion.parameterization import q_sample, training_target
from t2i.diffusion.schedule import make_schedule, snr

pytestmark = pytest.mark.usefixtures("single_thread")

AC = make_schedule("linear")


def test_min_snr_weights_closed_form():
    s = torch.tensor([0.01, 0.5, 1.0, 4.9, 5.0, 20.0, 1e4], dtype=torch.float64)
    g = 5.0
    m = torch.minimum(s, torch.tensor(g, dtype=torch.float64))
    assert torch.allclose(loss_weights("min_snr", s, g, "eps"), m / s)
    assert torch.allclose(loss_weights("min_snr", s, g, "x0"), m)
    assert torch.allclose(loss_weights("min_snr", s, g, "v"), m / (s + 1))
    assert torch.equal(loss_weights("uniform", s, g, "v"), torch.ones_like(s))
    # ε weight is 1 below γ; well defined at SNR = 0 (zero terminal SNR)
    zero = torch.zeros(1, dtype=torch.float64)
    assert loss_weights("min_snr", zero, g, "eps").item() == 1.0
    assert loss_weights("min_snr", zero, g, "v").item() == 0.0
    with pytest.raises(ValueError):
        loss_weights("p2", s)


def test_truncated_min_snr_weights_closed_form():
    s = torch.tensor([0.0047, 0.2, 1.0, 3.0, 5.0, 20.0, 1e4], dtype=torch.float64)
    g = 5.0
    w = s.clamp(min=1.0, max=g)  # x0-space clamp(SNR, 1, γ)
    assert torch.allclose(loss_weights("truncated_min_snr", s, g, "x0"), w)
    assert torch.allclose(loss_weights("truncated_min_snr", s, g, "eps"), w / s)
    assert torch.allclose(loss_weights("truncated_min_snr", s, g, "v"), w / (s + 1))
    # the same as Min-SNR-γ from SNR 1 up; below it the noisiest timesteps keep an x0 weight of 1 instead of SNR
    high = s >= 1
    for prediction in ("eps", "x0", "v"):
        assert torch.allclose(loss_weights("truncated_min_snr", s[high], g, prediction),
                              loss_weights("min_snr", s[high], g, prediction))
    v_noisiest = loss_weights("truncated_min_snr", s[:1], g, "v").item()
    assert v_noisiest == pytest.approx(1 / 1.0047) and loss_weights("min_snr", s[:1], g, "v").item() < 0.005
    zero = torch.zeros(1, dtype=torch.float64)
    assert loss_weights("truncated_min_snr", zero, g, "v").item() == 1.0
    with pytest.raises(ValueError, match="infinite weight"):
        loss_weights("truncated_min_snr", zero, g, "eps")
    # another floor: clamp(SNR, floor, γ)
    assert torch.allclose(loss_weights("truncated_min_snr", s, g, "v", floor=0.2), s.clamp(0.2, g) / (s + 1))
    assert loss_weights("truncated_min_snr", zero, g, "v", floor=0.2).item() == pytest.approx(0.2)
    for bad in (0.0, -1.0, 6.0):
        with pytest.raises(ValueError, match="floor must be in"):
            loss_weights("truncated_min_snr", s, g, "v", floor=bad)


def test_diffusion_loss_passes_the_floor_on():
    x0 = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    model = lambda x, t: 0.5 * x
    _, d1 = diffusion_loss(model, x0, AC, "v", "truncated_min_snr", 5.0, snr_floor=1.0,
                           generator=torch.Generator().manual_seed(0))
    _, d2 = diffusion_loss(model, x0, AC, "v", "truncated_min_snr", 5.0, snr_floor=0.2,
                           generator=torch.Generator().manual_seed(0))
    s = snr(AC)[d1["t"]].float()
    assert torch.allclose(d1["weights"], s.clamp(1.0, 5.0) / (s + 1))
    assert torch.allclose(d2["weights"], s.clamp(0.2, 5.0) / (s + 1))


def test_sample_timesteps_reproducible_and_in_range():
    t1 = sample_timesteps(10_000, 1000, torch.Generator().manual_seed(0))
    t2 = sample_timesteps(10_000, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(t1, t2) and t1.dtype == torch.long
    assert t1.min() >= 0 and t1.max() <= 999 and t1.float().mean().item() == pytest.approx(499.5, rel=0.03)


def test_offset_noise_statistics():
    shape = (2000, 3, 8, 8)
    n0 = offset_noise(shape, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(n0, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    n = offset_noise(shape, 0.5, torch.Generator().manual_seed(0))
    # per-pixel variance 1 + 0.25; the spatial mean of each (sample, channel) has variance 1/64 + 0.25
    assert n.var().item() == pytest.approx(1.25, rel=0.02)
    assert n.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 64 + 0.25, rel=0.05)
    assert torch.allclose(n - n0, (n - n0)[..., :1, :1].expand_as(n), atol=1e-6)  # the offset is spatially constant


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_diffusion_loss_matches_manual(prediction):
    x0 = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    seen = {}

    def zero_model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    loss, diag = diffusion_loss(zero_model, x0, AC, prediction, weighting="min_snr", gamma=5.0,
                                generator=torch.Generator().manual_seed(3))
    # replay the draws: t first, then the noise
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(diag["t"], t) and torch.equal(seen["t"], t)
    assert torch.allclose(seen["x_t"], q_sample(x0, t, noise, AC))
    target = training_target(prediction, x0, noise, t, AC)
    w = loss_weights("min_snr", snr(AC)[t], 5.0, prediction).float()
    mse = target.pow(2).flatten(1).mean(1)
    assert torch.allclose(diag["mse"], mse) and torch.allclose(diag["weights"], w)
    assert loss.item() == pytest.approx((w * mse).mean().item(), rel=1e-6)


def test_oracle_model_has_zero_loss_and_gradients_flow():
    x0 = torch.randn(4, 3, 2, 2)
    ac32 = AC.float()

    def oracle(x_t, t):  # knows x0, so it can return the exact v-target
        ab = ac32[t].view(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    loss, _ = diffusion_loss(oracle, x0, AC, "v", generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    w = torch.zeros((), requires_grad=True)
    loss, _ = diffusion_loss(lambda x_t, t: w * x_t, x0, AC, "eps", offset_noise_strength=0.1)
    loss.backward()
    assert w.grad is not None and loss.dim() == 0
