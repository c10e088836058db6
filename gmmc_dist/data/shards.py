"""Write and check webdataset tar shards plus a `manifest.json` at any fsspec location.

Layout under the output URL:

- `{split}-{index:06d}.tar`: samples with a `png` entry (lossless, so pixels round-trip exactly) and
  a `cls` entry (the label as ASCII digits, `-1` for unlabeled sets). Keys are `{split}-{position:08d}`,
  the position of the sample in the written order.
- `manifest.json`: dataset name, class names, and per split the sample count and the shard list with
  per-shard sample count, byte size and SHA-256. Written last, so a manifest always describes
  shards that are complete.

Samples are written in a permutation of the source order seeded by `shuffle_seed`, because sources
such as ImageFolder trees list one class after another and a shard should hold a mix of classes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from gmmc_dist import storage
from gmmc_dist.data.readers import IMAGE_SHAPE, ImageSource

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_SHARD_SIZE = 5000
DATASET_NAMES = ("cifar10", "cifar100", "svhn", "celeba", "custom")
# Fixed tar header fields and PNG settings, so the same samples always give byte-identical shards
# (with the same Pillow and zlib versions) and a rerun can recognise shards it already wrote.
_TAR_MTIME = 0.0
_PNG_COMPRESS_LEVEL = 6


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    count: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """Contents of `manifest.json`."""

    dataset: str
    class_names: tuple[str, ...]
    splits: Mapping[str, SplitInfo]
    shard_size: int
    image_shape: tuple[int, int, int] = IMAGE_SHAPE
    format_version: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ValueError(f"split {name!r} not in the manifest of dataset {self.dataset!r}: available {sorted(self.splits)}")
        return self.splits[name]

    def shard_urls(self, base_url: str, split: str) -> list[str]:
        return [storage.join(base_url, shard.name) for shard in self.split(split).shards]

    def to_json(self) -> str:
        document = asdict(self)
        document["splits"] = {name: asdict(info) for name, info in self.splits.items()}
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        document = json.loads(text)
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{where} has format version {version!r}, this code reads version {FORMAT_VERSION}: "
                "write the shards again with prepare_data"
            )
        splits = {
            name: SplitInfo(count=int(info["count"]), shards=tuple(ShardInfo(**shard) for shard in info["shards"]))
            for name, info in document["splits"].items()
        }
        return cls(
            dataset=document["dataset"],
            class_names=tuple(document["class_names"]),
            splits=splits,
            shard_size=int(document["shard_size"]),
            image_shape=tuple(document["image_shape"]),
            format_version=version,
            extra=document.get("extra", {}),
        )


def read_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read `manifest.json` from the shard directory `url`."""
    manifest_url = storage.join(url, MANIFEST_NAME)
    try:
        text = storage.read_bytes(manifest_url, storage_options).decode("utf-8")
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} under {storage.redact(url)}: write the shards first with jobs/prepare_data.py"
        ) from error
    try:
        return Manifest.from_json(text, where=storage.redact(manifest_url))
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"invalid manifest {storage.redact(manifest_url)}: {error!r}") from error


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_png(image: np.ndarray) -> bytes:
    if image.shape != IMAGE_SHAPE or image.dtype != np.uint8:
        raise ValueError(f"image of shape {image.shape} and dtype {image.dtype}, expected {IMAGE_SHAPE} uint8")
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def build_shard(samples: Iterable[tuple[str, np.ndarray, int]]) -> bytes:
    """Return the bytes of one uncompressed tar shard holding `(key, image, label)` samples."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, mtime=_TAR_MTIME) as writer:
        for key, image, label in samples:
            writer.write({"__key__": key, "png": encode_png(image), "cls": str(int(label)).encode("ascii")})
    return buffer.getvalue()


def _batches(iterator: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in iterator:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_shards(
    source: ImageSource,
    output_url: str,
    dataset: str,
    *,
    splits: Sequence[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shuffle_seed: int | None = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Convert `splits` of `source` (default: all) into shards plus `manifest.json` under `output_url`.

    Rerun-safe: each shard is encoded again, and a shard file that already exists with the same
    SHA-256 is kept without being rewritten, so an interrupted run resumes cheaply. A shard whose
    bytes differ (corrupt, truncated, or from other settings) is rewritten. Splits already in an
    existing manifest of the same dataset and classes are kept when `splits` leaves them out.
    """
    splits = list(source.splits if splits is None else splits)
    _check_arguments(source, dataset, splits, shard_size)
    safe_url = storage.redact(output_url)
    storage.ensure_writable(output_url, storage_options)
    previous = _previous_manifest(output_url, storage_options)

    split_infos: dict[str, SplitInfo] = {}
    if previous is not None and previous.dataset == dataset and list(previous.class_names) == source.class_names:
        split_infos.update({name: info for name, info in previous.splits.items() if name not in splits})
    for split in splits:
        split_infos[split] = _write_split(source, output_url, split, shard_size, shuffle_seed, storage_options)

    manifest = Manifest(
        dataset=dataset,
        class_names=tuple(source.class_names),
        splits=dict(sorted(split_infos.items())),
        shard_size=shard_size,
        extra={"source_format": source.format_name, "shuffle_seed": shuffle_seed},
    )
    storage.write_bytes_atomic(storage.join(output_url, MANIFEST_NAME), manifest.to_json().encode("utf-8"), storage_options)
    logger.info("wrote %s under %s", MANIFEST_NAME, safe_url)
    return manifest


