"""Checkpoints and final model files, readable with `torch.load(..., weights_only=True)` only.

Layout of a run's output location (a local folder or any fsspec URL):
    model.pt                          final model with its estimated gamma^2 (`save_model_file`)
    metrics.json, samples.png         final figures and buffer samples
    train/checkpoint_<time>/state.pt  training state reported through Ray Train (rank 0)
    train/checkpoint_<time>/buffer-rank<r>.pt  each rank's local replay buffer
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from torch import nn

from . import __version__, storage
from .config import Config
from .models import build_model

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"


def _dump(payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_payload(url: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written by this module, with weights-only unpickling.

    Raises FileNotFoundError for a missing file and ValueError for a corrupt or foreign one.
    """
    data = storage.read_bytes(url)
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise ValueError(
            f"checkpoint {storage.redact(url)} is corrupt or not a gmmc_dist file ({type(error).__name__}: "
            f"{error}); point to a model.pt or checkpoint folder written by jobs/train.py"
        ) from error
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"{storage.redact(url)} is not a gmmc_dist checkpoint: it has no 'format' entry")
    if payload["format"] > FORMAT_VERSION:
        raise ValueError(
            f"{storage.redact(url)} has checkpoint format {payload['format']}, newer than this "
            f"gmmc_dist ({__version__}, format {FORMAT_VERSION}); upgrade gmmc_dist"
        )
    return payload


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: Config,
    step: int,
    epoch: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything rank 0 needs to resume: model, optimiser, scheduler, counters, config, RNG."""
    state = {
        "format": FORMAT_VERSION,
        "version": __version__,
        "kind": "training_state",
        "config": config.to_dict(),
        "family": model.family,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "epoch": epoch,
        "rng": {"torch": torch.get_rng_state()},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    state.update(extra or {})
    return state


def write_local(folder: str, name: str, payload: dict[str, Any]) -> None:
    storage.write_bytes_atomic(os.path.join(folder, name), _dump(payload))


def save_model_file(url: str, model: nn.Module, config: Config, metrics: dict[str, Any] | None = None) -> None:
    """Write the final model (weights, gamma^2, config) atomically to `url`."""
    payload = {
        "format": FORMAT_VERSION,
        "version": __version__,
        "kind": "model",
        "config": config.to_dict(),
        "family": model.family,
        "model": model.state_dict(),
        "metrics": dict(metrics or {}),
    }
    storage.write_bytes_atomic(url, _dump(payload))


def find_model_file(url: str) -> str:
    """Resolve a model file, a checkpoint folder or a run output folder to one file URL."""
    fs, path = storage.resolve(url)
    if fs.isfile(path):
        return url
    if not fs.isdir(path):
        raise FileNotFoundError(
            f"checkpoint not found: {storage.redact(url)}; give a model.pt file, a checkpoint folder or a "
            "run output folder written by jobs/train.py"
        )
    for name in (MODEL_FILE, STATE_FILE):
        if fs.isfile(f"{path.rstrip('/')}/{name}"):
            return storage.join(url, name)
    states = sorted(fs.glob(f"{path.rstrip('/')}/*/checkpoint_*/{STATE_FILE}"))
    if states:
        relative = states[-1][len(path.rstrip("/")) + 1:]
        return storage.join(url, *relative.split("/"))
    raise FileNotFoundError(
        f"no {MODEL_FILE} or {STATE_FILE} under {storage.redact(url)}; train a model with jobs/train.py "
        "or point to its output folder"
    )


def load_model(url: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Load a model and its config from a model file, a checkpoint folder or a run output folder."""
    file_url = find_model_file(url)
    payload = load_payload(file_url, map_location)
    config = Config.from_dict(payload["config"])
    model = build_model(config.model, payload.get("family", config.model_family))
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError) as error:
        raise ValueError(f"checkpoint {storage.redact(file_url)} does not match its own config: {error}") from error
    return model.to(map_location), config
