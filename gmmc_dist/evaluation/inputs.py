"""Image sets for evaluation as in-memory tensors on the model's [-1, 1] scale.

Evaluation sets are small enough to hold in memory (10,000 CIFAR-10 test images take 120 MB as
float32), so every evaluation takes tensors `[N, 3, 32, 32]` in [-1, 1] and int64 labels `[N]`.
The readers of `gmmc_dist.data.readers` decode the files, and webdataset shards are read through
`gmmc_dist.data.loader.make_eval_loader`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

IMAGE_SHAPE = (3, 32, 32)


def uint8_to_model_scale(images: np.ndarray) -> torch.Tensor:
    """Convert uint8 images `[N, 32, 32, 3]` (HWC) to float32 `[N, 3, 32, 32]` in [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return tensor / 127.5 - 1.0


def check_image_batch(name: str, images: torch.Tensor) -> None:
    """Raise ValueError unless `images` is `[N, 3, 32, 32]` with N >= 1 and values in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"image set {name!r} is a {type(images).__name__}, expected a torch.Tensor [N, 3, 32, 32]")
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"image set {name!r} has shape {tuple(images.shape)}, expected [N, 3, 32, 32]: resize the images "
            "to 32x32 RGB first (a flat folder given as --celeba is resized on reading)"
        )
    if images.shape[0] == 0:
        raise ValueError(f"image set {name!r} is empty: check its path or --limit")
    low, high = float(images.min()), float(images.max())
    if low < -1.0 - 1e-5 or high > 1.0 + 1e-5:
        raise ValueError(
            f"image set {name!r} has values in [{low:.3f}, {high:.3f}], expected [-1, 1]: "
            "scale uint8 pixels p to p / 127.5 - 1"
        )


def _take(samples: Iterable[tuple[np.ndarray, int]], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for image, label in samples:
        images.append(image)
        labels.append(label)
        if limit and len(images) >= limit:
            break
    if not images:
        raise ValueError("no images were read: the source is empty")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_imagefolder_split(
    split_folder: str | os.PathLike, limit: int | None = None, seed: int | None = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split of an ImageFolder tree (`root/<split>/<class>/*.jpg`, 32x32 RGB).

    `split_folder` is the split itself (for example `cifar10/test`). With `limit`, a permutation
    seeded by `seed` picks the images, so a small limit still covers every class. Class indices are
    the sorted class folder names, which for CIFAR-10 is the official label order.
    """
    from gmmc_dist.data.readers import ImageFolderSource

    split_folder = Path(split_folder)
    if not split_folder.is_dir():
        raise FileNotFoundError(
            f"test folder {split_folder} not found: give an ImageFolder split such as cifar10/test"
        )
    source = ImageFolderSource(split_folder.parent)
    logger.info("reading %s (%d images, limit %s)", split_folder, source.count(split_folder.name), limit)
    images, labels = _take(source.iter(split_folder.name, shuffle_seed=seed if limit else None), limit)
    return uint8_to_model_scale(images), torch.from_numpy(labels)


def load_flat_folder(
    folder: str | os.PathLike, limit: int | None = None, seed: int | None = 0
) -> torch.Tensor:
    """Read a flat folder of unlabeled images of any size, center-cropped and resized to 32x32."""
    from gmmc_dist.data.readers import FolderSource

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found: give a flat folder of images such as celeba/")
    source = FolderSource(folder)
    logger.info("reading %s (%d images, limit %s)", folder, source.count("test"), limit)
    images, _ = _take(source.iter("test", shuffle_seed=seed if limit else None), limit)
    return uint8_to_model_scale(images)


def load_shards(shards_url: str, split: str = "test", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a split of webdataset shards (written by `gmmc_dist.data.shards`) into memory.

    With `limit`, the first `limit` images in shard order are kept; shards are written in a seeded
    permutation, so they mix the classes.
    """
    try:
        from gmmc_dist.data.loader import make_eval_loader
    except ImportError as error:
        raise RuntimeError(
            f"cannot read shards {shards_url}: gmmc_dist.data.loader is not available ({error}); "
            "pass an ImageFolder split with --test-folder instead"
        ) from error
    images, labels, count = [], [], 0
    for batch_images, batch_labels in make_eval_loader(shards_url, split, batch_size=256):
        images.append(batch_images)
        labels.append(batch_labels)
        count += len(batch_labels)
        if limit and count >= limit:
            break
    if not images:
        raise ValueError(f"split {split!r} of shards {shards_url} contains no images")
    images_tensor, labels_tensor = torch.cat(images), torch.cat(labels)
    if limit:
        images_tensor, labels_tensor = images_tensor[:limit], labels_tensor[:limit]
    return images_tensor.float(), labels_tensor.long()


def map_batches(
    function: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Apply `function` to `images` in batches on `device` and concatenate the results on the CPU."""
    outputs = [function(images[start:start + batch_size].to(device)).detach().cpu() for start in range(0, len(images), batch_size)]
    return torch.cat(outputs)
