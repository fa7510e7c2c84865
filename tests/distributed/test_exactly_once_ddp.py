"""The data stream's exactly-once guarantee through real training runs on 1, 2 and 3 CPU ranks (DDP, gloo): in
one epoch every rank trains on the same number of batches, no sample is trained twice across ranks, fewer than
one global batch is left out; a run stopped mid-epoch and resumed trains on exactly the rest; and a run
pre-empted mid-epoch and resumed on another number of ranks (elastic) trains on the rest of the epoch spread over
the new ranks."""

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


def _run(small_shapes, run_dir, world: int, steps: int, *extra: str, code: int = 0) -> None:
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
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]


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


@pytest.mark.parametrize("old,new,stop", [((2, 0), (3, 0), "preempted"), ((1, 2), (1, 0), "preempted"),
                                          ((2, 0), (3, 0), "max_steps")])  # (ranks, loader workers)
def test_a_run_stopped_mid_epoch_resumes_on_another_layout(small_shapes, tmp_path, old, new, stop):
    """Stopped after 5 steps, mid-epoch: pre-empted (the process ends after the step-5 checkpoint) or at
    max_steps (the final checkpoint, after which Lightning counts the rest as a new epoch). Resumed with another
    number of ranks or loader workers: the epoch's samples are trained at most once, fewer than one new global
    batch is left out, every rank trains as many batches, and the epoch ends where the stream's does."""
    (world, workers), (new_world, new_workers) = old, new
    run = tmp_path / "run"
    if stop == "preempted":
        _run(small_shapes, run, world, 100, f"data.num_workers={workers}",
             "callbacks.checkpoint.every_n_train_steps=5", "+callbacks.exit._target_=t2i_key_recorder.ExitAtStep",
             "+callbacks.exit.step=5", code=17)
    else:
        _run(small_shapes, run, world, 5, f"data.num_workers={workers}", "callbacks.checkpoint.every_n_train_steps=1000")
    # the recorder saw the batch the exit cut short (it runs first): drop it
    first = {r: [row for row in rows if row[1] < 5] for r, rows in read_keys(run / "keys").items()}
    assert {r: len(rows) for r, rows in first.items()} == {r: 5 for r in range(world)}
    rest_batches = (TRAIN_SAMPLES - 5 * BATCH * world) // (BATCH * new_world)
    resumed = tmp_path / "resumed_keys"
    _run(small_shapes, run, new_world, 5 + rest_batches + 1, f"data.num_workers={new_workers}", "ckpt_path=last",
         f"callbacks.keys.out_dir={resumed}")
    second = read_keys(resumed)
    assert sorted(second) == list(range(new_world))
    epoch = 0 if stop == "preempted" else 1  # Lightning's count; the stream's epoch is 0 either way
    for rows in second.values():
        assert [(e, s) for e, s, _ in rows] == ([(epoch, 5 + i) for i in range(rest_batches)]
                                                + [(epoch + 1, 5 + rest_batches)])
    keys = [k for rows in first.values() for *_, b in rows for k in b]
    keys += [k for rows in second.values() for e, _, b in rows if e == epoch for k in b]
    dup = [k for k, c in Counter(keys).items() if c > 1]
    assert not dup, f"trained twice in one epoch: {dup[:5]}"
    assert 0 <= TRAIN_SAMPLES - len(keys) < BATCH * new_world
