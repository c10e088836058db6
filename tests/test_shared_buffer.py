"""Shared replay buffer: real shard actors, two worker clients, snapshots and restarts."""

import json
import math
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gmmc_dist.buffer import BufferDraw, build_buffer, build_local_buffer
from gmmc_dist.config import BufferConfig
from gmmc_dist.buffer.shared import (
    LATEST_FILE,
    MANIFEST_FILE,
    SharedReplayBuffer,
    check_layout,
    create_shared_buffer,
    delete_shared_buffer,
    shard_file_name,
)

# Four slots of four classes in two shards: a class-conditional draw of labels [0, 1, 2, 3] hits
# exactly the slots [0, 1, 2, 3], and an unconditional draw of 64 hits every slot.
SMALL = BufferConfig(kind="shared", capacity=4, num_shards=2, reinit_prob=0.0, dtype="float16")
SMALL_CLASSES = 4
ALL_SLOTS = torch.arange(4)

# 26 slots of 10 classes in two shards of 13: class 3 has slot 3 in shard 0 and slots 13, 23 in shard 1.
UNEVEN = BufferConfig(kind="shared", capacity=26, num_shards=2, reinit_prob=0.1, dtype="float32")
UNEVEN_CLASSES = 10


@pytest.fixture(scope="module")
def small_buffer(ray_session, tmp_path_factory):
    handles = create_shared_buffer(SMALL, SMALL_CLASSES, str(tmp_path_factory.mktemp("small-snapshots")), seed=1)
    yield handles
    delete_shared_buffer(handles)


@pytest.fixture(scope="module")
def uneven_buffer(ray_session, tmp_path_factory):
    handles = create_shared_buffer(UNEVEN, UNEVEN_CLASSES, str(tmp_path_factory.mktemp("uneven-snapshots")), seed=2)
    yield handles
    delete_shared_buffer(handles)


def client(handles, rank, prefetch=False):
    return SharedReplayBuffer(handles, rank=rank, seed=rank + 10, prefetch=prefetch)


def contents(ray, handles):
    """Every slot of every shard, concatenated in global slot order."""
    parts = ray.get([actor.contents.remote() for actor in handles.actors()])
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def write_all_slots(buffer, values):
    """Draw slots 0..3 (class-conditional) and write `values` [4, 3, 32, 32] into them."""
    drawn = buffer.draw(4, ALL_SLOTS)
    assert drawn.slots.tolist() == [0, 1, 2, 3]
    buffer.write_back(drawn, values)
    buffer.flush()
    return drawn


def full(value, rows=4):
    return torch.full((rows, 3, 32, 32), value)


# ---- chains move between workers ------------------------------------------------------------


