"""Stream shards written by `gmmc_dist.data.shards` into PyTorch batches for DDP training and evaluation.

Shard URLs are local paths or `s3://` URLs. Importing this module registers an `s3` handler in
`webdataset.gopen_schemes`. The handler opens each shard with s3fs inside the process that reads it,
so each DataLoader worker gets its own client, and it retries transient read errors.

Batches are `(images, labels)` with images `float32 [B, 3, 32, 32]` scaled to [-1, 1] and labels
`int64 [B]` (`-1` for unlabeled sets).
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gmmc_dist import storage
from gmmc_dist.data.shards import Manifest, read_manifest

logger = logging.getLogger(__name__)

READ_ATTEMPTS = 4
READ_BACKOFF_SECONDS = 0.5
DEFAULT_SHUFFLE_BUFFER = 1000


# ---------------------------------------------------------------------------------------------
# Opening shards
# ---------------------------------------------------------------------------------------------


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    try:
        import botocore.exceptions

        errors.append(botocore.exceptions.BotoCoreError)
    except ImportError:
        pass
    return tuple(errors)


def open_s3_shard(url: str, mode: str = "rb", bufsize: int = 8192, storage_options: Mapping[str, Any] | None = None):
    """Read a whole shard from S3 into memory and return it as a binary stream.

    Registered as `webdataset.gopen_schemes["s3"]`. Missing objects and denied access raise at once.
    Other OS, connection and botocore errors are retried up to `READ_ATTEMPTS` times with
    exponential backoff, and each retry is logged.
    """
    if mode != "rb":
        raise ValueError(f"shard {storage.redact(url)} can only be opened for reading ('rb'), not {mode!r}")
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            fs, path = storage.resolve(url, storage_options)
            return io.BytesIO(fs.cat_file(path))
        except (FileNotFoundError, PermissionError):
            raise
        except _transient_errors() as error:
            if attempt == READ_ATTEMPTS:
                raise
            delay = READ_BACKOFF_SECONDS * 2 ** (attempt - 1)
            logger.warning(
                "reading shard %s failed (attempt %d of %d): %r; retrying in %.1f s",
                storage.redact(url), attempt, READ_ATTEMPTS, error, delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


wds.gopen_schemes["s3"] = open_s3_shard


def iter_shard(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[dict]:
    """Yield the raw samples (dicts with `__key__`, `png`, `cls`) of one shard in file order."""
    streams = wds.tariterators.url_opener([{"url": url}], storage_options=storage_options)
    files = wds.tariterators.tar_file_expander(streams)
    yield from wds.tariterators.group_by_keys(files)


def decode_sample(sample: dict) -> tuple[np.ndarray, int]:
    with Image.open(io.BytesIO(sample["png"])) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return pixels, int(sample["cls"])


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """Convert `uint8 [B, 32, 32, 3]` to `float32 [B, 3, 32, 32]` in [-1, 1] (0 -> -1, 255 -> 1)."""
    scaled = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(0, 3, 1, 2)))


def _open_manifest(shards_url: str, split: str, storage_options) -> Manifest:
    manifest = read_manifest(shards_url, storage_options)
    manifest.split(split)
    return manifest


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {name} {value!r}: give a positive integer")


def _check_rank(rank: int, world_size: int, num_workers: int) -> None:
    _check_positive("world_size", world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank!r} for world_size {world_size}: give 0 <= rank < world_size")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"invalid num_workers {num_workers!r}: give 0 (read in the main process) or more")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def augment(images: np.ndarray, rng: np.random.Generator, pad: int, flip: bool, noise_std: float) -> torch.Tensor:
    """Apply the training transform to `uint8 [B, 32, 32, 3]`, returning `float32 [B, 3, 32, 32]`.

    Steps: reflect-pad by `pad` pixels and crop a random 32x32 window, flip horizontally with
    probability 1/2 when `flip`, scale to [-1, 1], add Gaussian noise with standard deviation `noise_std`.
    """
    count, height, width, _ = images.shape
    if pad > 0:
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        tops = rng.integers(0, 2 * pad + 1, size=count)
        lefts = rng.integers(0, 2 * pad + 1, size=count)
        rows = tops[:, None] + np.arange(height)[None, :]
        cols = lefts[:, None] + np.arange(width)[None, :]
        images = padded[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        flipped = rng.random(count) < 0.5
        images = np.where(flipped[:, None, None, None], images[:, :, ::-1], images)
    batch = to_unit_range(images)
    if noise_std > 0:
        noise = rng.standard_normal(batch.shape, dtype=np.float32) * np.float32(noise_std)
        batch += torch.from_numpy(noise)
    return batch


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """Return the `[start, stop)` range of part `index` when `total` items are split into `parts`."""
    return total * index // parts, total * (index + 1) // parts


class TrainStream(IterableDataset):
    """Fixed-length stream of augmented training batches for one DDP rank.

    Shard assignment: the split's shards are cut into `parts` strided sub-shards (sample i of a shard
    goes to part i % parts, with `parts = ceil(slots / shards)` so there are at least as many
    sub-shards as reader slots, where slots = world_size x loader workers). The sub-shard list is
    permuted with a generator seeded by `(seed, epoch)`, identically on every rank, and slot `s`
    owns positions `s, s + slots, s + 2 * slots, ...` of it. A slot whose own sub-shards hold fewer
    samples than its quota of batches needs tops up from the following positions, wrapping around,
    by exactly the missing number of samples. So every rank yields exactly `steps` full batches even
    when the shard count does not divide by the slots. The cost: in one epoch the top-up samples
    are seen twice, and the samples left over in other slots are not seen.
    """

    def __init__(self, shard_urls: Sequence[str], shard_counts: Sequence[int], steps: int, batch_size: int,
                 rank: int, world_size: int, loader_workers: int, seed: int, epoch: int, pad: int, flip: bool,
                 noise_std: float, shuffle_buffer: int, storage_options: Mapping[str, Any] | None):
        super().__init__()
        self.shard_urls = list(shard_urls)
        self.shard_counts = list(shard_counts)
        self.steps = steps
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.loader_workers = max(1, loader_workers)
        self.seed = seed
        self.epoch = epoch
        self.pad = pad
        self.flip = flip
        self.noise_std = noise_std
        self.shuffle_buffer = shuffle_buffer
        self.storage_options = dict(storage_options) if storage_options else None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        quota = self.steps // self.loader_workers + (1 if worker < self.steps % self.loader_workers else 0)
        if quota == 0:
            return
        samples = self._slot_samples(self.rank * self.loader_workers + worker, quota * self.batch_size)
        stream_id = (self.seed, self.epoch, self.rank, worker)
        initial = min(100, self.shuffle_buffer)
        shuffled = wds.filters.shuffle(self.shuffle_buffer, initial, rng=random.Random(str(stream_id)))(samples)
        rng = np.random.default_rng(list(stream_id))
        for _ in range(quota):
            images, labels = [], []
            for image, label in shuffled:
                images.append(image)
                labels.append(label)
                if len(images) == self.batch_size:
                    break
            if len(images) < self.batch_size:
                raise RuntimeError(f"training stream of rank {self.rank} worker {worker} ran out of samples")
            batch = augment(np.stack(images), rng, self.pad, self.flip, self.noise_std)
            yield batch, torch.tensor(labels, dtype=torch.int64)

    def _slot_samples(self, slot: int, needed: int) -> Iterator[tuple[np.ndarray, int]]:
        """Yield the samples of slot `slot`'s own sub-shards, then top up to `needed` samples."""
        slots = self.world_size * self.loader_workers
        parts = math.ceil(slots / len(self.shard_urls))
        sub_shards = [(shard, part, parts) for shard in range(len(self.shard_urls)) for part in range(parts)]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(sub_shards))
        own = [sub_shards[order[position]] for position in range(slot, len(order), slots)]
        available = sum(self._sub_shard_size(*sub_shard) for sub_shard in own)
        yield from self._read(own)
        if available < needed:
            top_up = (sub_shards[order[(slot + step * slots) % len(order)]] for step in itertools.count(len(own)))
            yield from itertools.islice(self._read(top_up), needed - available)

    def _sub_shard_size(self, shard: int, part: int, parts: int) -> int:
        return max(0, -(-(self.shard_counts[shard] - part) // parts))

    def _read(self, sub_shards: Iterable[tuple[int, int, int]]) -> Iterator[tuple[np.ndarray, int]]:
        empty_in_a_row = 0
        for shard, part, parts in sub_shards:
            yielded = 0
            for position, sample in enumerate(iter_shard(self.shard_urls[shard], self.storage_options)):
                if position % parts == part:
                    yielded += 1
                    yield decode_sample(sample)
            empty_in_a_row = 0 if yielded else empty_in_a_row + 1
            if empty_in_a_row > len(self.shard_urls) * parts:
                raise RuntimeError(f"training shards such as {self.shard_urls[0]} yielded no samples in a full pass")


def make_train_loader(
    shards_url: str,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    epoch: int,
    pad: int = 4,
    flip: bool = True,
    noise_std: float = 0.03,
    max_samples: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
) -> DataLoader:
    """Return a DataLoader over augmented training batches for one DDP rank and one epoch.

    `len(loader)` is `floor(min(count, max_samples) / (batch_size * world_size))` on every rank, and
    every batch has exactly `batch_size` samples, so all ranks run the same number of steps.
    `max_samples` shortens the epoch; its samples still come from the whole split. Shard order,
    the shuffle buffer and augmentation are seeded by `(seed, epoch)` plus rank and worker, so
    each epoch has a new order and a rerun with the same arguments gives the same batches. Pass
    `flip=False` for SVHN, where mirrored digits are not valid digits.
    """
    _check_positive("batch_size", batch_size)
    _check_rank(rank, world_size, num_workers)
    if pad < 0:
        raise ValueError(f"invalid pad {pad!r}: give 0 or a positive number of pixels")
    if noise_std < 0:
        raise ValueError(f"invalid noise_std {noise_std!r}: give 0 or a positive standard deviation")
    _check_positive("shuffle_buffer", shuffle_buffer)
    manifest = _open_manifest(shards_url, split, storage_options)
    info = manifest.split(split)
    if manifest.dataset == "svhn" and flip:
        logger.warning("horizontal flips are on for SVHN, whose mirrored digits are not digits: pass flip=False")
    if max_samples is not None:
        _check_positive("max_samples", max_samples)
    used = info.count if max_samples is None else min(info.count, max_samples)
    steps = used // (batch_size * world_size)
    if steps < 1:
        raise ValueError(
            f"split {split!r} under {storage.redact(shards_url)} has {used} usable samples, fewer than one global "
            f"batch of batch_size x world_size = {batch_size} x {world_size}: lower the batch size"
        )
    dataset = TrainStream(
        manifest.shard_urls(shards_url, split), [shard.count for shard in info.shards], steps, batch_size,
        rank, world_size, num_workers, seed, epoch, pad, flip, noise_std, shuffle_buffer, storage_options,
    )
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=False)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


class EvalStream(IterableDataset):
    """Samples `[start, stop)` of a split, in manifest order, for one rank; split again by loader worker.

    The global order is: shards in manifest order, samples in file order. Each rank takes a
    contiguous range of that order, and within a rank each loader worker takes a contiguous
    sub-range, so every sample is read by exactly one worker of one rank.
    """

    def __init__(self, shard_urls: Sequence[str], shard_counts: Sequence[int], start: int, stop: int,
                 batch_size: int, loader_workers: int, return_keys: bool, storage_options):
        super().__init__()
        self.shard_urls = list(shard_urls)
        self.shard_counts = list(shard_counts)
        self.start, self.stop = start, stop
        self.batch_size = batch_size
        self.loader_workers = max(1, loader_workers)
        self.return_keys = return_keys
        self.storage_options = dict(storage_options) if storage_options else None

    def __len__(self) -> int:
        # Batches per worker are rounded up separately, so sum them per worker.
        total = 0
        for worker in range(self.loader_workers):
            low, high = split_evenly(self.stop - self.start, self.loader_workers, worker)
            total += math.ceil((high - low) / self.batch_size)
        return total

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        low, high = split_evenly(self.stop - self.start, self.loader_workers, worker)
        yield from self._batches(self.start + low, self.start + high)

    def _batches(self, start: int, stop: int):
        images, labels, keys = [], [], []
        for key, image, label in self._samples(start, stop):
            images.append(image)
            labels.append(label)
            keys.append(key)
            if len(images) == self.batch_size:
                yield self._collate(images, labels, keys)
                images, labels, keys = [], [], []
        if images:
            yield self._collate(images, labels, keys)

    def _collate(self, images, labels, keys):
        batch = (to_unit_range(np.stack(images)), torch.tensor(labels, dtype=torch.int64))
        return batch + (keys,) if self.return_keys else batch

    def _samples(self, start: int, stop: int):
        offset = 0
        for url, count in zip(self.shard_urls, self.shard_counts):
            if offset >= stop:
                break
            if offset + count > start:
                for position, sample in enumerate(iter_shard(url, self.storage_options)):
                    index = offset + position
                    if index >= stop:
                        break
                    if index >= start:
                        image, label = decode_sample(sample)
                        yield sample["__key__"], image, label
            offset += count


def make_eval_loader(
    shards_url: str,
    split: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    return_keys: bool = False,
) -> DataLoader:
    """Return a DataLoader that yields every sample of `split` exactly once across all ranks.

    No augmentation; images are only scaled to [-1, 1]. The order is deterministic for given
    `world_size`, `num_workers` and `batch_size`. Ranks get sample counts that differ by at most
    one, so their batch counts can differ by one: reduce metrics once after the loop, not per batch.
    With `return_keys`, batches are `(images, labels, keys)` with the sample keys from the shards.
    """
    _check_positive("batch_size", batch_size)
    _check_rank(rank, world_size, num_workers)
    manifest = _open_manifest(shards_url, split, storage_options)
    info = manifest.split(split)
    start, stop = split_evenly(info.count, world_size, rank)
    dataset = EvalStream(
        manifest.shard_urls(shards_url, split), [shard.count for shard in info.shards], start, stop,
        batch_size, num_workers, return_keys, storage_options,
    )
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=False)


def load_split_tensors(
    shards_url: str,
    split: str,
    limit: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the first `limit` samples (default: all) of a split in manifest order, in this process.

    Returns `images float32 [N, 3, 32, 32]` in [-1, 1] and `labels int64 [N]`. Meant for small sets.
    """
    if limit is not None:
        _check_positive("limit", limit)
    manifest = _open_manifest(shards_url, split, storage_options)
    info = manifest.split(split)
    stop = info.count if limit is None else min(limit, info.count)
    stream = EvalStream(
        manifest.shard_urls(shards_url, split), [shard.count for shard in info.shards], 0, stop,
        max(1, stop), 0, False, storage_options,
    )
    batches = list(stream)
    if not batches:
        return torch.empty((0, 3, 32, 32), dtype=torch.float32), torch.empty((0,), dtype=torch.int64)
    return batches[0]
