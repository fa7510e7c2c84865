"""A CPU DDP run (2 processes, gloo) through the real command line, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from t2i_testing import REPO, tiny_overrides

from t2i.exports import read_export


def test_two_process_ddp_run_trains_and_exports(small_shapes, tmp_path):
    run = tmp_path / "ddp"
    args = tiny_overrides(small_shapes, run, "trainer.devices=2", "strategy=ddp", "trainer.max_steps=3",
                          "trainer.val_check_interval=2", "trainer.precision=32")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2i.cli.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    position = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position["layout"]["world_size"] == 2 and position["batch"] == 3
    assert len(ckpt["callbacks"]["RngStateCallback"]["per_rank"]) == 2
    assert read_export(run / "export", stage="autoencoder").info["global_step"] == 3
