"""Replay buffer shared by all training workers, held by K Ray actors (shards).

Layout: the global buffer has `capacity` slots. Shard k contains the contiguous global slots
[k S, (k + 1) S) with S = capacity / K, so global slot s lives in shard s // S at local index s - k S.
Slot s belongs to class s % C, as in the local buffer. States are stored as numpy arrays in the
shard's storage dtype and travel through Ray's object store.

Driver side (the process that calls `TorchTrainer.fit()`):
    handles = create_shared_buffer(config.buffer, num_classes, snapshot_root)
    ... train_loop_config={"shared_buffer": handles, ...}
    delete_shared_buffer(handles)
Worker side:
    buffer = SharedReplayBuffer(handles, rank, device, seed)   # or build_buffer(...)

Draws. A batch of B chains is split across shards at random. Each chain independently picks shard k
with probability (slots of its class in shard k) / (slots of its class in the buffer), or 1 / K for
unconditional draws, and the shard then picks a slot uniformly among those. Every chain is therefore a
uniform draw over the global buffer (or over its class). Each shard then reinitialises a chain with
probability rho; the worker fills reinitialised chains with fresh U(-1, 1) states in float32.

Concurrency. A shard runs one call at a time, and Ray runs the calls of one caller to one actor in
submission order, so each worker reads its own earlier write-backs. Between workers there is no
locking: two workers that draw the same slot in the same step both refine the same state, and the
write-back that reaches the shard last wins (last write wins). Both carry the same drawn age, so the
slot's age becomes drawn age + 1, not + 2. Within one write-back batch a repeated slot keeps its last
row. Each slot has a version that every write increments; a write-back whose drawn version is no
longer current (or a repeated row) is counted in `stale_write_backs`.

Prefetch. After `write_back` of an unconditional batch, the worker requests the next draw of the same
size at once, so it is served while the worker computes the loss; `draw` then only collects it.
Because the request follows the write-back, the prefetched draw already sees this worker's refined
states. Class-conditional draws need the next labels: pass them to `prefetch(batch_size, labels)`.

Snapshot layout under a folder URL (any fsspec location):
    <url>/shard-00000-of-00002.npz   states, labels, ages, chain_ids, versions, counters, layout
    <url>/manifest.json              capacity, num_shards, num_classes, image_shape, dtype, step
    <snapshot_root>/latest.json      {"kind": "shared", "url": <url>, "step": <step>}
`snapshot(step)` writes to <snapshot_root>/step-<step, 9 digits>. A shard restarted by Ray
(`max_restarts`) reloads the snapshot named by latest.json in `__init__`.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
import warnings
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from .. import storage
from ..config import BufferConfig
from .base import BufferDraw, ReplayBuffer

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
SNAPSHOT_FORMAT = 1
LATEST_FILE = "latest.json"
MANIFEST_FILE = "manifest.json"
_COUNTER_NAMES = ("draws", "write_backs", "reinitialised", "stale_write_backs")


def shard_file_name(shard_index: int, num_shards: int) -> str:
    return f"shard-{shard_index:05d}-of-{num_shards:05d}.npz"


def step_folder_name(step: int) -> str:
    return f"step-{step:09d}"


def check_layout(capacity: int, num_shards: int, num_classes: int, reinit_prob: float, dtype: str) -> None:
    """Raise ValueError unless the shared buffer's sizes and settings are consistent."""
    if capacity < 1:
        raise ValueError(f"buffer.capacity={capacity} is invalid: it must be at least 1")
    if num_shards < 1:
        raise ValueError(f"buffer.num_shards={num_shards} is invalid: it must be at least 1")
    if num_shards > capacity:
        raise ValueError(
            f"buffer.num_shards={num_shards} exceeds buffer.capacity={capacity}: every shard needs at "
            "least one slot, so lower num_shards"
        )
    if capacity % num_shards:
        lower = capacity - capacity % num_shards
        raise ValueError(
            f"buffer.capacity={capacity} is not divisible by buffer.num_shards={num_shards}: shards must "
            f"hold equal numbers of slots; use capacity {lower} or {lower + num_shards}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} is invalid: it must be at least 1")
    if not 0.0 <= reinit_prob <= 1.0:
        raise ValueError(f"buffer.reinit_prob={reinit_prob} is invalid: it must lie in [0, 1]")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"buffer.dtype={dtype!r} is invalid: choose float32 or float16")


