"""Replay buffer held in the memory of one training worker."""

from __future__ import annotations

import torch

from .base import BufferDraw, ReplayBuffer

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class LocalReplayBuffer(ReplayBuffer):
    """`capacity` chain states on the host, drawn and written back in batches (see `base` for the
    semantics). States are kept in `dtype` and returned as float32 on `device`."""

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
        if capacity < 1:
            raise ValueError(f"buffer capacity={capacity} is invalid: it must be at least 1")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"reinit_prob={reinit_prob} is invalid: it must lie in [0, 1]")
        if dtype not in _DTYPES:
            raise ValueError(f"buffer dtype {dtype!r} is invalid: choose float32 or float16")
        self.capacity = capacity
        self.num_classes = num_classes
        self.reinit_prob = reinit_prob
        self.image_shape = tuple(image_shape)
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.states = (torch.rand(capacity, *image_shape, generator=self.generator) * 2 - 1).to(_DTYPES[dtype])
        self.labels = torch.arange(capacity) % num_classes
        self.ages = torch.zeros(capacity, dtype=torch.int64)
        self.counters = {"draws": 0, "write_backs": 0, "reinitialised": 0}

    def _pick_slots(self, batch_size: int, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            return torch.randint(self.capacity, (batch_size,), generator=self.generator)
        labels = labels.cpu()
        if labels.shape != (batch_size,):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({batch_size},)")
        # Slots of class c are c, c + C, c + 2C, ... below capacity.
        per_class = (self.capacity - labels + self.num_classes - 1) // self.num_classes
        if bool((per_class <= 0).any()):
            raise ValueError(f"buffer capacity {self.capacity} leaves some of {self.num_classes} classes without slots")
        offsets = (torch.rand(batch_size, generator=self.generator) * per_class).long()
        return labels + offsets * self.num_classes

    def draw(self, batch_size: int, labels: torch.Tensor | None = None) -> BufferDraw:
        slots = self._pick_slots(batch_size, labels)
        states = self.states[slots].float()
        drawn_labels = self.labels[slots].clone()
        ages = self.ages[slots].clone()

        fresh = torch.rand(batch_size, generator=self.generator) < self.reinit_prob
        count = int(fresh.sum())
        if count:
            states[fresh] = torch.rand(count, *self.image_shape, generator=self.generator) * 2 - 1
            ages[fresh] = 0
            if labels is None:
                drawn_labels[fresh] = torch.randint(self.num_classes, (count,), generator=self.generator)
        self.counters["draws"] += batch_size
        self.counters["reinitialised"] += count
        return BufferDraw(
            states=states.to(self.device, non_blocking=True),
            labels=drawn_labels.to(self.device, non_blocking=True),
            slots=slots,
            ages=ages,
            reinitialised=fresh,
        )

    def write_back(self, draw: BufferDraw, states: torch.Tensor) -> None:
        slots = draw.slots.cpu()
        self.states[slots] = states.detach().to("cpu", self.states.dtype)
        self.labels[slots] = draw.labels.cpu()
        self.ages[slots] = draw.ages.cpu() + 1
        self.counters["write_backs"] += len(slots)

    def state_dict(self) -> dict:
        return {
            "states": self.states,
            "labels": self.labels,
            "ages": self.ages,
            "generator": self.generator.get_state(),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        states = state["states"]
        if tuple(states.shape) != (self.capacity, *self.image_shape):
            raise ValueError(
                f"buffer snapshot holds states of shape {tuple(states.shape)}, expected "
                f"{(self.capacity, *self.image_shape)}: resume with the same buffer.capacity and num_workers"
            )
        self.states = states.to(self.states.dtype).clone()
        self.labels = state["labels"].clone()
        self.ages = state["ages"].clone()
        self.generator.set_state(state["generator"])
        self.counters = dict(state["counters"])

    def stats(self) -> dict[str, float]:
        return {**{k: float(v) for k, v in self.counters.items()}, "mean_age": float(self.ages.float().mean())}

    def examples_per_class(self, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = []
        for label in range(self.num_classes):
            slots = (self.labels == label).nonzero().flatten()
            oldest = slots[self.ages[slots].argsort(descending=True)[:per_class]]
            chosen.append(oldest)
        slots = torch.cat(chosen)
        return self.states[slots].float(), self.labels[slots]
