"""Pre-emption through the real command line: SIGTERM / SIGUSR1 during training saves ``last.ckpt`` at the next
step boundary and exits with 128 + the signal number; ``ckpt_path=last`` then finishes the run exactly as an
uninterrupted one (weights, EMA, optimizer, LR schedule, random states, data position)."""

from __future__ import annotations

import signal
import sys

import pytest
import torch
from t2i_testing import (
    TrainProcess,
    assert_same_training_state,
    load_checkpoint,
    tiny_ldm_overrides,
    tiny_overrides,
)

from t2i.cli.config import compose_config
from t2i.cli.train import train

# only the signal saves (no periodic checkpoint), fp32 for bitwise-reproducible CPU runs
COMMON = ("callbacks.checkpoint.every_n_train_steps=100000", "final_validation=false", "export=false",
          "trainer.precision=32-true")
VAE = ("model.grid_every_n_steps=0",)
STEPS = 16


def _vae(shapes, run, *extra):
    return tiny_overrides(shapes, run, f"trainer.max_steps={STEPS}", *COMMON, *VAE, *extra)


def _ldm(shapes, vae_export, run, *extra):
    return tiny_ldm_overrides(shapes, vae_export, run, f"trainer.max_steps={STEPS}", *COMMON, *extra)


def _train_in_process(overrides):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        return train(compose_config(overrides))
    finally:
        torch.set_num_threads(threads)


def _preempt(overrides, run, signum, tmp_path, command=None) -> dict:
    """Start a run, send `signum` once it has trained 2 batches; check the exit code and the checkpoint."""
    proc = TrainProcess(overrides, tmp_path / "preempted.log", command)
    proc.wait_for_progress(2)
    proc.proc.send_signal(signum)
    code = proc.wait()
    out = proc.output()
    name = signal.Signals(signum).name
    assert code == 128 + signum, f"exit code {code}:\n{out[-4000:]}"
    last = run / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    step = ckpt["global_step"]
    assert 2 <= step < STEPS, "the signal should land mid-run"
    assert f"[t2i] {name}: saved {last} at step {step}" in out
    assert f"pre-empted by {name} at step {step}" in out
    assert not last.with_name("last.ckpt.prev").exists(), "something other than the signal saved a checkpoint"
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batch"] == step
    return ckpt


def test_sigterm_saves_last_and_the_resumed_run_equals_an_uninterrupted_one(small_shapes, tmp_path):
    run = tmp_path / "preempted"
    _preempt(_vae(small_shapes, run), run, signal.SIGTERM, tmp_path)
    _train_in_process(_vae(small_shapes, run, "ckpt_path=last"))
    straight = tmp_path / "straight"
    _train_in_process(_vae(small_shapes, straight))
    assert_same_training_state(load_checkpoint(run / "checkpoints" / "last.ckpt"),
                               load_checkpoint(straight / "checkpoints" / "last.ckpt"))


def test_sigusr1_saves_last_and_the_resumed_run_equals_an_uninterrupted_one(small_shapes, tiny_vae_export, tmp_path):
    """The tiny LDM: EMA, a warm-up LR schedule and caption dropout's random draws resume exactly too."""
    run = tmp_path / "preempted"
    ckpt = _preempt(_ldm(small_shapes, tiny_vae_export, run), run, signal.SIGUSR1, tmp_path)
    assert int(ckpt["state_dict"]["ema.num_updates"]) == ckpt["global_step"]
    _train_in_process(_ldm(small_shapes, tiny_vae_export, run, "ckpt_path=last"))
    straight = tmp_path / "straight"
    _train_in_process(_ldm(small_shapes, tiny_vae_export, straight))
    resumed, reference = (load_checkpoint(r / "checkpoints" / "last.ckpt") for r in (run, straight))
    assert_same_training_state(resumed, reference)
    assert int(resumed["state_dict"]["ema.num_updates"]) == STEPS


LAUNCHER = """
import signal, sys
from pathlib import Path
marker = Path(sys.argv.pop(1))
def requeue(signum, frame):  # stands where submitit's timeout handler is: it must run after last.ckpt exists
    last = marker.parent / "preempted" / "checkpoints" / "last.ckpt"
    marker.write_text(f"{signum} {last.is_file()}")
signal.signal(signal.SIGUSR2, requeue)
from t2i.cli.train import main
sys.argv[0] = "train"
main()
"""


def test_sigusr2_hands_over_to_the_handler_installed_before_training(small_shapes, tmp_path):
    """submitit installs its requeue handler before the job function runs: t2i saves first, then hands over."""
    launcher, marker = tmp_path / "launch.py", tmp_path / "handed_over.txt"
    launcher.write_text(LAUNCHER)
    run = tmp_path / "preempted"
    _preempt(_vae(small_shapes, run), run, signal.SIGUSR2, tmp_path,
             command=[sys.executable, str(launcher), str(marker)])
    assert marker.read_text() == f"{int(signal.SIGUSR2)} True", "the previous handler did not run after the save"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_exit_code_is_128_plus_the_signal(signum):
    from t2i.callbacks.preemption import Preempted
    assert Preempted(signum, "last.ckpt", 3).exit_code == {signal.SIGTERM: 143, signal.SIGUSR1: 138}[signum]