def class_slot_counts(capacity: int, num_shards: int, num_classes: int) -> np.ndarray:
    """[K, C] int64: how many slots of class c (global slots s with s % C == c) shard k holds."""
    shard_capacity = capacity // num_shards
    counts = np.zeros((num_shards, num_classes), dtype=np.int64)
    for k in range(num_shards):
        first = np.arange(num_classes) - k * shard_capacity
        first %= num_classes
        counts[k] = np.maximum(0, (shard_capacity - first + num_classes - 1) // num_classes)
    return counts


# ----------------------------------------------------------------------------------------------
# Shard actor


class BufferShard:
    """One shard: capacity / K chain states of the shared buffer and their bookkeeping.

    Per slot it stores the state, the label, the age (refinements since the chain started), a chain
    id and a version. Initial chains have chain id = global slot id; a reinitialised chain gets the
    new id capacity + k + K n (shard k, n-th new chain of that shard), so ids are unique across
    shards. Run it as a Ray actor (`ray.remote(BufferShard)`); every method handles a whole batch.
    """

    def __init__(
        self,
        shard_index: int,
        num_shards: int,
        capacity: int,
        num_classes: int,
        reinit_prob: float,
        image_shape: tuple[int, ...] = (3, 32, 32),
        dtype: str = "float32",
        seed: int = 0,
        snapshot_root: str | None = None,
        load_latest: bool = True,
        storage_options: dict | None = None,
    ):
        check_layout(capacity, num_shards, num_classes, reinit_prob, dtype)
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index={shard_index} is invalid for num_shards={num_shards}")
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.capacity = capacity
        self.num_classes = num_classes
        self.reinit_prob = reinit_prob
        self.image_shape = tuple(image_shape)
        self.dtype = dtype
        self.seed = seed
        self.snapshot_root = snapshot_root
        self.storage_options = storage_options
        self.shard_capacity = capacity // num_shards
        self.offset = shard_index * self.shard_capacity
        self.rng = np.random.default_rng([seed, shard_index])
        self.loaded_from: str | None = None

        # Local index of the first slot of each class, and the number of such slots.
        self.class_first = (np.arange(num_classes) - self.offset) % num_classes
        self.class_count = class_slot_counts(capacity, num_shards, num_classes)[shard_index]
        self._init_fresh()

        # Ray re-runs __init__ when it restarts the actor (max_restarts): reload the latest snapshot.
        with warnings.catch_warnings():
            # Ray 2.60 warns about a deprecated call inside this property, not about the property.
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
        self.restarted = bool(restarted)
        if snapshot_root and (load_latest or restarted):
            reference = read_latest_reference(snapshot_root, storage_options)
            if reference is not None:
                self.load_snapshot(reference["url"])
                logger.info("buffer shard %d loaded snapshot %s (restarted: %s)",
                            shard_index, storage.redact(reference["url"]), restarted)

    def _init_fresh(self) -> None:
        size = (self.shard_capacity, *self.image_shape)
        states = self.rng.random(size, dtype=np.float32)
        states *= 2.0
        states -= 1.0
        global_slots = self.offset + np.arange(self.shard_capacity, dtype=np.int64)
        self.states = states.astype(STORAGE_DTYPES[self.dtype], copy=False)
        self.labels = global_slots % self.num_classes
        self.ages = np.zeros(self.shard_capacity, dtype=np.int64)
        self.chain_ids = global_slots.copy()
        self.versions = np.zeros(self.shard_capacity, dtype=np.int64)
        self.new_chains = 0
        self.counters = dict.fromkeys(_COUNTER_NAMES, 0)

    def describe(self) -> dict[str, Any]:
        return {
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "capacity": self.capacity,
            "shard_capacity": self.shard_capacity,
            "num_classes": self.num_classes,
            "image_shape": self.image_shape,
            "dtype": self.dtype,
            "loaded_from": self.loaded_from,
            "restarted": self.restarted,
        }

    def draw(self, batch_size: int, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Draw `batch_size` slots uniformly (within the requested labels' classes if given).

        Returns a dict of arrays: global `slots`, `states`, `labels`, `ages`, `chain_ids`, `versions`
        and the bool mask `fresh`. `states` are in the storage dtype, and rows of reinitialised
        chains still contain the old state, which the caller replaces. In a class-conditional draw
        `labels` are the requested ones.
        """
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
        local = self._pick_local_slots(batch_size, labels)
        drawn = {
            "slots": local + self.offset,
            "states": self.states[local],
            "labels": self.labels[local],
            "ages": self.ages[local],
            "chain_ids": self.chain_ids[local],
            "versions": self.versions[local],
        }
        if labels is not None:
            # The requested label, which equals the stored one unless unconditional draws relabelled the slot.
            drawn["labels"] = labels.copy()
        fresh = self.rng.random(batch_size) < self.reinit_prob
        count = int(fresh.sum())
        if count:
            drawn["ages"][fresh] = 0
            drawn["chain_ids"][fresh] = self._allocate_chain_ids(count)
            if labels is None:
                drawn["labels"][fresh] = self.rng.integers(self.num_classes, size=count)
        drawn["fresh"] = fresh
        self.counters["draws"] += batch_size
        self.counters["reinitialised"] += count
        return drawn

    def _pick_local_slots(self, batch_size: int, labels: np.ndarray | None) -> np.ndarray:
        if labels is None:
            return self.rng.integers(self.shard_capacity, size=batch_size)
        if labels.shape != (batch_size,):
            raise ValueError(f"labels have shape {labels.shape}, expected ({batch_size},)")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        counts = self.class_count[labels]
        if (counts <= 0).any():
            missing = sorted(set(labels[counts <= 0].tolist()))
            raise ValueError(f"buffer shard {self.shard_index} has no slots of classes {missing}")
        return self.class_first[labels] + self.num_classes * self.rng.integers(counts)

    def _allocate_chain_ids(self, count: int) -> np.ndarray:
        serial = self.new_chains + np.arange(count, dtype=np.int64)
        self.new_chains += count
        return self.capacity + self.shard_index + self.num_shards * serial

    def write_back(
        self,
        slots: np.ndarray,
        states: np.ndarray,
        labels: np.ndarray,
        ages: np.ndarray,
        chain_ids: np.ndarray,
        versions: np.ndarray,
    ) -> int:
        """Store refined chains in global `slots`, with the `ages` to store (drawn age + 1).

        `versions` are the slot versions seen at draw time. The last row wins for a slot repeated
        in the batch. Returns how many rows were stale (see the module docstring).
        """
        local = np.asarray(slots, dtype=np.int64) - self.offset
        if local.size and (local.min() < 0 or local.max() >= self.shard_capacity):
            raise ValueError(
                f"slots {slots.min()}..{slots.max()} are outside shard {self.shard_index}'s range "
                f"[{self.offset}, {self.offset + self.shard_capacity})"
            )
        if states.shape != (len(local), *self.image_shape):
            raise ValueError(f"states have shape {states.shape}, expected {(len(local), *self.image_shape)}")
        rows = len(local)

        # Keep the last occurrence of each slot: numpy leaves the order of repeated assignments open.
        _, last_reversed = np.unique(local[::-1], return_index=True)
        keep = np.sort(rows - 1 - last_reversed)
        stale = rows - len(keep)
        local = local[keep]
        stale += int((np.asarray(versions)[keep] != self.versions[local]).sum())

        self.states[local] = states[keep]
        self.labels[local] = np.asarray(labels)[keep]
        self.ages[local] = np.asarray(ages)[keep]
        self.chain_ids[local] = np.asarray(chain_ids)[keep]
        self.versions[local] += 1
        self.counters["write_backs"] += rows
        self.counters["stale_write_backs"] += stale
        return stale

    def stats(self) -> dict[str, float]:
        return {
            **{name: float(value) for name, value in self.counters.items()},
            "mean_age": float(self.ages.mean()),
            "slots": float(self.shard_capacity),
            "restarted": float(self.restarted),
        }

    def contents(self) -> dict[str, np.ndarray]:
        """Return all of this shard's slots: states (storage dtype), labels, ages, chain_ids, versions."""
        return {
            "states": self.states,
            "labels": self.labels,
            "ages": self.ages,
            "chain_ids": self.chain_ids,
            "versions": self.versions,
        }

    def oldest_per_class(self, per_class: int) -> dict[str, np.ndarray]:
        """Up to `per_class` of the oldest chains of every class (by stored label), ordered by class."""
        chosen = []
        for label in range(self.num_classes):
            slots = np.flatnonzero(self.labels == label)
            order = np.argsort(-self.ages[slots], kind="stable")[:per_class]
            chosen.append(slots[order])
        local = np.concatenate(chosen)
        return {"states": self.states[local], "labels": self.labels[local], "ages": self.ages[local]}

    def snapshot(self, url: str) -> dict[str, Any]:
        """Write this shard to `<url>/shard-k-of-K.npz` atomically. Returns file name, bytes, seconds.

        NOTE: the shard serves no draws while it writes (one call at a time), so every worker waits
        for the snapshot; 50,000 float32 states are 614 MB. The benchmark does not time this.
        """
        start = time.perf_counter()
        layout = np.array([SNAPSHOT_FORMAT, self.capacity, self.num_shards, self.shard_index, self.num_classes])
        payload = io.BytesIO()
        np.savez(
            payload,
            layout=layout,
            image_shape=np.array(self.image_shape, dtype=np.int64),
            states=self.states,
            labels=self.labels,
            ages=self.ages,
            chain_ids=self.chain_ids,
            versions=self.versions,
            counters=np.array([self.counters[name] for name in _COUNTER_NAMES], dtype=np.int64),
            new_chains=np.array(self.new_chains, dtype=np.int64),
        )
        data = payload.getvalue()
        name = shard_file_name(self.shard_index, self.num_shards)
        storage.write_bytes_atomic(storage.join(url, name), data, self.storage_options)
        return {"file": name, "bytes": len(data), "seconds": time.perf_counter() - start}

    def load_snapshot(self, url: str) -> bool:
        """Replace this shard's contents by its file in the snapshot folder `url`.

        Does nothing and returns False when this shard already loaded `url` since it started, so
        every worker may call it on resume without undoing another worker's first write-backs.
        """
        if self.loaded_from == url:
            return False
        path = storage.join(url, shard_file_name(self.shard_index, self.num_shards))
        with np.load(io.BytesIO(storage.read_bytes(path, self.storage_options)), allow_pickle=False) as arrays:
            self._check_snapshot_layout(arrays, path)
            self.states = arrays["states"].astype(STORAGE_DTYPES[self.dtype])
            self.labels = arrays["labels"].astype(np.int64)
            self.ages = arrays["ages"].astype(np.int64)
            self.chain_ids = arrays["chain_ids"].astype(np.int64)
            self.versions = arrays["versions"].astype(np.int64)
            self.counters = dict(zip(_COUNTER_NAMES, (int(v) for v in arrays["counters"])))
            self.new_chains = int(arrays["new_chains"])
        # A fresh random stream per snapshot, so a restarted shard does not repeat its earlier draws.
        self.rng = np.random.default_rng([self.seed, self.shard_index, zlib.crc32(url.encode()), self.counters["draws"]])
        self.loaded_from = url
        return True

    def _check_snapshot_layout(self, arrays, path: str) -> None:
        found = [int(v) for v in arrays["layout"]]
        expected = [SNAPSHOT_FORMAT, self.capacity, self.num_shards, self.shard_index, self.num_classes]
        shape = tuple(int(v) for v in arrays["image_shape"])
        if found != expected or shape != self.image_shape:
            names = "format, capacity, num_shards, shard_index, num_classes"
            raise ValueError(
                f"buffer snapshot {storage.redact(path)} has ({names}) = {found} and image shape {shape}, "
                f"expected {expected} and {self.image_shape}: resume with the same buffer.capacity, "
                "buffer.num_shards and model.num_classes, or choose another snapshot folder"
            )


RemoteBufferShard = ray.remote(BufferShard)


# ----------------------------------------------------------------------------------------------
# Driver side


@dataclass(frozen=True)
class SharedBufferHandles:
    """Actor names and buffer layout that workers need to reach the shards. Small and picklable,
    so it can travel in Ray Train's `train_loop_config`."""

    actor_names: tuple[str, ...]
    namespace: str
    capacity: int
    num_classes: int
    reinit_prob: float
    dtype: str
    image_shape: tuple[int, ...]
    snapshot_root: str
    keep_snapshots: int = 2
    """Step folders kept under snapshot_root; older ones are deleted after each snapshot (0: keep all)."""
    storage_options: dict | None = None
    shard_actors: tuple = field(default=(), repr=False, compare=False)
    """The actor handles. Ray destroys an actor that is not detached once no handle to it remains,
    even if it has a name, so the driver keeps the shards alive by holding this object."""

    @property
    def num_shards(self) -> int:
        return len(self.actor_names)

    @property
    def shard_capacity(self) -> int:
        return self.capacity // self.num_shards

    def actors(self) -> list:
        """Return the shard actors: the handles carried along, else a lookup by name."""
        if self.shard_actors:
            return list(self.shard_actors)
        return [ray.get_actor(name, namespace=self.namespace) for name in self.actor_names]


def create_shared_buffer(
    config: BufferConfig,
    num_classes: int,
    snapshot_root: str,
    *,
    seed: int = 0,
    image_shape: tuple[int, ...] = (3, 32, 32),
    max_restarts: int = 3,
    num_cpus: float = 0.0,
    keep_snapshots: int = 2,
    load_latest: bool = True,
    storage_options: dict | None = None,
) -> SharedBufferHandles:
    """Create the `config.num_shards` shard actors of a shared buffer and return their handles.

    Call it in the Ray Train driver (or Tune's trial function), not in a worker, so the shards
    outlive a restart of the worker group. Actor names carry a random run id, so several runs can
    share one cluster. Each shard is restarted up to `max_restarts` times and reloads the snapshot
    named by `<snapshot_root>/latest.json`; with `load_latest` the first start loads it too, which
    is how a resumed run (same `snapshot_root`) gets its buffer back. `num_cpus` is what each shard
    reserves from Ray's scheduler (0 lets them run beside workers that hold every CPU).
    """
    check_layout(config.capacity, config.num_shards, num_classes, config.reinit_prob, config.dtype)
    if keep_snapshots < 0:
        raise ValueError(f"keep_snapshots={keep_snapshots} is invalid: give 0 (keep all) or more")
    run_id = uuid.uuid4().hex[:12]
    names = tuple(f"gmmc-buffer-{run_id}-shard-{k}-of-{config.num_shards}" for k in range(config.num_shards))
    namespace = ray.get_runtime_context().namespace
    actors = [
        RemoteBufferShard.options(
            name=name,
            namespace=namespace,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
            num_cpus=num_cpus,
        ).remote(
            shard_index=k,
            num_shards=config.num_shards,
            capacity=config.capacity,
            num_classes=num_classes,
            reinit_prob=config.reinit_prob,
            image_shape=tuple(image_shape),
            dtype=config.dtype,
            seed=seed,
            snapshot_root=snapshot_root,
            load_latest=load_latest,
            storage_options=storage_options,
        )
        for k, name in enumerate(names)
    ]
    try:
        descriptions = ray.get([actor.describe.remote() for actor in actors])
    except Exception:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        raise
    loaded = {d["loaded_from"] for d in descriptions if d["loaded_from"]}
    logger.info(
        "created shared replay buffer %s: %d shards of %d states (%s), snapshots under %s%s",
        run_id, config.num_shards, config.capacity // config.num_shards, config.dtype,
        storage.redact(snapshot_root), f", loaded {sorted(loaded)}" if loaded else "",
    )
    return SharedBufferHandles(
        actor_names=names,
        namespace=namespace,
        capacity=config.capacity,
        num_classes=num_classes,
        reinit_prob=config.reinit_prob,
        dtype=config.dtype,
        image_shape=tuple(image_shape),
        snapshot_root=snapshot_root,
        keep_snapshots=keep_snapshots,
        storage_options=storage_options,
        shard_actors=tuple(actors),
    )


def snapshot_shared_buffer(handles: SharedBufferHandles, step: int, url: str | None = None) -> dict:
    """Snapshot every shard into `url` (default `<snapshot_root>/step-<step>`) and point
    latest.json at it. Returns the reference {"kind", "url", "step"} that `load_state_dict` takes.

    Each shard writes after the calls it received earlier, so the snapshot contains every write-back
    that reached a shard before the snapshot request. Workers' write-backs still queued in their
    clients are not included: have every worker call `flush()` first.
    """
    return _write_snapshot(handles, handles.actors(), step, url)


def delete_shared_buffer(handles: SharedBufferHandles) -> None:
    """Kill the shard actors (without restart). Snapshots stay where they are."""
    for actor in handles.actors():
        ray.kill(actor, no_restart=True)


def read_latest_reference(snapshot_root: str, storage_options: dict | None = None) -> dict | None:
    """Return the reference stored in `<snapshot_root>/latest.json`, or None when there is none."""
    path = storage.join(snapshot_root, LATEST_FILE)
    if not storage.exists(path, storage_options):
        return None
    return json.loads(storage.read_bytes(path, storage_options))


def _write_snapshot(handles: SharedBufferHandles, actors: list, step: int, url: str | None) -> dict:
    if step < 0:
        raise ValueError(f"snapshot step={step} is invalid: it must be >= 0")
    url = url or storage.join(handles.snapshot_root, step_folder_name(step))
    start = time.perf_counter()
    written = ray.get([actor.snapshot.remote(url) for actor in actors])
    manifest = {
        "format": SNAPSHOT_FORMAT,
        "capacity": handles.capacity,
        "num_shards": handles.num_shards,
        "num_classes": handles.num_classes,
        "image_shape": list(handles.image_shape),
        "dtype": handles.dtype,
        "step": step,
        "shards": [entry["file"] for entry in written],
        "bytes": sum(entry["bytes"] for entry in written),
    }
    options = handles.storage_options
    storage.write_bytes_atomic(storage.join(url, MANIFEST_FILE), json.dumps(manifest, indent=1).encode(), options)
    reference = {"kind": "shared", "url": url, "step": step}
    storage.write_bytes_atomic(storage.join(handles.snapshot_root, LATEST_FILE), json.dumps(reference).encode(), options)
    _delete_old_snapshots(handles, keep_url=url)
    logger.info("buffer snapshot of step %d written to %s: %.1f MB in %.2f s", step, storage.redact(url),
                manifest["bytes"] / 1e6, time.perf_counter() - start)
    return reference


def _delete_old_snapshots(handles: SharedBufferHandles, keep_url: str) -> None:
    if handles.keep_snapshots == 0:
        return
    fs, root = storage.resolve(handles.snapshot_root, handles.storage_options)
    _, keep_path = storage.resolve(keep_url, handles.storage_options)
    if not fs.exists(root):
        return
    folders = sorted(
        entry["name"].rstrip("/") for entry in fs.ls(root, detail=True)
        if entry["type"] == "directory" and entry["name"].rstrip("/").rsplit("/", 1)[-1].startswith("step-")
    )
    for folder in folders[: max(0, len(folders) - handles.keep_snapshots)]:
        if folder.rstrip("/") != keep_path.rstrip("/"):
            fs.rm(folder, recursive=True)
            logger.info("deleted old buffer snapshot %s", storage.redact(folder))


# ----------------------------------------------------------------------------------------------
# Worker side


@dataclass
class SharedBufferDraw(BufferDraw):
    """A draw from the shared buffer: `BufferDraw` plus what the write-back needs."""

    chain_ids: torch.Tensor | None = None
    """[B] int64, id of each chain (new for reinitialised chains)."""
    versions: torch.Tensor | None = None
    """[B] int64, slot versions at draw time (to count stale write-backs)."""


@dataclass
class _PendingDraw:
    batch_size: int
    labels: np.ndarray | None
    parts: list[tuple[np.ndarray, ray.ObjectRef]]
    """(positions in the batch, ObjectRef of the shard's draw) for every shard that was asked."""

    def matches(self, batch_size: int, labels: np.ndarray | None) -> bool:
        if batch_size != self.batch_size or (labels is None) != (self.labels is None):
            return False
        return labels is None or np.array_equal(labels, self.labels)


class SharedReplayBuffer(ReplayBuffer):
    """Worker-side client of the shared buffer (semantics in the module docstring and in `base`).

    Write-backs are sent without waiting; at most `max_pending_write_backs` batches are in flight
    before `write_back` waits for the oldest. `flush()` waits for all of them, and `snapshot`,
    `state_dict` and `stats` call it first. `wait_s` in `stats()` is the wall time this worker spent
    inside `draw`, `prefetch`, `write_back` and `flush`.
    """

    def __init__(
        self,
        handles: SharedBufferHandles,
        rank: int = 0,
        device: torch.device | str = "cpu",
        seed: int = 0,
        prefetch: bool = True,
        max_pending_write_backs: int = 4,
    ):
        self.handles = handles
        self.capacity = handles.capacity
        self.num_classes = handles.num_classes
        self.image_shape = tuple(handles.image_shape)
        self.device = torch.device(device)
        self.auto_prefetch = prefetch
        self.max_pending_write_backs = max(1, max_pending_write_backs)
        self.shards = handles.actors()
        self.shard_capacity = handles.shard_capacity
        self.rng = np.random.default_rng([seed, rank, 1])
        self.noise_generator = torch.Generator().manual_seed(seed + 7919 * rank)
        self.storage_dtype = torch.float16 if handles.dtype == "float16" else torch.float32

        counts = class_slot_counts(handles.capacity, handles.num_shards, handles.num_classes)
        self.class_totals = counts.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.class_cdf = np.cumsum(counts, axis=0) / self.class_totals

        self._pending_draw: _PendingDraw | None = None
        self._pending_writes: deque[ray.ObjectRef] = deque()
        self._last_snapshot: dict | None = None
        self._last_unconditional = False
        self.client_counters = {"draw_calls": 0, "prefetch_hits": 0, "prefetch_discarded": 0, "wait_s": 0.0}

    # -- draws --------------------------------------------------------------------------------

    def draw(self, batch_size: int, labels: torch.Tensor | None = None) -> SharedBufferDraw:
        start = time.perf_counter()
        labels_array = self._check_labels(batch_size, labels)
        pending, self._pending_draw = self._pending_draw, None
        if pending is not None and pending.matches(batch_size, labels_array):
            self.client_counters["prefetch_hits"] += 1
        else:
            if pending is not None:
                # The shards counted those chains as drawn; they stay unchanged in the buffer.
                self.client_counters["prefetch_discarded"] += 1
            pending = self._request_draw(batch_size, labels_array)
        drawn = self._collect(pending)
        self._last_unconditional = labels is None
        self.client_counters["draw_calls"] += 1
        self.client_counters["wait_s"] += time.perf_counter() - start
        return drawn

    def prefetch(self, batch_size: int, labels: torch.Tensor | None = None) -> None:
        """Request the next draw now; the next `draw` with the same size and labels collects it."""
        start = time.perf_counter()
        labels_array = self._check_labels(batch_size, labels)
        if self._pending_draw is not None:
            self.client_counters["prefetch_discarded"] += 1
        self._pending_draw = self._request_draw(batch_size, labels_array)
        self.client_counters["wait_s"] += time.perf_counter() - start

    def _check_labels(self, batch_size: int, labels: torch.Tensor | None) -> np.ndarray | None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: it must be at least 1")
        if labels is None:
            return None
        labels_array = labels.detach().cpu().numpy().astype(np.int64)
        if labels_array.shape != (batch_size,):
            raise ValueError(f"labels have shape {labels_array.shape}, expected ({batch_size},)")
        if labels_array.min() < 0 or labels_array.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels_array.min()}..{labels_array.max()}")
        empty = labels_array[self.class_totals[labels_array] == 0]
        if empty.size:
            raise ValueError(
                f"buffer capacity {self.capacity} leaves classes {sorted(set(empty.tolist()))} of "
                f"{self.num_classes} without slots"
            )
        return labels_array

    def _request_draw(self, batch_size: int, labels: np.ndarray | None) -> _PendingDraw:
        """Split the batch across shards at random (see the module docstring) and send one call each."""
        if labels is None:
            shard_of = self.rng.integers(self.handles.num_shards, size=batch_size)
        else:
            u = self.rng.random(batch_size)
            shard_of = (u[None, :] >= self.class_cdf[:, labels]).sum(axis=0)
            shard_of = np.minimum(shard_of, self.handles.num_shards - 1)
        parts = []
        for k, shard in enumerate(self.shards):
            positions = np.flatnonzero(shard_of == k)
            if positions.size:
                part_labels = None if labels is None else labels[positions]
                parts.append((positions, shard.draw.remote(int(positions.size), part_labels)))
        return _PendingDraw(batch_size, labels, parts)

    def _collect(self, pending: _PendingDraw) -> SharedBufferDraw:
        batch_size = pending.batch_size
        results = ray.get([ref for _, ref in pending.parts])
        states = np.empty((batch_size, *self.image_shape), dtype=np.float32)
        fields = {name: np.empty(batch_size, dtype=np.int64) for name in ("slots", "labels", "ages", "chain_ids", "versions")}
        fresh = np.empty(batch_size, dtype=bool)
        for (positions, _), result in zip(pending.parts, results):
            states[positions] = result["states"]
            for name, values in fields.items():
                values[positions] = result[name]
            fresh[positions] = result["fresh"]

        states_tensor = torch.from_numpy(states)
        fresh_tensor = torch.from_numpy(fresh)
        count = int(fresh.sum())
        if count:
            noise = torch.rand(count, *self.image_shape, generator=self.noise_generator)
            states_tensor[fresh_tensor] = noise * 2 - 1
        return SharedBufferDraw(
            states=states_tensor.to(self.device, non_blocking=True),
            labels=torch.from_numpy(fields["labels"]).to(self.device, non_blocking=True),
            slots=torch.from_numpy(fields["slots"]),
            ages=torch.from_numpy(fields["ages"]),
            reinitialised=fresh_tensor,
            chain_ids=torch.from_numpy(fields["chain_ids"]),
            versions=torch.from_numpy(fields["versions"]),
        )

    # -- write-backs --------------------------------------------------------------------------

    def write_back(self, draw: BufferDraw, states: torch.Tensor) -> None:
        """Send the refined states to their slots without waiting, then prefetch the next draw.

        Call it right after sampling, before the loss, so the prefetched draw is served while the
        loss is computed.
        """
        if not isinstance(draw, SharedBufferDraw) or draw.chain_ids is None or draw.versions is None:
            raise TypeError("write_back needs the SharedBufferDraw returned by this buffer's draw()")
        start = time.perf_counter()
        if tuple(states.shape) != (len(draw.slots), *self.image_shape):
            raise ValueError(f"states have shape {tuple(states.shape)}, expected {(len(draw.slots), *self.image_shape)}")
        states_array = states.detach().to("cpu", self.storage_dtype).numpy()
        slots = draw.slots.cpu().numpy()
        labels = draw.labels.cpu().numpy()
        ages = draw.ages.cpu().numpy() + 1
        chain_ids = draw.chain_ids.cpu().numpy()
        versions = draw.versions.cpu().numpy()
        shard_of = slots // self.shard_capacity
        for k, shard in enumerate(self.shards):
            positions = np.flatnonzero(shard_of == k)
            if positions.size:
                self._pending_writes.append(shard.write_back.remote(
                    slots[positions], states_array[positions], labels[positions], ages[positions],
                    chain_ids[positions], versions[positions],
                ))
        self._limit_pending_writes()

        if self.auto_prefetch and self._last_unconditional and self._pending_draw is None:
            self._pending_draw = self._request_draw(len(slots), None)
        self.client_counters["wait_s"] += time.perf_counter() - start

    def _limit_pending_writes(self) -> None:
        # Collect finished write-backs (raising their errors here), then wait while too many remain.
        if self._pending_writes:
            done, _ = ray.wait(list(self._pending_writes), num_returns=len(self._pending_writes), timeout=0)
            if done:
                ray.get(done)
                finished = set(done)
                self._pending_writes = deque(ref for ref in self._pending_writes if ref not in finished)
        limit = self.max_pending_write_backs * self.handles.num_shards
        while len(self._pending_writes) > limit:
            ray.get(self._pending_writes.popleft())

    def flush(self) -> None:
        """Wait until every write-back this worker sent has been applied by its shard."""
        start = time.perf_counter()
        while self._pending_writes:
            ray.get(self._pending_writes.popleft())
        self.client_counters["wait_s"] += time.perf_counter() - start

    def close(self) -> None:
        """Flush the write-backs and collect a pending prefetched draw, so the shards can be deleted.

        The chains of that draw stay unchanged in the buffer (the shards counted them as drawn)."""
        self.flush()
        if self._pending_draw is not None:
            ray.get([ref for _, ref in self._pending_draw.parts])
            self._pending_draw = None

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot(self, step: int, url: str | None = None) -> dict:
        """Flush, then snapshot every shard (see `snapshot_shared_buffer`). Call it on one rank only,
        after all ranks flushed (for example, rank 0 after a barrier). Returns the reference."""
        self.flush()
        self._last_snapshot = _write_snapshot(self.handles, self.shards, step, url)
        return dict(self._last_snapshot)

    def state_dict(self) -> dict:
        """Flush, then return the reference {"kind": "shared", "url", "step"} of the newest snapshot:
        the one this worker wrote, else the one latest.json names. Raises RuntimeError if none exists."""
        self.flush()
        reference = self._last_snapshot or read_latest_reference(self.handles.snapshot_root, self.handles.storage_options)
        if reference is None:
            raise RuntimeError(
                f"no buffer snapshot under {storage.redact(self.handles.snapshot_root)}: call "
                "buffer.snapshot(step) on rank 0 before saving the buffer's state"
            )
        return dict(reference)

    def load_state_dict(self, state: dict) -> None:
        """Load the snapshot that `state` (from `state_dict` or `snapshot`) refers to into the shards.

        Shards that already loaded that snapshot keep their contents, so every rank may call this.
        A prefetched draw is dropped, because it was drawn before the load.
        """
        if state.get("kind") != "shared" or not state.get("url"):
            found = "a local buffer's states" if "states" in state else f"keys {sorted(state)}"
            raise ValueError(
                f"buffer state contains {found}, not a shared-buffer snapshot reference: resume with the "
                "buffer.kind the checkpoint was written with"
            )
        self._check_manifest(state["url"])
        self.flush()
        if self._pending_draw is not None:
            self._pending_draw = None
            self.client_counters["prefetch_discarded"] += 1
        ray.get([shard.load_snapshot.remote(state["url"]) for shard in self.shards])
        self._last_snapshot = {"kind": "shared", "url": state["url"], "step": state.get("step")}

    def _check_manifest(self, url: str) -> None:
        path = storage.join(url, MANIFEST_FILE)
        try:
            manifest = json.loads(storage.read_bytes(path, self.handles.storage_options))
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"buffer snapshot {storage.redact(url)} has no {MANIFEST_FILE}: it was deleted or never "
                "completed; raise keep_snapshots in create_shared_buffer to keep older snapshots"
            ) from error
        expected = {"capacity": self.capacity, "num_shards": self.handles.num_shards,
                    "num_classes": self.num_classes, "image_shape": list(self.image_shape)}
        found = {name: manifest.get(name) for name in expected}
        if found != expected:
            raise ValueError(
                f"buffer snapshot {storage.redact(url)} has {found}, expected {expected}: resume with the "
                "same buffer.capacity, buffer.num_shards and model.num_classes"
            )

    # -- statistics ---------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Global counters (sums over shards; mean_age over all slots), `shard<k>/<counter>` per
        shard, and this worker's draw_calls, prefetch_hits, prefetch_discarded and wait_s."""
        self.flush()
        per_shard = ray.get([shard.stats.remote() for shard in self.shards])
        result: dict[str, float] = {}
        for name in _COUNTER_NAMES:
            result[name] = float(sum(entry[name] for entry in per_shard))
        slots = sum(entry["slots"] for entry in per_shard)
        result["mean_age"] = sum(entry["mean_age"] * entry["slots"] for entry in per_shard) / slots
        for k, entry in enumerate(per_shard):
            for name, value in entry.items():
                result[f"shard{k}/{name}"] = float(value)
        result.update({name: float(value) for name, value in self.client_counters.items()})
        return result

    def examples_per_class(self, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = ray.get([shard.oldest_per_class.remote(per_class) for shard in self.shards])
        states = np.concatenate([part["states"] for part in parts]).astype(np.float32)
        labels = np.concatenate([part["labels"] for part in parts])
        ages = np.concatenate([part["ages"] for part in parts])
        chosen = []
        for label in range(self.num_classes):
            rows = np.flatnonzero(labels == label)
            chosen.append(rows[np.argsort(-ages[rows], kind="stable")[:per_class]])
        rows = np.concatenate(chosen)
        return torch.from_numpy(states[rows]), torch.from_numpy(labels[rows])
