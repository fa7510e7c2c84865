"""Classifier-free guidance: one batched call, on tensors, dicts and dataclasses, in any parameterization."""

from dataclasses import dataclass

import pytest
import torch

from t2i.diffusion.classifier_free_guidance import classifier_free_guidance
from t2i.diffusion.parameterization import to_x0_eps
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
