"""Per-worker replay buffer: draws, reinitialisation rate, write-back and snapshots."""

import math

import pytest
import torch

from gmmc_dist.buffer import LocalReplayBuffer


def test_reinitialised_fraction_within_bounds_of_rho():
    rho = 0.025
    buffer = LocalReplayBuffer(capacity=1000, num_classes=10, reinit_prob=rho, seed=0)
    draws = 400
    batch = 64
    fresh = 0
    for _ in range(draws):
        draw = buffer.draw(batch)
        fresh += int(draw.reinitialised.sum())
        assert torch.equal(draw.ages[draw.reinitialised], torch.zeros_like(draw.ages[draw.reinitialised]))
        buffer.write_back(draw, draw.states)
    n = draws * batch
    sigma = math.sqrt(n * rho * (1 - rho))
    assert abs(fresh - n * rho) < 5 * sigma
    assert buffer.stats()["reinitialised"] == fresh
    assert buffer.stats()["draws"] == n


def test_fresh_starts_are_uniform_noise():
    buffer = LocalReplayBuffer(capacity=100, num_classes=10, reinit_prob=1.0, seed=0)
    draw = buffer.draw(256)
    assert draw.reinitialised.all()
    assert draw.states.min() >= -1
    assert draw.states.max() <= 1
    assert abs(draw.states.mean().item()) < 0.01
    assert abs(draw.states.var().item() - 1 / 3) < 0.01  # variance of U(-1, 1)


def test_class_conditional_draws_use_class_partitions():
    buffer = LocalReplayBuffer(capacity=105, num_classes=10, reinit_prob=0.5, seed=0)
    labels = torch.arange(64) % 10
    draw = buffer.draw(64, labels)
    assert torch.equal(draw.labels, labels)
    assert torch.equal(draw.slots % 10, labels)
    assert draw.slots.max() < 105


def test_write_back_stores_states_and_ages():
    buffer = LocalReplayBuffer(capacity=50, num_classes=10, reinit_prob=0.0, seed=0)
    draw = buffer.draw(8)
    refined = torch.full_like(draw.states, 0.25)
    buffer.write_back(draw, refined)
    slots = draw.slots.unique()
    assert torch.all(buffer.states[slots] == 0.25)
    again = buffer.draw(50)
    for slot, age in zip(again.slots.tolist(), again.ages.tolist()):
        assert age == (1 if slot in set(slots.tolist()) else 0)


def test_state_dict_round_trip_and_float16():
    buffer = LocalReplayBuffer(capacity=64, num_classes=10, reinit_prob=0.1, dtype="float16", seed=3)
    draw = buffer.draw(16)
    buffer.write_back(draw, draw.states * 0.5)
    restored = LocalReplayBuffer(capacity=64, num_classes=10, reinit_prob=0.1, dtype="float16", seed=99)
    restored.load_state_dict(buffer.state_dict())
    assert restored.states.dtype == torch.float16
    assert torch.equal(restored.states, buffer.states)
    assert torch.equal(restored.ages, buffer.ages)
    next_a, next_b = buffer.draw(16), restored.draw(16)
    assert torch.equal(next_a.slots, next_b.slots)  # the generator state travels too


def test_buffer_rejects_bad_settings():
    with pytest.raises(ValueError, match="reinit_prob=1.5"):
        LocalReplayBuffer(capacity=64, num_classes=10, reinit_prob=1.5)
    with pytest.raises(ValueError, match="capacity=5 is smaller than num_classes=10"):
        LocalReplayBuffer(capacity=5, num_classes=10, reinit_prob=0.1)
    buffer = LocalReplayBuffer(capacity=64, num_classes=10, reinit_prob=0.1)
    with pytest.raises(ValueError, match="resume with the same buffer.capacity"):
        buffer.load_state_dict(LocalReplayBuffer(capacity=32, num_classes=10, reinit_prob=0.1).state_dict())
