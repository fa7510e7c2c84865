"""EMA: the warm-up decay schedule and the update rule."""

from __future__ import annotations

import torch
from torch import nn

from t2i.nn.ema import EMA


def test_warmup_decay_follows_the_formula():
    ema = EMA(nn.Linear(2, 2), decay=0.999, warmup=True)
    seen = []
    for n in range(5):
        seen.append(ema.current_decay())
        ema.update(nn.Linear(2, 2))
    assert seen == [min(0.999, (1 + n) / (10 + n)) for n in range(5)]
    assert EMA(nn.Linear(2, 2), decay=0.9, warmup=False).current_decay() == 0.9


def test_update_is_an_exponential_average():
    model = nn.Linear(3, 1, bias=False)
    ema = EMA(model, decay=0.75, warmup=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.75 * start + 0.25 * torch.ones_like(start))
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert int(ema.num_updates) == 1
