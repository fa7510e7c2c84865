"""Checkpoint directories (DeepSpeed ZeRO) are replaced so that a crash at any instant leaves a complete one to
resume from, and the previous version is kept as ``.prev`` (used when the newest is damaged): a crash injected
at every rename and deletion of the replacement, and a process SIGKILLed at random moments while it saves."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from t2i_testing import REPO

from t2i import checkpoint_files
from t2i.checkpoint_files import checkpoint_problem, looks_complete, previous_path, replace_keeping_previous
from t2i.checkpointing import choose_resume_checkpoint

# Writes ZeRO-shaped checkpoint directories (``latest`` + a tag folder of zip files, the step inside) under a
# temporary name and puts each in place as AtomicDeepSpeedStrategy.save_checkpoint does, forever; the test
# kills it. Zip files via zipfile keep the child free of torch (fast to start); the checks read zip structure.
WRITER = r"""
import sys, zipfile
from pathlib import Path
from t2i.checkpoint_files import fsync_tree, looks_complete, replace_keeping_previous
target, step = Path(sys.argv[1]), int(sys.argv[2])
while True:
    step += 1
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        import shutil; shutil.rmtree(tmp)
    (tmp / "checkpoint").mkdir(parents=True)
    for rank in range(2):
        with zipfile.ZipFile(tmp / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", "w") as z:
            z.writestr("step", str(step))
            z.writestr("payload", bytes(200_000))
    (tmp / "latest").write_text("checkpoint")
    fsync_tree(tmp)
    replace_keeping_previous(tmp, target, keep_target=looks_complete(target))
    print(step, flush=True)
"""


def write_zero_dir(path: Path, step: int) -> Path:
    shutil.rmtree(path, ignore_errors=True)  # a crashed save's leftover, as the strategy clears it
    (path / "checkpoint").mkdir(parents=True)
    for rank in range(2):
        with zipfile.ZipFile(path / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", "w") as z:
            z.writestr("step", str(step))
    (path / "latest").write_text("checkpoint")
    return path


def step_of(path: Path) -> int:
    with zipfile.ZipFile(path / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt") as z:
        return int(z.read("step"))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old")))


def test_the_previous_directory_is_kept_and_used_when_the_newest_is_damaged(tmp_path):
    last = tmp_path / "last.ckpt"
    for step in (1, 2, 3):
        replace_keeping_previous(write_zero_dir(tmp_path / "last.ckpt.tmp", step), last)
    assert (step_of(last), step_of(previous_path(last))) == (3, 2)
    assert leftovers(tmp_path) == []
    # the newest is damaged (a shard cut short): the resume takes .prev, and the next save keeps .prev, not
    # the damaged one
    shard = last / "checkpoint" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:40])
    assert not looks_complete(last) and checkpoint_problem(last)
    assert choose_resume_checkpoint(last) == previous_path(last)
    replace_keeping_previous(write_zero_dir(tmp_path / "last.ckpt.tmp", 3), last, keep_target=looks_complete(last))
    assert (step_of(last), step_of(previous_path(last))) == (3, 2)
    assert checkpoint_problem(previous_path(last)) is None and leftovers(tmp_path) == []


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["os.replace", "rmtree"])
def test_a_crash_at_every_step_of_the_replacement_leaves_a_complete_checkpoint(tmp_path, monkeypatch, where):
    """The k-th rename (or deletion) raises, for every k: `choose_resume_checkpoint` then finds step 2 or step 3,
    complete, and the next save cleans up and goes on."""
    real, steps = {"os.replace": (os.replace, 3), "rmtree": (shutil.rmtree, 1)}[where]
    k = 0
    while True:
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        last = folder / "last.ckpt"
        for step in (1, 2):
            replace_keeping_previous(write_zero_dir(folder / "last.ckpt.tmp", step), last)
        new = write_zero_dir(folder / "last.ckpt.tmp", 3)
        calls = []

        def crashing(*args, calls=calls, k=k, **kwargs):
            calls.append(args)
            if len(calls) > k:
                raise Crash
            return real(*args, **kwargs)

        if where == "os.replace":
            monkeypatch.setattr(checkpoint_files.os, "replace", crashing)
        else:
            monkeypatch.setattr(checkpoint_files.shutil, "rmtree", crashing)
        try:
            replace_keeping_previous(new, last)
            crashed = False
        except Crash:
            crashed = True
        finally:
            monkeypatch.undo()
        chosen = choose_resume_checkpoint(last)
        assert chosen is not None and checkpoint_problem(chosen) is None, (where, k)
        assert step_of(chosen) in (2, 3), (where, k, step_of(chosen))
        replace_keeping_previous(write_zero_dir(folder / "last.ckpt.tmp", 4), last)
        assert step_of(last) == 4 and step_of(previous_path(last)) in (2, 3), (where, k)
        assert leftovers(folder) == [], (where, k)
        if not crashed:
            break
        k += 1
    assert k == steps, f"the replacement made {k} {where} calls, expected {steps}: what did the test crash?"


def test_sigkill_while_saving_never_loses_the_checkpoint(tmp_path):
    """A writer saving checkpoint directories back to back is SIGKILLed at random moments, 12 times; after each
    kill a complete checkpoint is found, no older than the last one the writer had finished, and the writer
    goes on from it. At least one kill must land while a save was in flight (a ``.tmp`` left behind)."""
    rng = random.Random(0)
    last = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    step, in_flight = 0, 0
    for i in range(12):
        out = tmp_path / f"writer{i}.log"
        with open(out, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", WRITER, str(last), str(step)], stdout=log, env=env)
        deadline = time.monotonic() + 60
        while len(out.read_bytes().split()) < 3:  # a few saves done
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        finished = int(out.read_bytes().split()[-1])  # the writer printed it after its save was in place
        chosen = choose_resume_checkpoint(last)
        assert chosen is not None and checkpoint_problem(chosen) is None, f"kill {i}"
        assert step_of(chosen) >= finished, f"kill {i}: resumed step {step_of(chosen)} < finished {finished}"
        in_flight += (tmp_path / "last.ckpt.tmp").exists()
        step = step_of(chosen)
    assert in_flight >= 1, "no kill landed during a save"


def test_a_zero_checkpoint_resumes_only_on_the_ranks_that_wrote_it(tmp_path):
    from t2i.checkpointing import CheckpointError
    from t2i.cli.train import check_zero_world_size
    folder = write_zero_dir(tmp_path / "last.ckpt", 3)  # two ranks' partitions
    check_zero_world_size(str(folder), 2)
    with pytest.raises(CheckpointError, match="partitioned over 2 ranks and this run has 3"):
        check_zero_world_size(str(folder), 3)
    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(b"x")
    check_zero_world_size(str(plain), 5)  # a single-file checkpoint resumes on any number of ranks
