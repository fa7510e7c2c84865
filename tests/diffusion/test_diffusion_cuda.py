"""Device handling on CUDA: CPU schedule + CPU generator with CUDA data reproduce the CPU results."""

import pytest
import torch

from t2i.diffusion import classifier_free_guidance, classifier_guidance, dynamic_threshold, logp_grad
from t2i.diffusion.loss import diffusion_loss
from t2i.diffusion.parameterization import x0_denoiser
from t2i.diffusion.samplers import ddim_invert, ddim_sample, ddpm_sample
from t2i.diffusion.schedule import make_schedule

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

AC = make_schedule("scaled_linear")


def _x0_fn(x, t):  # a smooth toy denoiser that depends on t
    return torch.tanh(x) * (t.float() / 1000).view(-1, *[1] * (x.dim() - 1)).to(x)


@pytest.mark.parametrize("ac_device", ["cpu", "cuda"])
def test_samplers_cuda_match_cpu(ac_device):
    ac = AC.to(ac_device)
    outs = {}
    for dev in ("cpu", "cuda"):
        a = ddim_sample(_x0_fn, (4, 4, 8, 8), ac, steps=20, eta=0.5, generator=torch.Generator().manual_seed(0),
                        device=dev)
        b = ddpm_sample(_x0_fn, (4, 4, 8, 8), ac, steps=30, generator=torch.Generator().manual_seed(0), device=dev)
        c = ddim_invert(_x0_fn, a, ac, steps=20)
        outs[dev] = (a, b, c)
    for cpu, gpu in zip(outs["cpu"], outs["cuda"], strict=True):
        assert gpu.device.type == "cuda"
        assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)


def test_cuda_generator_and_half_precision():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = ddim_sample(_x0_fn, (2, 4, 16, 16), AC, steps=10, eta=1.0, generator=g, device="cuda", dtype=torch.bfloat16)
    assert x.dtype == torch.bfloat16 and torch.isfinite(x.float()).all()
    y = dynamic_threshold(torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16) * 3)
    assert y.dtype == torch.float16 and y.abs().max().item() <= 1.0


def test_loss_and_guidance_on_cuda():
    x0 = torch.randn(8, 4, 8, 8, device="cuda")
    w = torch.ones((), device="cuda", requires_grad=True)
    cpu_loss, _ = diffusion_loss(lambda x, t: 0.5 * x, x0.cpu(), AC, "v", weighting="min_snr",
                                 offset_noise_strength=0.1, generator=torch.Generator().manual_seed(1))
    loss, diag = diffusion_loss(lambda x, t: 0.5 * w * x, x0, AC, "v", weighting="min_snr",
                                offset_noise_strength=0.1, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert diag["t"].device.type == "cuda" and w.grad is not None
    assert loss.item() == pytest.approx(cpu_loss.item(), rel=1e-5)

    model = lambda x, t, cond: x * 0.1 + cond["emb"]
    cfg = classifier_free_guidance(model, 5.0)
    cond = {"emb": torch.ones(2, 4, 8, 8, device="cuda")}
    uncond = {"emb": torch.zeros(2, 4, 8, 8, device="cuda")}
    x0_fn = x0_denoiser(lambda x, t: cfg(x, t, cond, uncond), "v", AC)
    x0_fn = classifier_guidance(x0_fn, logp_grad(lambda x, t: -(x**2).flatten(1).sum(1)), 0.1, AC)
    out = ddim_sample(x0_fn, (2, 4, 8, 8), AC, steps=10, generator=torch.Generator().manual_seed(2), device="cuda")
    assert out.device.type == "cuda" and torch.isfinite(out).all()
