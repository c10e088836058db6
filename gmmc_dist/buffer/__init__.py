"""Replay buffers of persistent sampling chains, behind one interface (`ReplayBuffer`)."""

from __future__ import annotations

import torch

from ..config import BufferConfig
from .base import BufferDraw, ReplayBuffer
from .local import LocalReplayBuffer

__all__ = [
    "BufferDraw",
    "ReplayBuffer",
    "LocalReplayBuffer",
    "build_local_buffer",
    "build_buffer",
    "BUFFER_KINDS",
]

BUFFER_KINDS = ("local", "shared")


def build_local_buffer(
    config: BufferConfig, num_classes: int, rank: int, world_size: int, device: torch.device, seed: int
) -> LocalReplayBuffer:
    """Per-worker buffer holding this rank's share, capacity // world_size, of the global capacity."""
    return LocalReplayBuffer(
        capacity=config.capacity // world_size,
        num_classes=num_classes,
        reinit_prob=config.reinit_prob,
        dtype=config.dtype,
        device=device,
        seed=seed + 7919 * rank,
    )


def build_buffer(
    config: BufferConfig,
    num_classes: int,
    rank: int,
    world_size: int,
    device: torch.device,
    seed: int,
    shared_handles=None,
) -> ReplayBuffer:
    """Build this worker's buffer of kind `config.kind`.

    "local": a buffer of capacity // world_size states in this worker's memory.
    "shared": a client of the shard actors that the driver created with
    `gmmc_dist.buffer.shared.create_shared_buffer`, whose handles it passed as `shared_handles`.
    """
    if config.kind == "local":
        return build_local_buffer(config, num_classes, rank, world_size, device, seed)
    if config.kind == "shared":
        # Imported here so the local kind does not import Ray.
        from .shared import SharedReplayBuffer, SharedBufferHandles

        if not isinstance(shared_handles, SharedBufferHandles):
            raise ValueError(
                "buffer.kind='shared' needs the shard handles: create them in the driver with "
                "gmmc_dist.buffer.shared.create_shared_buffer(...) and pass them to every worker, "
                f"for example in train_loop_config (got {type(shared_handles).__name__})"
            )
        _check_handles_match(config, num_classes, shared_handles)
        return SharedReplayBuffer(shared_handles, rank=rank, device=device, seed=seed)
    raise ValueError(f"unknown buffer.kind={config.kind!r}: choose one of {', '.join(BUFFER_KINDS)}")


def _check_handles_match(config: BufferConfig, num_classes: int, handles) -> None:
    expected = {
        "capacity": config.capacity,
        "num_shards": config.num_shards,
        "num_classes": num_classes,
        "reinit_prob": config.reinit_prob,
        "dtype": config.dtype,
    }
    found = {name: getattr(handles, name) for name in expected}
    if found != expected:
        raise ValueError(
            f"shared buffer handles were created with {found}, but this worker's config has {expected}: "
            "create the shards from the same config that the workers receive"
        )