def test_chains_refined_across_workers(ray_session, small_buffer):
    ray = ray_session
    worker0 = client(small_buffer, rank=0)
    before = contents(ray, small_buffer)

    drawn0 = worker0.draw(64)
    assert set(drawn0.slots.tolist()) == {0, 1, 2, 3}
    worker0.write_back(drawn0, full(0.25, 64))
    worker0.flush()

    def refine_in_other_worker(handles, value):
        """Worker 1 in its own process: draw 64 chains, record them, write `value` back."""
        worker = SharedReplayBuffer(handles, rank=1, seed=11, prefetch=False)
        drawn = worker.draw(64)
        worker.write_back(drawn, torch.full_like(drawn.states, value))
        worker.flush()
        return {
            "slots": drawn.slots.numpy(),
            "ages": drawn.ages.numpy(),
            "chain_ids": drawn.chain_ids.numpy(),
            "states": drawn.states.numpy(),
        }

    # The handles travel to another process, as they do in train_loop_config. The function is
    # defined here so that Ray ships it by value (workers cannot import this test module).
    seen = ray.get(ray.remote(refine_in_other_worker).remote(small_buffer, 0.75))
    slots = seen["slots"]
    assert set(slots.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(seen["ages"], before["ages"][slots] + 1)
    np.testing.assert_array_equal(seen["chain_ids"], before["chain_ids"][slots])
    assert np.all(seen["states"] == 0.25)

    drawn0 = worker0.draw(64)
    np.testing.assert_array_equal(drawn0.ages.numpy(), before["ages"][drawn0.slots.numpy()] + 2)
    assert torch.all(drawn0.states == 0.75)


def test_handles_survive_pickle(small_buffer):
    restored = pickle.loads(pickle.dumps(small_buffer))
    assert restored == small_buffer
    assert restored.num_shards == 2
    assert restored.shard_capacity == 2


# ---- concurrent draws of the same slot ------------------------------------------------------


def test_same_slot_last_write_wins(ray_session, small_buffer):
    worker0, worker1 = client(small_buffer, rank=0), client(small_buffer, rank=1)
    ages_before = contents(ray_session, small_buffer)["ages"]
    stale_before = worker0.stats()["stale_write_backs"]

    # Both workers draw slots 0..3 before either writes back; worker 1's write arrives last.
    drawn0, drawn1 = worker0.draw(4, ALL_SLOTS), worker1.draw(4, ALL_SLOTS)
    worker0.write_back(drawn0, full(0.5))
    worker0.flush()
    worker1.write_back(drawn1, full(-0.5))
    worker1.flush()

    after = contents(ray_session, small_buffer)
    assert np.all(after["states"] == -0.5)
    np.testing.assert_array_equal(after["ages"], ages_before + 1)
    assert worker0.stats()["stale_write_backs"] == stale_before + 4

    # The other order: worker 0's write arrives last and wins.
    drawn0, drawn1 = worker0.draw(4, ALL_SLOTS), worker1.draw(4, ALL_SLOTS)
    worker1.write_back(drawn1, full(-0.25))
    worker1.flush()
    worker0.write_back(drawn0, full(0.25))
    worker0.flush()
    assert np.all(contents(ray_session, small_buffer)["states"] == 0.25)


def test_repeated_slot_keeps_last_row(ray_session, small_buffer):
    worker = client(small_buffer, rank=0)
    stale_before = worker.stats()["stale_write_backs"]
    drawn = worker.draw(2, torch.tensor([1, 1]))
    assert drawn.slots.tolist() == [1, 1]
    worker.write_back(drawn, torch.cat([full(0.125, 1), full(0.375, 1)]))
    worker.flush()
    assert np.all(contents(ray_session, small_buffer)["states"][1] == 0.375)
    assert worker.stats()["stale_write_backs"] == stale_before + 1


# ---- storage dtype, snapshots, restarts -----------------------------------------------------


def test_float16_round_trip(small_buffer):
    worker = client(small_buffer, rank=0)
    values = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    write_all_slots(worker, values)
    drawn = worker.draw(4, ALL_SLOTS)
    assert drawn.states.dtype == torch.float32
    assert torch.equal(drawn.states, values.half().float())
    # float16 has 10 fraction bits: rounding moves a value in [-1, 1] by at most 2^-12.
    assert float((drawn.states - values).abs().max()) <= 2.0**-12


def test_snapshot_loads_into_new_actors(ray_session, small_buffer, tmp_path):
    worker = client(small_buffer, rank=0)
    write_all_slots(worker, torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1)
    reference = worker.snapshot(step=7)
    expected = contents(ray_session, small_buffer)

    assert reference == {"kind": "shared", "url": os.path.join(small_buffer.snapshot_root, "step-000000007"), "step": 7}
    assert worker.state_dict() == reference
    assert json.loads((Path(small_buffer.snapshot_root) / LATEST_FILE).read_text()) == reference
    manifest = json.loads(open(os.path.join(reference["url"], MANIFEST_FILE)).read())
    assert manifest["shards"] == [shard_file_name(0, 2), shard_file_name(1, 2)]
    assert (manifest["capacity"], manifest["num_shards"], manifest["dtype"], manifest["step"]) == (4, 2, "float16", 7)

    fresh_handles = create_shared_buffer(SMALL, SMALL_CLASSES, str(tmp_path / "other-root"), seed=3)
    try:
        assert not np.array_equal(contents(ray_session, fresh_handles)["states"], expected["states"])
        client(fresh_handles, rank=0).load_state_dict(reference)
        loaded = contents(ray_session, fresh_handles)
        for name in ("states", "labels", "ages", "chain_ids", "versions"):
            np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)
        assert loaded["states"].dtype == np.float16
        # A second rank loading the same reference leaves the shards as they are.
        assert ray_session.get(fresh_handles.actors()[0].load_snapshot.remote(reference["url"])) is False
    finally:
        delete_shared_buffer(fresh_handles)


