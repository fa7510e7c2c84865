"""Elastic resume: a run stopped mid-epoch and resumed with another world size, number of loader workers or
per-device batch size trains on exactly the samples the epoch had not yet delivered, spread over the new
layout: none twice, fewer than one new global batch left out, every rank the same number of batches, and the
epoch ends at the new layout's length (what Lightning counts)."""

from __future__ import annotations

from collections import Counter

import pytest
from test_bucket_stream import sized_shards

from t2i.data.datamodule import ShardDataModule

UNEVEN = [37, 5, 61, 0, 18, 43, 9, 50]  # 223 samples


def _module(manifest, batch, workers, buckets=None):
    return ShardDataModule(str(manifest), batch_size=batch, num_workers=workers, seed=3, shuffle_window=16,
                           resolution=32 if buckets else 8, buckets=buckets)


def _take(loader, n):
    """The first `n` batches' keys, then the loader's saved position (what a checkpoint holds)."""
    out = []
    for batch in loader:
        out.append(list(batch["key"]))
        if len(out) == n:
            break
    return out, loader.state_dict()


def _resume(dm, state, world):
    """Every rank of a resumed run: its keys to the end of the epoch, and the batch index it started at."""
    keys, shapes, starts, lengths = [], [], set(), set()
    for rank in range(world):
        loader = dm.train_dataloader(rank, world)
        moved = []
        loader.on_relayout = moved.append
        loader.load_state_dict(state)
        starts.add((loader.state_dict()["batch"], tuple(moved)))
        batches = [(list(b["key"]), tuple(b["image"].shape[-2:])) for b in loader]
        lengths.add(len(batches))
        keys.append([k for k, _ in batches])
        shapes.append([s for _, s in batches])
        assert loader.state_dict()["epoch"] == state["epoch"] + 1, "the resumed epoch did not end"
    assert len(starts) == 1 and len(lengths) == 1, "ranks disagree on where the epoch stands"
    (start, _), = starts
    assert start + lengths.pop() == len(loader), "the epoch does not end at the new layout's length"
    return keys, starts.pop(), shapes


def _check_epoch(delivered, total, new_global_batch):
    count = Counter(delivered)
    assert not [k for k, c in count.items() if c > 1], "a sample was delivered twice in one epoch"
    assert 0 <= total - len(count) < new_global_batch, f"{total - len(count)} samples left out"


@pytest.mark.parametrize("old,new", [((2, 4, 2), (3, 4, 1)),   # 2 ranks -> 3
                                     ((3, 4, 1), (1, 4, 1)),   # 3 ranks -> 1
                                     ((1, 4, 2), (1, 4, 0)),   # 2 workers -> 0
                                     ((2, 3, 1), (2, 5, 2))])  # per-device batch 3 -> 5, workers 1 -> 2
def test_the_rest_of_the_epoch_is_spread_over_the_new_layout(shard_set, old, new):
    manifest = shard_set(UNEVEN)
    world, batch, workers = old
    dm = _module(manifest, batch, workers)
    stopped_at = 5
    first = []
    for rank in range(world):
        keys, state = _take(dm.train_dataloader(rank, world), stopped_at)
        first += [k for b in keys for k in b]
    assert len(first) == stopped_at * batch * world
    new_world, new_batch, new_workers = new
    rest, (start, moved), _ = _resume(_module(manifest, new_batch, new_workers), state, new_world)
    assert moved == (start - stopped_at,)
    assert all(len(b) == new_batch for r in rest for b in r)
    _check_epoch(first + [k for r in rest for b in r for k in b], sum(UNEVEN), new_batch * new_world)


def test_two_elastic_resumes_in_one_epoch_and_then_a_plain_epoch(shard_set):
    """2 ranks -> 3 ranks -> 1 rank, each stopped mid-epoch, then the next epoch is a whole one."""
    manifest = shard_set(UNEVEN)
    delivered, states = [], None
    dm2 = _module(manifest, 4, 1)
    for rank in range(2):
        keys, states = _take(dm2.train_dataloader(rank, 2), 6)
        delivered += [k for b in keys for k in b]
    dm3 = _module(manifest, 4, 2)
    middle = None
    for rank in range(3):
        loader = dm3.train_dataloader(rank, 3)
        loader.load_state_dict(states)
        keys, state = _take(loader, 3)
        delivered += [k for b in keys for k in b]
        middle = middle or state
    assert middle["legs"] and middle["batch"] - middle["leg_start"] == 3
    dm1 = _module(manifest, 4, 0)
    loader = dm1.train_dataloader(0, 1)
    loader.load_state_dict(middle)
    delivered += [k for b in loader for k in b["key"]]
    _check_epoch(delivered, sum(UNEVEN), 4)
    after = loader.state_dict()
    assert (after["epoch"], after["batch"], after["legs"]) == (middle["epoch"] + 1, 0, [])
    fresh = dm1.train_dataloader(0, 1)
    fresh.load_state_dict({**fresh.state_dict(), "epoch": after["epoch"]})
    assert [list(b["key"]) for b in loader] == [list(b["key"]) for b in fresh], "the next epoch is not a plain one"


def test_the_same_layout_still_resumes_bitwise_inside_an_elastic_epoch(shard_set):
    manifest = shard_set(UNEVEN)
    state = _take(_module(manifest, 4, 1).train_dataloader(0, 2), 4)[1]
    resumed = _module(manifest, 4, 2).train_dataloader(0, 3)
    resumed.load_state_dict(state)
    whole = [list(b["key"]) for b in resumed]
    again = _module(manifest, 4, 2).train_dataloader(0, 3)
    again.load_state_dict(state)
    head, saved = _take(again, 2)
    assert head == whole[:2]
    later = _module(manifest, 4, 2).train_dataloader(0, 3)
    later.load_state_dict(saved)
    assert [list(b["key"]) for b in later] == whole[2:]


def test_bucketed_epochs_resume_on_another_world_size(tmp_path):
    folder = sized_shards(tmp_path / "d", [40, 33, 47])
    buckets = {"area": 1024, "multiple": 16}
    dm = _module(folder, 3, 1, buckets)
    first = []
    for rank in range(2):
        keys, state = _take(dm.train_dataloader(rank, 2), 4)
        first += [k for b in keys for k in b]
    new = _module(folder, 2, 2, buckets)
    rest, _, shapes = _resume(new, state, 3)
    assert all(len(set(step)) == 1 for step in zip(*shapes)), "ranks stepped through different buckets"
    assert len({s for r in shapes for s in r}) > 1
    _check_epoch(first + [k for r in rest for b in r for k in b], 120, 2 * 3 * len(new.buckets))
