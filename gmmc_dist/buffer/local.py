"""Replay buffer held in the memory of one training worker."""

from __future__ import annotations

import torch

from .base import BufferDraw, ReplayBuffer

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class LocalReplayBuffer(ReplayBuffer):
    """`capacity` chain states kept on the worker's device (see `base` for the semantics).

    Draws and write-backs are batched tensor operations on that device with no host
    synchronisation, so on a GPU they stay off the critical path. States are stored in `dtype` and
    returned as float32.
    """

    def __init__(
        self,
        capacity: int,
        num_classes: int,
        reinit_prob: float,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        dtype: str = "float32",
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        if capacity < num_classes:
            raise ValueError(
                f"buffer capacity={capacity} is smaller than num_classes={num_classes}: every class needs "
                "at least one slot; raise buffer.capacity"
            )
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"reinit_prob={reinit_prob} is invalid: it must lie in [0, 1]")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"buffer dtype {dtype!r} is invalid: choose float32 or float16")
        self.capacity = capacity
        self.num_classes = num_classes
        self.reinit_prob = reinit_prob
        self.image_shape = tuple(image_shape)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.states = self._uniform(capacity).to(STORAGE_DTYPES[dtype])
        self.labels = torch.arange(capacity, device=self.device) % num_classes
        self.ages = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        # Slots of class c are c, c + C, c + 2C, ... below capacity (class-conditional draws).
        self.slots_per_class = (capacity - torch.arange(num_classes, device=self.device) + num_classes - 1) // num_classes
        self.draws = 0
        self.write_backs = 0
        self.reinitialised = torch.zeros((), dtype=torch.int64, device=self.device)

    def _uniform(self, count: int) -> torch.Tensor:
        return torch.rand(count, *self.image_shape, generator=self.generator, device=self.device) * 2 - 1

    def _pick_slots(self, batch_size: int, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            return torch.randint(self.capacity, (batch_size,), generator=self.generator, device=self.device)
        if labels.shape != (batch_size,):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({batch_size},)")
        labels = labels.to(self.device)
        uniform = torch.rand(batch_size, generator=self.generator, device=self.device)
        offsets = (uniform * self.slots_per_class[labels]).long()
        return labels + offsets * self.num_classes

    def draw(self, batch_size: int, labels: torch.Tensor | None = None) -> BufferDraw:
        slots = self._pick_slots(batch_size, labels)
        fresh = torch.rand(batch_size, generator=self.generator, device=self.device) < self.reinit_prob
        fresh_mask = fresh.view(-1, 1, 1, 1)

        states = torch.where(fresh_mask, self._uniform(batch_size), self.states[slots].float())
        ages = torch.where(fresh, 0, self.ages[slots])
        drawn_labels = self.labels[slots]
        if labels is None:
            random_labels = torch.randint(self.num_classes, (batch_size,), generator=self.generator, device=self.device)
            drawn_labels = torch.where(fresh, random_labels, drawn_labels)

        self.draws += batch_size
        self.reinitialised += fresh.sum()
        return BufferDraw(states=states, labels=drawn_labels, slots=slots, ages=ages, reinitialised=fresh)

    def write_back(self, draw: BufferDraw, states: torch.Tensor) -> None:
        self.states[draw.slots] = states.detach().to(self.states.dtype)
        self.labels[draw.slots] = draw.labels
        self.ages[draw.slots] = draw.ages + 1
        self.write_backs += len(draw.slots)

    def state_dict(self) -> dict:
        return {
            "states": self.states.cpu(),
            "labels": self.labels.cpu(),
            "ages": self.ages.cpu(),
            "generator": self.generator.get_state(),
            "counters": {"draws": self.draws, "write_backs": self.write_backs, "reinitialised": int(self.reinitialised)},
        }

    def load_state_dict(self, state: dict) -> None:
        states = state["states"]
        if tuple(states.shape) != (self.capacity, *self.image_shape):
            raise ValueError(
                f"buffer snapshot contains states of shape {tuple(states.shape)}, expected "
                f"{(self.capacity, *self.image_shape)}: resume with the same buffer.capacity and run.num_workers"
            )
        self.states = states.to(self.device, self.states.dtype)
        self.labels = state["labels"].to(self.device)
        self.ages = state["ages"].to(self.device)
        self.generator.set_state(state["generator"])
        counters = state["counters"]
        self.draws = counters["draws"]
        self.write_backs = counters["write_backs"]
        self.reinitialised.fill_(counters["reinitialised"])

    def stats(self) -> dict[str, float]:
        return {
            "draws": float(self.draws),
            "write_backs": float(self.write_backs),
            "reinitialised": float(self.reinitialised),
            "mean_age": float(self.ages.float().mean()),
        }

    def examples_per_class(self, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = []
        for label in range(self.num_classes):
            slots = (self.labels == label).nonzero().flatten()
            chosen.append(slots[self.ages[slots].argsort(descending=True)[:per_class]])
        slots = torch.cat(chosen)
        return self.states[slots].float().cpu(), self.labels[slots].cpu()
