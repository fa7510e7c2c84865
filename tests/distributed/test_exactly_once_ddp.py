"""The data stream's exactly-once guarantee through real training runs on 1, 2 and 3 CPU ranks (DDP, gloo): in
one epoch every rank trains on the same number of batches, no sample is trained twice across ranks, fewer than
one global batch is left out; and a run stopped mid-epoch and resumed trains on exactly the rest."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from t2i_key_recorder import read_keys
from t2i_testing import REPO, tiny_overrides

TRAIN_SAMPLES = 600  # the small_shapes fixture
BATCH = 16


def _run(small_shapes, run_dir, world: int, steps: int, *extra: str) -> None:
    args = tiny_overrides(small_shapes, run_dir, f"data.batch_size={BATCH}", f"trainer.max_steps={steps}",
                          "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "final_validation=false",
                          "export=false", "trainer.precision=32-true", "model.grid_every_n_steps=0",
                          "+callbacks.keys._target_=t2i_key_recorder.KeyRecorder",
                          f"+callbacks.keys.out_dir={run_dir}/keys", *extra)
    if world > 1:
        args += [f"trainer.devices={world}", "strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "t2i.cli.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _epoch0(keys_by_rank) -> dict[int, list[list[str]]]:
    return {r: [keys for epoch, _, keys in rows if epoch == 0] for r, rows in keys_by_rank.items()}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_one_epoch_on_n_ranks_trains_every_sample_at_most_once(small_shapes, tmp_path, world):
    per_rank_batches = TRAIN_SAMPLES // (BATCH * world)
    _run(small_shapes, tmp_path / "run", world, per_rank_batches + 1)  # one epoch and the first step of the next
    seen = read_keys(tmp_path / "run" / "keys")
    assert sorted(seen) == list(range(world))
    epoch0 = _epoch0(seen)
    assert {len(b) for b in epoch0.values()} == {per_rank_batches}, "ranks trained different numbers of batches"
    keys = [k for batches in epoch0.values() for b in batches for k in b]
    assert all(len(b) == BATCH for batches in epoch0.values() for b in batches)
    dup = [k for k, c in Counter(keys).items() if c > 1]
    assert not dup, f"trained twice in one epoch: {dup[:5]}"
    assert 0 <= TRAIN_SAMPLES - len(keys) < BATCH * world
    assert all(rows[-1][0] == 1 for rows in seen.values()), "the run did not move on to the second epoch"


def test_resumed_ddp_run_trains_exactly_the_rest_of_the_epoch(small_shapes, tmp_path):
    """Stop 2 ranks after 7 of the epoch's 18 steps, resume with ckpt_path=last: steps 7..17 train exactly the
    batches the uninterrupted run trained at those steps. (Lightning counts the resumed part as a new epoch, as
    the checkpoint was written when training ended; the data position is the stream's own and is exact.)"""
    world, per_rank_batches = 2, TRAIN_SAMPLES // (BATCH * 2)
    straight = tmp_path / "straight"
    _run(small_shapes, straight, world, per_rank_batches)
    stopped = tmp_path / "stopped"
    _run(small_shapes, stopped, world, 7, "callbacks.checkpoint.every_n_train_steps=1000")
    _run(small_shapes, stopped, world, per_rank_batches, "ckpt_path=last")
    a, b = read_keys(straight / "keys"), read_keys(stopped / "keys")
    for rank in range(world):
        assert [step for _, step, _ in b[rank]] == list(range(per_rank_batches)), "steps repeated or skipped"
        assert [keys for *_, keys in b[rank]] == [keys for *_, keys in a[rank]], f"rank {rank}: batches differ"
    keys = [k for rank in range(world) for *_, batch in b[rank] for k in batch]
    assert len(keys) == len(set(keys)) == per_rank_batches * BATCH * world