def test_killed_shard_reloads_snapshot(ray_session, small_buffer):
    ray = ray_session
    worker = client(small_buffer, rank=0)
    write_all_slots(worker, full(0.5))
    worker.snapshot(step=8)
    snapshot = contents(ray, small_buffer)
    write_all_slots(worker, full(-0.75))

    shard0 = small_buffer.actors()[0]
    ray.kill(shard0, no_restart=False)
    # ray.kill returns before the actor dies, so a call made at once may still reach the old
    # process. Poll until the restarted actor responds.
    deadline = time.monotonic() + 60
    while True:
        try:
            if ray.get(shard0.stats.remote())["restarted"] == 1.0:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "the killed shard did not restart within 60 s"
        time.sleep(0.2)
    restored = ray.get(shard0.contents.remote())
    for name in ("states", "ages", "chain_ids", "versions"):
        np.testing.assert_array_equal(restored[name], snapshot[name][:2], err_msg=name)
    assert ray.get(shard0.stats.remote())["restarted"] == 1.0
    # Shard 1 was not restarted and keeps the write-back made after the snapshot.
    assert np.all(ray.get(small_buffer.actors()[1].contents.remote())["states"] == -0.75)


# ---- statistics of draws ----------------------------------------------------------------------


def test_reinitialised_fraction_matches_rho(uneven_buffer):
    worker = client(uneven_buffer, rank=0)
    before = worker.stats()
    draws, batch = 100, 64
    fresh_count = 0
    for _ in range(draws):
        drawn = worker.draw(batch)
        fresh = drawn.reinitialised
        fresh_count += int(fresh.sum())
        assert torch.all(drawn.ages[fresh] == 0)
        assert torch.all(drawn.chain_ids[fresh] >= UNEVEN.capacity)
        assert float(drawn.states.abs().max()) <= 1.0
    total = draws * batch
    rho = UNEVEN.reinit_prob
    assert abs(fresh_count - total * rho) <= 5 * math.sqrt(total * rho * (1 - rho))

    after = worker.stats()
    assert after["reinitialised"] - before["reinitialised"] == fresh_count
    assert after["draws"] - before["draws"] == total
    # Each chain picks shard 0 or 1 with probability 1/2.
    shard0 = after["shard0/draws"] - before["shard0/draws"]
    assert abs(shard0 - total / 2) <= 5 * math.sqrt(total / 4)


def test_fresh_chain_ids_are_unique(uneven_buffer):
    worker = client(uneven_buffer, rank=0)
    new_ids = []
    for _ in range(20):
        drawn = worker.draw(64)
        new_ids += drawn.chain_ids[drawn.reinitialised].tolist()
    assert len(new_ids) > 0
    assert len(set(new_ids)) == len(new_ids)


def test_class_conditional_draws(uneven_buffer):
    worker = client(uneven_buffer, rank=0)
    labels = torch.randint(UNEVEN_CLASSES, (64,), generator=torch.Generator().manual_seed(7))
    drawn = worker.draw(64, labels)
    assert torch.equal(drawn.labels, labels)
    assert torch.equal(drawn.slots % UNEVEN_CLASSES, labels)

    # Class 3 owns slots 3 (shard 0), 13 and 23 (shard 1): each must get a third of the draws.
    slots = torch.cat([worker.draw(300, torch.full((300,), 3)).slots for _ in range(10)])
    total = len(slots)
    for slot in (3, 13, 23):
        count = int((slots == slot).sum())
        assert abs(count - total / 3) <= 5 * math.sqrt(total * (1 / 3) * (2 / 3)), (slot, count)


