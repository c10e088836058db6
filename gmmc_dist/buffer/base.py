"""Replay buffer of persistent sampling chains: the interface shared by local and shared buffers.

Semantics (Algorithm 1 of the GMMC paper, with this project's choices made explicit):
- The buffer contains `capacity` chain states in [-1, 1] with one label each, and how often each state
  has been refined (its age). It starts as U(-1, 1) noise.
- `draw(batch_size, labels=None)` picks slots uniformly at random over the whole buffer, or, when
  `labels` is given (class-conditional chains, the reference code's layout), uniformly within the
  partition of each requested label; slot s belongs to class s % C. Each drawn chain is then, with
  probability rho, replaced by a fresh U(-1, 1) start whose label is uniform over the classes (or
  the requested label) and whose age is 0.
- `write_back(draw, states)` stores the refined states in the drawn slots, with the draw's labels,
  and sets each slot's age to the drawn age + 1.

Concurrency (shared buffer only, `shared.SharedReplayBuffer`): several workers draw from and write
back to the same slots without locks. A worker always sees its own earlier write-backs. When two
workers draw the same slot before either writes back, both refine the same state and the write-back
that reaches the shard last wins; the slot's age becomes drawn age + 1. The local buffer has one
writer, so the question does not arise there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class BufferDraw:
    """A batch of chains drawn from the buffer. Every tensor has batch size B first."""

    states: torch.Tensor
    """[B, 3, H, W] float32 in [-1, 1]."""
    labels: torch.Tensor
    """[B] int64, the class each chain is conditioned on."""
    slots: torch.Tensor
    """[B] int64, global slot ids to write the refined states back to."""
    ages: torch.Tensor
    """[B] int64, refinements each state has had (0 for a fresh start)."""
    reinitialised: torch.Tensor
    """[B] bool, chains replaced by fresh U(-1, 1) starts in this draw."""


class ReplayBuffer(ABC):
    """Interface of the local and the shared (Ray actor) replay buffers."""

    capacity: int
    num_classes: int

    @abstractmethod
    def draw(self, batch_size: int, labels: torch.Tensor | None = None) -> BufferDraw: ...

    @abstractmethod
    def write_back(self, draw: BufferDraw, states: torch.Tensor) -> None: ...

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abstractmethod
    def stats(self) -> dict[str, float]:
        """Counters since creation: draws, write_backs, reinitialised, mean_age."""

    def examples_per_class(self, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return up to `per_class` of the oldest states of every class, for sample grids.

        Returns (states [N, 3, H, W], labels [N]) ordered by class.
        """
        raise NotImplementedError
