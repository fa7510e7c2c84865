"""Classifier-free guidance (one batched call), thresholding, classifier guidance."""

from dataclasses import dataclass

import pytest
import torch

from t2i.diffusion.guidance import (
    classifier_free_guidance,
    classifier_guidance,
    dynamic_threshold,
    logp_grad,
    static_threshold,
    thresholded,
)
from t2i.diffusion.parameterization import eps_from_x0, to_x0_eps
from t2i.diffusion.samplers import ddim_sample
from t2i.diffusion.schedule import make_schedule

pytestmark = pytest.mark.usefixtures("single_thread")

AC = make_schedule("scaled_linear")


class CountingModel:
    """A toy conditional model: output depends on x_t, t and every conditioning tensor."""

    def __init__(self):
        self.calls, self.batches = 0, []

    def __call__(self, x, t, cond):
        self.calls += 1
        self.batches.append(x.shape[0])
        out = 0.5 * x + 1e-3 * t.view(-1, 1).float()
        if isinstance(cond, dict):
            out = out + cond["emb"] + cond["pooled"].sum(-1, keepdim=True)
        elif cond is not None:
            out = out + cond
        return out


@dataclass
class Cond:
    emb: torch.Tensor
    pooled: torch.Tensor


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g)
    t = torch.tensor([10, 500, 900])
    return x, t, torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)


def test_cfg_scale_one_is_conditional_model_in_one_call():
    x, t, c, u = _inputs()
    model = CountingModel()
    out = classifier_free_guidance(model, 1.0)(x, t, c, u)
    assert torch.equal(out, CountingModel()(x, t, c)) and model.calls == 1


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_cfg_batches_cond_and_uncond_into_one_call(scale):
    x, t, c, u = _inputs()
    model = CountingModel()
    out = classifier_free_guidance(model, scale)(x, t, c, u)
    assert model.calls == 1 and model.batches == [6]
    ref = CountingModel()
    out_c, out_u = ref(x, t, c), ref(x, t, u)
    assert torch.allclose(out, out_u + scale * (out_c - out_u), atol=1e-5)


def test_cfg_dict_dataclass_and_none_conditioning():
    x, t, c, u = _inputs()
    cd = {"emb": c, "pooled": torch.ones(3, 2)}
    ud = {"emb": u, "pooled": torch.zeros(3, 2)}
    model = CountingModel()
    out = classifier_free_guidance(model, 2.0)(x, t, cd, ud)
    ref = CountingModel()
    out_c, out_u = ref(x, t, cd), ref(x, t, ud)
    assert model.calls == 1 and torch.allclose(out, out_u + 2.0 * (out_c - out_u), atol=1e-5)

    seen = []
    guided = classifier_free_guidance(lambda x, t, cond: seen.append(cond) or x, 2.0)
    guided(x, t, Cond(c, torch.ones(3, 2)), Cond(u, torch.zeros(3, 2)))
    assert isinstance(seen[0], Cond) and torch.equal(seen[0].emb, torch.cat([c, u]))
    guided(x, t, None, None)
    assert seen[1] is None
    with pytest.raises(ValueError):
        guided(x, t, c, None)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_cfg_on_output_equals_linear_guidance_of_x0(kind):
    x, t, c, u = _inputs()
    x, c, u = x.double(), c.double(), u.double()
    model = lambda x, t, cond: torch.tanh(x) * 0.3 + cond
    scale = 4.0
    guided_out = classifier_free_guidance(model, scale)(x, t, c, u)
    x0_g, eps_g = to_x0_eps(kind, guided_out, x, t, AC)
    x0_c, eps_c = to_x0_eps(kind, model(x, t, c), x, t, AC)
    x0_u, eps_u = to_x0_eps(kind, model(x, t, u), x, t, AC)
    assert torch.allclose(x0_g, x0_u + scale * (x0_c - x0_u), atol=1e-10)
    assert torch.allclose(eps_g, eps_u + scale * (eps_c - eps_u), atol=1e-10)


def test_static_threshold():
    x = torch.tensor([[-3.0, -0.5, 0.2, 1.5]])
    assert torch.equal(static_threshold(x), torch.tensor([[-1.0, -0.5, 0.2, 1.0]]))


def test_dynamic_threshold():
    g = torch.Generator().manual_seed(1)
    inside = torch.rand(4, 3, 8, 8, generator=g) * 1.98 - 0.99
    assert torch.equal(dynamic_threshold(inside, percentile=1.0), inside)
    assert torch.equal(dynamic_threshold(inside, percentile=0.995), inside)  # s = max(1, q) = 1
    outliers = torch.randn(4, 3, 8, 8, generator=g) * 3
    out = dynamic_threshold(outliers, percentile=1.0)
    assert out.abs().max() <= 1.0 + 1e-6
    s = outliers.flatten(1).abs().max(1).values.view(4, 1, 1, 1)
    assert torch.allclose(out, outliers / s)  # p = 1: rescaled by the per-sample max
    out = dynamic_threshold(outliers, percentile=0.9)
    q = torch.quantile(outliers.flatten(1).abs(), 0.9, dim=1).view(4, 1, 1, 1)
    assert torch.allclose(out, outliers.clamp(-q, q) / q)
    assert out.abs().amax(dim=(1, 2, 3)).allclose(torch.ones(4))
    # samples are thresholded independently
    mixed = torch.cat([inside[:1], outliers[:1]])
    res = dynamic_threshold(mixed, 1.0)
    assert torch.equal(res[0], inside[0]) and res[1].abs().max() <= 1.0 + 1e-6


def test_thresholded_wrapper():
    x0 = torch.full((2, 3), 4.0)
    fn = lambda x, t: x0
    assert thresholded(fn, "none") is fn
    assert torch.equal(thresholded(fn, "static")(x0, None), torch.ones(2, 3))
    assert torch.equal(thresholded(fn, "dynamic", 0.995)(x0, None), torch.ones(2, 3))
    with pytest.raises(ValueError):
        thresholded(fn, "soft")


def test_classifier_guidance_zero_grad_is_identity_and_matches_eps_formula():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    x0_fn = lambda x, t: torch.tanh(x)
    same = classifier_guidance(x0_fn, lambda x, t: torch.zeros_like(x), 10.0, AC)
    assert torch.equal(same(x, t), x0_fn(x, t))

    grad = torch.randn(3, 4, generator=g, dtype=torch.float64)
    scale = 2.5
    guided = classifier_guidance(x0_fn, lambda x, t: grad, scale, AC)(x, t)
    eps = eps_from_x0(x, x0_fn(x, t), t, AC)
    expected_eps = eps - (1 - AC[t]).sqrt()[:, None] * scale * grad  # Dhariwal & Nichol, eq. 14
    assert torch.allclose(eps_from_x0(x, guided, t, AC), expected_eps, atol=1e-9)


def test_classifier_guidance_with_autograd_under_no_grad_sampler():
    target = torch.tensor([1.0, -1.0])
    log_prob = lambda x, t: -((x - target) ** 2).sum(-1)
    grad_fn = logp_grad(log_prob)
    x = torch.zeros(2, 2)
    assert torch.allclose(grad_fn(x, None), 2 * target.expand(2, 2))
    ac = make_schedule("linear", zero_terminal_snr=True)  # ᾱ = 0 at t=999: no shift there
    x0_fn = classifier_guidance(lambda x, t: torch.zeros_like(x), grad_fn, 1.0, ac)
    out = ddim_sample(x0_fn, (64, 2), ac, steps=20, spacing="trailing", generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(out).all()
    assert (out.mean(0) * target > 0).all()  # pulled towards the class
