"""Save and restore every random-number state (python, numpy, torch CPU and CUDA) in checkpoints, per
rank, so that a resumed run draws the same noise, timesteps and dropout as an uninterrupted one."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
import torch.distributed as dist


def _capture() -> dict:
    """Plain types and tensors only, so checkpoints load with ``weights_only=True``."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": (version, torch.tensor(py_state, dtype=torch.int64), gauss),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in py_state.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s training draws: derived from (seed, rank), and never `seed` itself. Reseeding
    with `seed` would replay the random stream that initialised the weights: the first noise, timesteps and
    dropout masks would equal the init draws, correlated with the very weights they train (enough to cost the
    tiny LDM its position attribute)."""
    return int(np.random.SeedSequence([int(seed), int(rank), 0x7472_6169]).generate_state(1)[0])


class RngStateCallback(L.Callback):
    """Checkpoints hold a list of states, one per rank (gathered when distributed).

    When training starts every rank is reseeded with `training_seed` (seed, rank), so that ranks draw different noise,
    timesteps and dropout masks (one seed on every rank would correlate them), and so that the draws do not
    depend on how much randomness the strategy's setup consumed (DeepSpeed's does): a run gives the same
    result under every strategy. A resume instead restores each rank's own saved state.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def state_dict(self) -> dict:
        state = _capture()
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        return {"per_rank": states}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict["per_rank"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states = getattr(self, "_pending", None)
        if states is None:
            L.seed_everything(training_seed(self.seed, trainer.global_rank), workers=True, verbose=False)
            return
        rank = trainer.global_rank
        self._pending = None
        if len(states) != trainer.world_size:  # an elastic resume: no rank's saved stream is its own any more
            seed = int(np.random.SeedSequence([int(self.seed), int(rank), int(trainer.global_step), 0x656C])
                       .generate_state(1)[0])
            L.seed_everything(seed, workers=True, verbose=False)
            if trainer.is_global_zero:
                print(f"[t2i] checkpoint holds random states for {len(states)} ranks, this run has "
                      f"{trainer.world_size}: each rank draws from a fresh seed of (seed, rank, step "
                      f"{trainer.global_step}); the run continues, but not bitwise as it would have", flush=True)
            return
        _restore(states[rank])
