"""Checkpoint files survive crashes: atomic writes keep the previous version, a damaged ``last.ckpt`` is found
before anything is restored from it and the run resumes from ``last.ckpt.prev``, and a run never starts from
scratch silently when its checkpoint is damaged."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from t2i_testing import REPO, load_checkpoint, tiny_overrides

from t2i.checkpoint_files import checkpoint_problem
from t2i.checkpointing import AtomicCheckpointIO, CheckpointError
from t2i.cli.config import compose_config
from t2i.cli.train import train

COMMON = ("callbacks.checkpoint.every_n_train_steps=2", "final_validation=false", "export=false",
          "model.grid_every_n_steps=0")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---- atomic writes ------------------------------------------------------------------------------------------------

def test_each_save_keeps_the_previous_version(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    for step in (1, 2, 3):
        io.save_checkpoint({"global_step": step, "w": torch.full((4,), float(step))}, path)
    assert load_checkpoint(path)["global_step"] == 3
    prev = load_checkpoint(path.with_name("last.ckpt.prev"))
    assert prev["global_step"] == 2 and torch.equal(prev["w"], torch.full((4,), 2.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.ckpt.prev"]
    io.remove_checkpoint(path)
    assert not any(path.parent.iterdir())


FULL_DISK = r"""
import resource, signal, sys, torch
from t2i.checkpointing import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, sys.argv[1])
io.save_checkpoint({"global_step": 2, "w": torch.ones(1000)}, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    io.save_checkpoint({"global_step": 3, "w": torch.ones(4 << 20)}, sys.argv[1])  # 16 MB: fails after 1 MB
except Exception as e:
    print("save failed:", type(e).__name__, e)
    sys.exit(3)
"""


def test_a_save_that_fails_midway_leaves_last_intact(tmp_path):
    """A real write error in the middle of torch.save (the file-size limit stands in for a full disk)."""
    path = tmp_path / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "save failed" in proc.stdout
    assert checkpoint_problem(path) is None and load_checkpoint(path)["global_step"] == 2
    assert load_checkpoint(path.with_name("last.ckpt.prev"))["global_step"] == 1
    assert not path.with_name("last.ckpt.tmp").exists(), "a failed save leaves its partial file behind"


BIG_SAVE = r"""
import sys, torch
from t2i.checkpointing import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, sys.argv[1])
print("first saved", flush=True)
io.save_checkpoint({"global_step": 2, "w": [torch.randn(1 << 20) for _ in range(24)]}, sys.argv[1])  # 96 MB
print("second saved", flush=True)
"""


def test_a_kill_during_saving_leaves_last_intact(tmp_path):
    """SIGKILL while the next version is being written: ``last.ckpt`` is the old version, whole."""
    path = tmp_path / "last.ckpt"
    tmp = path.with_name("last.ckpt.tmp")
    proc = subprocess.Popen([sys.executable, "-c", BIG_SAVE, str(path)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (path.exists() and tmp.exists() and tmp.stat().st_size > 0):  # the second save is writing
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the second save never started"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert "second saved" not in proc.stdout.read().decode()
    assert tmp.exists(), "the kill landed after the save finished: nothing was tested"
    assert checkpoint_problem(path) is None and load_checkpoint(path)["global_step"] == 1


def test_a_damaged_last_checkpoint_is_not_kept_as_prev(tmp_path):
    """After a resume from ``.prev`` (``last.ckpt`` damaged), the next save must not replace the one intact
    version with the damaged file."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    io.save_checkpoint({"global_step": 2}, path)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    io.save_checkpoint({"global_step": 3}, path)
    assert load_checkpoint(path)["global_step"] == 3
    assert load_checkpoint(path.with_name("last.ckpt.prev"))["global_step"] == 1


# ---- damaged checkpoints on resume --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_run(small_shapes, tmp_path_factory) -> Path:
    """A tiny VAE run of 3 steps: ``last.ckpt`` at step 3, ``last.ckpt.prev`` at step 2."""
    run = tmp_path_factory.mktemp("checkpoints") / "run"
    train(compose_config(tiny_overrides(small_shapes, run, "trainer.max_steps=3", *COMMON)))
    return run


@pytest.fixture
def run_dir(vae_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(vae_run, run)
    return run


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip_a_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's data (the zip structure stays valid)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": (_truncate, "is not a complete checkpoint file"),
          "empty": (_empty, "is empty (0 bytes)"),
          "corrupt": (_flip_a_byte, "fails its CRC check")}


def _resume(small_shapes, run: Path, tmp_path: Path, max_steps: int, *extra: str) -> int:
    """Resume `run` with ckpt_path=last; the step training started from."""
    start = tmp_path / "start_step"
    train(compose_config(tiny_overrides(small_shapes, run, f"trainer.max_steps={max_steps}", "ckpt_path=last",
                                        *COMMON, "+callbacks.start._target_=t2i_testing.RecordStartStep",
                                        f"+callbacks.start.path={start}", *extra)))
    return int(start.read_text())


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_last_checkpoint_resumes_from_prev(damage, small_shapes, run_dir, tmp_path, capsys):
    last = run_dir / "checkpoints" / "last.ckpt"
    prev = last.with_name("last.ckpt.prev")
    assert load_checkpoint(last)["global_step"] == 3 and load_checkpoint(prev)["global_step"] == 2
    damage_fn, message = DAMAGE[damage]
    damage_fn(last)
    problem = checkpoint_problem(last)
    assert problem is not None and message in problem and str(last) in problem
    assert checkpoint_problem(prev) is None

    assert _resume(small_shapes, run_dir, tmp_path, 6) == 2
    out = capsys.readouterr().out
    assert f"[t2i] WARNING: {problem}; resuming from the previous checkpoint {prev}" in out
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == 6 and checkpoint_problem(last) is None
    assert resumed["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batch"] == 6


@pytest.mark.parametrize("prev_state", ["damaged", "missing"])
def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(prev_state, small_shapes, run_dir, tmp_path):
    last = run_dir / "checkpoints" / "last.ckpt"
    prev = last.with_name("last.ckpt.prev")
    _truncate(last)
    if prev_state == "damaged":
        _empty(prev)
    else:
        prev.unlink()
    before = {p.name: p.read_bytes() for p in last.parent.iterdir()}
    config_before = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError) as err:
        _resume(small_shapes, run_dir, tmp_path, 6)
    message = str(err.value)
    assert "no intact checkpoint to resume from" in message
    assert f"{last} is not a complete checkpoint file" in message
    if prev_state == "damaged":
        assert f"{prev} is empty (0 bytes)" in message
    assert not (tmp_path / "start_step").exists(), "training started"
    assert {p.name: p.read_bytes() for p in last.parent.iterdir()} == before
    assert (run_dir / "config.yaml").read_bytes() == config_before, "a refused run replaced the run's config"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_explicit_damaged_checkpoint_path_is_a_clear_error(damage, small_shapes, vae_run, tmp_path):
    bad = tmp_path / "bad.ckpt"
    shutil.copyfile(vae_run / "checkpoints" / "last.ckpt", bad)
    damage_fn, message = DAMAGE[damage]
    damage_fn(bad)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError) as err:
        train(compose_config(tiny_overrides(small_shapes, run, "trainer.max_steps=2", f"ckpt_path={bad}", *COMMON)))
    assert str(err.value).startswith(f"cannot resume from {bad}: ") and message in str(err.value)
    assert not (run / "checkpoints").exists()
