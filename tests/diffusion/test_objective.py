"""The diffusion objective part: the loss it gives is `diffusion_loss` of its schedule and settings."""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion import diffusion_loss, make_schedule
from t2i.diffusion.objective import DiffusionObjective


def test_objective_loss_is_the_diffusion_loss_of_its_settings():
    schedule = {"kind": "cosine", "T": 100}
    objective = DiffusionObjective(schedule, "v", "min_snr", 3.0, 0.05)
    assert torch.equal(objective.alphas_cumprod, make_schedule(**schedule))
    assert "alphas_cumprod" not in objective.state_dict()  # rebuilt from the config, never checkpointed
    x0 = torch.randn(4, 3, 8, 8)
    model = lambda x, t: 0.5 * x
    ours, _ = objective.loss(model, x0, generator=torch.Generator().manual_seed(0))
    ref, _ = diffusion_loss(model, x0, make_schedule(**schedule), "v", "min_snr", 3.0, 0.05,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(("kwargs", "match"), [({"prediction": "score"}, "prediction must be one of"),
                                               ({"loss_weighting": "p2"}, "loss_weighting must be one of"),
                                               ({"schedule": {"kind": "linear", "zero_terminal_snr": True},
                                                 "loss_weighting": "truncated_min_snr"}, "infinite weight"),
                                               ({"prediction": "v", "loss_weighting": "truncated_min_snr",
                                                 "min_snr_floor": 0.0}, "floor must be in")])
def test_objective_refuses_unknown_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionObjective(**kwargs)
