"""Driver side of a training run: check inputs, prepare shards, start Ray, run the TorchTrainer."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from .. import storage
from ..config import Config
from ..data.shards import MANIFEST_NAME, read_manifest, write_shards
from .loop import train_loop_per_worker

logger = logging.getLogger("gmmc_dist.driver")

RAY_RUN_NAME = "train"
"""Fixed Ray Train run name under `run.output`, so that a rerun with the same output resumes."""


def absolute_locations(config: Config) -> Config:
    """Make local paths absolute: Ray workers may run in another working directory."""
    for section, key in (("data", "shards_url"), ("data", "source"), ("run", "output")):
        value = getattr(getattr(config, section), key)
        if value and storage.is_local(value) and "://" not in value and value != "download":
            setattr(getattr(config, section), key, os.path.abspath(os.path.expanduser(value)))
    return config


def storage_options_for(config: Config, url: str) -> dict[str, Any] | None:
    """Return fsspec options that send `url` to `run.s3_endpoint_url` when it is an S3 location.

    The driver passes these options explicitly instead of changing its own environment, so a
    process that calls `run_training` keeps its settings. The s3fs filesystem that Ray Train
    receives is pickled with these options, so Ray's own checkpoint uploads use the endpoint too.
    """
    endpoint = config.run.s3_endpoint_url
    if endpoint and storage.protocol_of(url) in storage.S3_PROTOCOLS:
        return {"endpoint_url": endpoint}
    return None


def prepare_shards(config: Config) -> None:
    """Convert `data.source` into shards when `data.shards_url` has no manifest; check the manifest."""
    data = config.data
    options = storage_options_for(config, data.shards_url)
    manifest_url = storage.join(data.shards_url, MANIFEST_NAME)
    if not storage.exists(manifest_url, options):
        if not data.source:
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} under data.shards_url={storage.redact(data.shards_url)}: run "
                "jobs/prepare_data.py first, or set data.source to the raw data (an ImageFolder tree such as "
                "cifar10/ with train/ and test/, or an official archive) to convert it now"
            )
        from ..data.readers import open_source

        source_path = download_source(data.dataset) if data.source == "download" else data.source
        logger.info("converting %s into shards under %s", source_path, storage.redact(data.shards_url))
        write_shards(open_source(source_path), data.shards_url, data.dataset, storage_options=options)
    manifest = read_manifest(data.shards_url, options)
    for split in (data.train_split, data.test_split):
        if split not in manifest.splits:
            raise ValueError(
                f"split {split!r} is missing from {storage.redact(manifest_url)} (it has "
                f"{', '.join(manifest.splits)}); set data.train_split / data.test_split or rebuild the shards"
            )
    if len(manifest.class_names) != config.model.num_classes:
        raise ValueError(
            f"the shards have {len(manifest.class_names)} classes but model.num_classes="
            f"{config.model.num_classes}: set model.num_classes={len(manifest.class_names)}"
        )


def download_source(dataset: str) -> str:
    """Download the official archive with torchvision into data/raw (needs internet access)."""
    import torchvision

    root = os.path.abspath(os.path.join("data", "raw"))
    classes = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
    if dataset in classes:
        dataset_class = classes[dataset]
        dataset_class(root, train=True, download=True)
        return os.path.join(root, dataset_class.base_folder)
    if dataset == "svhn":
        for split in ("train", "test"):
            torchvision.datasets.SVHN(os.path.join(root, "svhn"), split=split, download=True)
        return os.path.join(root, "svhn")
    raise ValueError(f"no download is known for data.dataset={dataset!r}")


def connect_ray(address: str) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        ray.init()


def build_trainer(
    config: Config, loop_config: dict[str, Any] | None = None, run_name: str = RAY_RUN_NAME,
    callbacks: list | None = None,
) -> TorchTrainer:
    """Build a TorchTrainer around `train_loop_per_worker` that stores checkpoints under `run.output`."""
    filesystem, path = storage.arrow_filesystem(config.run.output, storage_options_for(config, config.run.output))
    resources = {"CPU": config.run.cpus_per_worker}
    if config.run.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), **(loop_config or {})},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.run.num_workers, use_gpu=config.run.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


@contextlib.contextmanager
def restored_sigint_handler() -> Iterator[None]:
    """Put back the caller's SIGINT handler after `fit()`.

    Ray Train 2.60 leaves its own handler installed when `fit()` returns, so Ctrl-C would no longer
    stop a process that trains in-process (a notebook, a benchmark script).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def shared_buffer_actors(config: Config) -> Iterator[dict[str, Any]]:
    """Create the shared replay buffer's shard actors when `buffer.kind` is "shared".

    Yields the extra `train_loop_config` entries (empty for a local buffer) and deletes the actors
    afterwards. The actors are created here, not in a worker, so that they outlive worker-group
    restarts. They reload the latest snapshot under <output>/buffer when a rerun resumes.
    """
    if not (config.uses_sampling and config.buffer.kind == "shared"):
        yield {}
        return
    from ..buffer.shared import create_shared_buffer, delete_shared_buffer

    handles = create_shared_buffer(
        config.buffer, config.model.num_classes, snapshot_root=storage.join(config.run.output, "buffer"),
        seed=config.train.seed, storage_options=storage_options_for(config, config.run.output),
    )
    try:
        yield {"shared_buffer": handles}
    finally:
        delete_shared_buffer(handles)


def run_training(config: Config) -> dict[str, Any]:
    """Run a whole training job and return the final figures from `metrics.json`."""
    config = absolute_locations(config)
    output_options = storage_options_for(config, config.run.output)
    storage.ensure_writable(config.run.output, output_options)
    prepare_shards(config)
    connect_ray(config.run.ray_address)
    logger.info("training %s on %d worker(s); output %s", config.train.objective, config.run.num_workers,
                storage.redact(config.run.output))
    with shared_buffer_actors(config) as loop_config, restored_sigint_handler():
        result = build_trainer(config, loop_config).fit()
    if result.error is not None:
        raise result.error
    metrics = json.loads(storage.read_bytes(storage.join(config.run.output, "metrics.json"), output_options))
    return metrics
