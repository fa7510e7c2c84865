"""Multi-node launch: the submitit SLURM launcher config gives the sbatch script a multi-GPU run needs, and the
documented sbatch / torchrun examples are valid shell whose training overrides compose."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
from omegaconf import OmegaConf
from t2i_testing import REPO

from t2i.cli.config import compose_config, config_dir

EXAMPLES = REPO / "examples" / "slurm"


def _sbatch_text(launcher, folder) -> str:
    """What Hydra's submitit launcher submits for `launcher` (its parameter mapping, then submitit's sbatch)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = OmegaConf.to_container(launcher, resolve=True)
    for key in ("_target_", "submitit_folder", "array_parallelism"):
        params.pop(key)
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(folder),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m t2i.cli.train", "uid")


def test_slurm_launcher_config_makes_a_multi_gpu_sbatch(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    fake_bin = tmp_path / "bin"  # submitit refuses to build an executor where there is no `srun` on PATH
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{__import__('os').environ['PATH']}")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tiny/vae", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.nodes=4", "hydra.launcher.name=t2i"],
                      return_hydra_config=True)
    text = _sbatch_text(cfg.hydra.launcher, tmp_path / "submitit")
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--partition=gpu",
                 "--time=2880", "--open-mode=append"):
        assert f"#SBATCH {line}" in text, f"missing #SBATCH {line} in\n{text}"
    assert re.search(r"#SBATCH --signal=USR[12]@120", text)  # the pre-emption warning t2i saves on
    assert "export OMP_NUM_THREADS=10" in text and "srun" in text


@pytest.mark.parametrize("script", ["train_ldm.sbatch", "train_ldm_torchrun.sh"])
def test_examples_are_valid_shell_with_composable_overrides(script):
    path = EXAMPLES / script
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    text = path.read_text().replace("\\\n", " ")
    if script.endswith(".sbatch"):
        assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text and "ckpt_path=last" in text
    command = next(line for line in text.splitlines() if "t2i.cli.train" in line)
    words = shlex.split(command.split("t2i.cli.train", 1)[1])
    env = {"SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "8", "SHARDS": "/data/laion/shards"}
    overrides = [re.sub(r"\$\{?([A-Z_]+)(:-([^}]*))?\}?", lambda m: env.get(m.group(1), m.group(3) or ""), w)
                 for w in words]
    cfg = compose_config(overrides)  # a misspelled or removed key in the docs fails here
    assert cfg.trainer.num_nodes == 4 and cfg.trainer.devices == 8 and cfg.global_batch_size == 2048
    assert cfg.strategy._target_.endswith("AtomicDeepSpeedStrategy")