def test_prefetch_follows_write_back(uneven_buffer):
    worker = client(uneven_buffer, rank=0, prefetch=True)
    drawn = worker.draw(64)
    worker.write_back(drawn, drawn.states)
    worker.draw(64)
    stats = worker.stats()
    assert stats["prefetch_hits"] == 1
    worker.write_back(drawn, drawn.states)
    worker.draw(32)  # another size: the prefetched draw of 64 is dropped
    stats = worker.stats()
    assert stats["prefetch_hits"] == 1
    assert stats["prefetch_discarded"] == 1
    assert stats["wait_s"] > 0


def test_stats_report_shards_and_totals(uneven_buffer):
    stats = client(uneven_buffer, rank=0).stats()
    for name in ("draws", "write_backs", "reinitialised", "stale_write_backs", "mean_age", "wait_s"):
        assert name in stats
    assert stats["draws"] == stats["shard0/draws"] + stats["shard1/draws"]
    assert stats["mean_age"] == pytest.approx((stats["shard0/mean_age"] + stats["shard1/mean_age"]) / 2)


# ---- invalid input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capacity, num_shards, message",
    [(3, 4, "exceeds buffer.capacity"), (10, 4, "not divisible"), (0, 1, "at least 1"), (4, 0, "at least 1")],
)
def test_layout_rejects_bad_sizes(capacity, num_shards, message):
    with pytest.raises(ValueError, match=message):
        check_layout(capacity, num_shards, num_classes=10, reinit_prob=0.1, dtype="float32")


def test_create_rejects_bad_config(ray_session, tmp_path):
    with pytest.raises(ValueError, match="not divisible"):
        create_shared_buffer(BufferConfig(kind="shared", capacity=10, num_shards=4), 10, str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        create_shared_buffer(BufferConfig(kind="shared", capacity=8, num_shards=2, dtype="bfloat16"), 10, str(tmp_path))


def test_build_buffer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown buffer.kind='ring'"):
        build_buffer(BufferConfig(kind="ring"), 10, 0, 1, torch.device("cpu"), 0)


def test_build_buffer_shared_needs_handles():
    with pytest.raises(ValueError, match="needs the shard handles"):
        build_buffer(BufferConfig(kind="shared"), 10, 0, 1, torch.device("cpu"), 0)


def test_build_buffer_checks_handles(uneven_buffer):
    other = BufferConfig(kind="shared", capacity=52, num_shards=2, reinit_prob=0.1)
    with pytest.raises(ValueError, match="were created with"):
        build_buffer(other, UNEVEN_CLASSES, 0, 2, torch.device("cpu"), 0, shared_handles=uneven_buffer)
    buffer = build_buffer(UNEVEN, UNEVEN_CLASSES, 0, 2, torch.device("cpu"), 0, shared_handles=uneven_buffer)
    assert isinstance(buffer, SharedReplayBuffer)


def test_build_buffer_local_kind():
    buffer = build_buffer(BufferConfig(kind="local", capacity=100), 10, 1, 2, torch.device("cpu"), 0)
    assert buffer.capacity == 50
    assert build_local_buffer(BufferConfig(capacity=100), 10, 0, 4, torch.device("cpu"), 0).capacity == 25


def test_client_rejects_bad_calls(uneven_buffer):
    worker = client(uneven_buffer, rank=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        worker.draw(2, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        worker.draw(3, torch.tensor([0, 1]))
    drawn = worker.draw(2)
    plain = BufferDraw(drawn.states, drawn.labels, drawn.slots, drawn.ages, drawn.reinitialised)
    with pytest.raises(TypeError, match="SharedBufferDraw"):
        worker.write_back(plain, drawn.states)
    with pytest.raises(ValueError, match="local buffer's states"):
        worker.load_state_dict({"states": torch.zeros(1), "labels": torch.zeros(1)})
