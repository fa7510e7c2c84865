"""Exact resume after hard crashes: a CPU training run of the tiny LDM (EMA, warm-up LR schedule, caption dropout)
is SIGKILLed at random points, and once in the middle of writing a checkpoint, resumed each time with
``ckpt_path=last``, and ends bit for bit where an uninterrupted run of the same length ends: weights, EMA,
optimizer, LR schedule, random states and data position."""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from t2i_testing import (
    TrainProcess,
    assert_same_training_state,
    load_checkpoint,
    tiny_ldm_overrides,
)

from t2i.checkpoint_files import checkpoint_problem
from t2i.cli.config import compose_config
from t2i.cli.train import train

STEPS = 30
# a checkpoint every step, so kills land before, during and after saves; fp32 for bitwise-reproducible CPU runs
COMMON = ("callbacks.checkpoint.every_n_train_steps=1", "final_validation=false", "export=false",
          "trainer.precision=32-true")


def _overrides(shapes, vae_export, run, *extra):
    return tiny_ldm_overrides(shapes, vae_export, run, f"trainer.max_steps={STEPS}", *COMMON, *extra)


def _train_in_process(overrides):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run (OMP_NUM_THREADS=1)
    try:
        return train(compose_config(overrides))
    finally:
        torch.set_num_threads(threads)


@dataclass
class Crashed:
    resumed: dict  # last.ckpt of the run killed and resumed
    reference: dict  # last.ckpt of an uninterrupted run
    saved_steps: list[int]  # last.ckpt's step after each kill
    killed_while_saving: int  # kills that left a partial last.ckpt.tmp


def _kill_during_a_save(proc: TrainProcess, tmp: Path, timeout: float = 120.0) -> None:
    """SIGKILL `proc` as soon as a checkpoint write has begun (its ``.tmp`` file exists)."""
    deadline = time.monotonic() + timeout
    while not tmp.exists():
        assert proc.proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
    proc.proc.send_signal(signal.SIGKILL)


@pytest.fixture(scope="module")
def crashed(small_shapes, tiny_vae_export, tmp_path_factory) -> Crashed:
    """Three kills at random moments, the second made while a checkpoint is being written (about 30 s on one
    core: two tests share it)."""
    kills, shapes, vae_export = 3, small_shapes, tiny_vae_export
    tmp_path = tmp_path_factory.mktemp("crash")
    rng = random.Random(0)
    run = tmp_path / "crashed"
    last = run / "checkpoints" / "last.ckpt"
    tmp = last.with_name("last.ckpt.tmp")
    args = _overrides(shapes, vae_export, run, "ckpt_path=last")
    saved_steps, while_saving, i = [], 0, 0
    while i < kills:
        start = load_checkpoint(last)["global_step"] if last.exists() else 0
        proc = TrainProcess(args, tmp_path / f"killed{len(saved_steps)}.log")
        proc.wait_for_progress(start + rng.randint(2, 6))  # the bar counts from the restored step
        if i == 1:
            _kill_during_a_save(proc, tmp)
        else:
            time.sleep(rng.uniform(0.0, 0.2))  # somewhere in the next step or its checkpoint write
            assert proc.proc.poll() is None, f"the run ended before kill {i}:\n{proc.output()[-3000:]}"
            proc.proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert checkpoint_problem(last) is None, "a kill damaged last.ckpt"
        saved_steps.append(load_checkpoint(last)["global_step"])
        landed = tmp.exists()
        while_saving += landed
        # the kill meant for a save may land just after its rename: kill again (a few tries) until one lands
        i += 1 if i != 1 or landed or len(saved_steps) >= 5 else 0
    assert while_saving >= 1, f"none of {len(saved_steps)} kills landed in a checkpoint write"
    assert saved_steps == sorted(saved_steps) and 0 < saved_steps[-1] < STEPS, saved_steps

    start_file = tmp_path / "start_step"
    _train_in_process([*args, "+callbacks.start._target_=t2i_testing.RecordStartStep",
                       f"+callbacks.start.path={start_file}"])
    assert int(start_file.read_text()) == saved_steps[-1], "the last resume did not start from last.ckpt"
    straight = tmp_path / "straight"
    _train_in_process(_overrides(shapes, vae_export, straight))
    print(f"last.ckpt after each kill: step {saved_steps}; {while_saving} kill(s) landed in a checkpoint write")
    return Crashed(load_checkpoint(last), load_checkpoint(straight / "checkpoints" / "last.ckpt"), saved_steps,
                   while_saving)


def test_resume_after_sigkill_equals_an_uninterrupted_run(crashed):
    """Weights, EMA, optimizer, LR schedule, random states and data position."""
    assert crashed.resumed["global_step"] == STEPS
    assert int(crashed.resumed["state_dict"]["ema.num_updates"]) == STEPS
    assert_same_training_state(crashed.resumed, crashed.reference, atol=0)  # bitwise: CPU fp32 runs reproduce


def test_a_periodic_checkpoint_holds_the_ema_of_its_step(small_shapes, tiny_vae_export, tmp_path):
    """Deterministic form of the above: 3 steps, a checkpoint every 2: ``last.ckpt.prev`` is step 2's."""
    run = tmp_path / "run"
    train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, run, "trainer.max_steps=3",
                                            "callbacks.checkpoint.every_n_train_steps=2", "final_validation=false",
                                            "export=false")))
    periodic = load_checkpoint(run / "checkpoints" / "last.ckpt.prev")
    assert periodic["global_step"] == 2
    assert int(periodic["state_dict"]["ema.num_updates"]) == 2