def _check_arguments(source: ImageSource, dataset: str, splits: Sequence[str], shard_size: int) -> None:
    if dataset not in DATASET_NAMES:
        raise ValueError(f"invalid dataset name {dataset!r}: choose one of {list(DATASET_NAMES)}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"invalid shard size {shard_size!r}: give a positive number of samples per shard")
    if not splits:
        raise ValueError("no splits to write: give at least one split name")
    for split in splits:
        source.check_split(split)


def _previous_manifest(output_url: str, storage_options) -> Manifest | None:
    if not storage.exists(storage.join(output_url, MANIFEST_NAME), storage_options):
        return None
    try:
        return read_manifest(output_url, storage_options)
    except ValueError as error:
        logger.warning("ignoring the existing manifest under %s: %s", storage.redact(output_url), error)
        return None


def _write_split(source, output_url, split, shard_size, shuffle_seed, storage_options) -> SplitInfo:
    total = source.count(split)
    shard_total = max(1, -(-total // shard_size))
    logger.info("split %s: %d samples into %d shard(s) of up to %d", split, total, shard_total, shard_size)
    keyed = ((f"{split}-{position:08d}", image, label) for position, (image, label) in enumerate(source.iter(split, shuffle_seed)))
    shards = []
    written = 0
    for index, batch in enumerate(_batches(keyed, shard_size)):
        started = time.perf_counter()
        name = f"{split}-{index:06d}.tar"
        data = build_shard(batch)
        action = _store_shard(storage.join(output_url, name), data, storage_options)
        shards.append(ShardInfo(name=name, count=len(batch), bytes=len(data), sha256=sha256_hex(data)))
        written += len(batch)
        logger.info(
            "%s %d/%d: %d samples, %.1f MB, %s (%.1f s, %d/%d samples done)",
            name, index + 1, shard_total, len(batch), len(data) / 1e6, action, time.perf_counter() - started, written, total,
        )
    if written != total:
        raise RuntimeError(f"split {split!r} of {source.path} yielded {written} samples but reported {total}")
    return SplitInfo(count=written, shards=tuple(shards))


def _store_shard(url: str, data: bytes, storage_options) -> str:
    """Write one shard unless an identical file is already there; return what was done."""
    if storage.exists(url, storage_options):
        existing = storage.read_bytes(url, storage_options)
        if sha256_hex(existing) == sha256_hex(data):
            return "already present, checksum verified, skipped"
        storage.write_bytes_atomic(url, data, storage_options)
        return "existing file had a different checksum, rewritten"
    storage.write_bytes_atomic(url, data, storage_options)
    return "written"


@dataclass(frozen=True)
class ShardProblem:
    name: str
    reason: str


def verify(url: str, storage_options: Mapping[str, Any] | None = None) -> list[ShardProblem]:
    """Check every shard in the manifest under `url` for presence, size and SHA-256.

    Returns the problems found; an empty list means every shard matches the manifest.
    """
    manifest = read_manifest(url, storage_options)
    problems = []
    for split, info in manifest.splits.items():
        if sum(shard.count for shard in info.shards) != info.count:
            problems.append(ShardProblem(split, f"shard counts add up to {sum(s.count for s in info.shards)}, not {info.count}"))
        for shard in info.shards:
            shard_url = storage.join(url, shard.name)
            try:
                data = storage.read_bytes(shard_url, storage_options)
            except FileNotFoundError:
                problems.append(ShardProblem(shard.name, "missing"))
                continue
            if len(data) != shard.bytes:
                problems.append(ShardProblem(shard.name, f"size {len(data)} bytes, manifest has {shard.bytes}"))
            elif sha256_hex(data) != shard.sha256:
                problems.append(ShardProblem(shard.name, "SHA-256 differs from the manifest"))
    for problem in problems:
        logger.warning("shard check under %s: %s: %s", storage.redact(url), problem.name, problem.reason)
    return problems


def format_summary(manifest: Manifest, seconds: float | None = None) -> str:
    """Return a short human-readable table of splits, sample counts and shard counts."""
    lines = [f"dataset {manifest.dataset}: {len(manifest.class_names)} classes, shard size {manifest.shard_size}"]
    for name, info in manifest.splits.items():
        size = sum(shard.bytes for shard in info.shards) / 1e6
        lines.append(f"  {name:<8} {info.count:>8} samples  {len(info.shards):>4} shards  {size:8.1f} MB")
    if seconds is not None:
        lines.append(f"  took {seconds:.1f} s")
    return "\n".join(lines)
