"""Tests of the training and evaluation loaders on real shards, local and on a loopback S3 server."""

import numpy as np
import pytest
import s3fs
import torch
from conftest import reset_s3

from gmmc_dist import storage
from gmmc_dist.data.loader import augment, load_split_tensors, make_eval_loader, make_train_loader
from gmmc_dist.data.readers import open_source
from gmmc_dist.data.shards import write_shards

# 300 train images in shards of 60: 5 shards, which does not divide by 2 ranks x 2 loader workers.
SHARD_SIZE = 60


@pytest.fixture(scope="module")
def shards(cifar10_subset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loader_shards"))
    manifest = write_shards(open_source(cifar10_subset), out, "cifar10", shard_size=SHARD_SIZE)
    assert len(manifest.splits["train"].shards) == 5
    return out


def pixel_keys(images):
    """Map batches scaled to [-1, 1] back to uint8 and return one bytes key per image."""
    pixels = torch.round((images + 1) * 127.5).to(torch.uint8).numpy()
    return [image.tobytes() for image in pixels]


def source_keys(shards_url, split):
    images, _ = load_split_tensors(shards_url, split)
    return pixel_keys(images)


def run_train_epoch(shards_url, rank, **overrides):
    arguments = dict(
        split="train", batch_size=16, rank=rank, world_size=2, num_workers=2, seed=3, epoch=0,
        pad=0, flip=False, noise_std=0.0,
    )
    arguments.update(overrides)
    loader = make_train_loader(shards_url, **arguments)
    batches = list(loader)
    return len(loader), batches


def test_train_equal_steps_uneven_shards(shards):
    # 300 samples // (16 x 2) = 9 steps on each rank.
    lengths, counts, seen = [], [], []
    for rank in (0, 1):
        length, batches = run_train_epoch(shards, rank)
        lengths.append(length)
        counts.append(len(batches))
        for images, labels in batches:
            assert images.shape == (16, 3, 32, 32)
            assert images.dtype == torch.float32
            assert labels.shape == (16,)
            assert labels.dtype == torch.int64
        seen.append([key for images, _ in batches for key in pixel_keys(images)])
    assert lengths == [9, 9]
    assert counts == [9, 9]

    all_keys = set(source_keys(shards, "train"))
    rank0, rank1 = set(seen[0]), set(seen[1])
    assert rank0 <= all_keys
    assert rank1 <= all_keys
    # Slots own the shard positions {0, 4}, {1}, {2}, {3} of the epoch's permutation and need
    # 80, 64, 80, 64 samples. Slot 2 (rank 1) tops up 20 samples from position 1, which rank 0 owns.
    assert len(rank0) >= 140
    assert len(rank1) >= 120
    assert len(rank0 & rank1) <= 20


def test_train_more_slots_than_shards(cifar10_subset, tmp_path):
    write_shards(open_source(cifar10_subset), str(tmp_path), "cifar10", splits=["test"], shard_size=100)
    seen = []
    for rank in (0, 1):
        length, batches = run_train_epoch(str(tmp_path), rank, split="test", batch_size=10)
        assert length == 5
        assert len(batches) == 5
        seen.append({key for images, _ in batches for key in pixel_keys(images)})
    # One shard cut into 4 strided parts of 25, one per reader slot. Worker 0 of each rank needs 30
    # samples (25 own + 5 re-read), worker 1 needs 20 of its 25: 45 distinct samples per rank.
    assert len(seen[0]) == 45
    assert len(seen[1]) == 45
    assert seen[0].isdisjoint(seen[1])


def test_train_order_seeded_by_epoch(shards):
    _, first = run_train_epoch(shards, 0, num_workers=0)
    _, again = run_train_epoch(shards, 0, num_workers=0)
    _, next_epoch = run_train_epoch(shards, 0, num_workers=0, epoch=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], next_epoch[0][0])


def test_train_max_samples(shards):
    loader = make_train_loader(shards, "train", 8, 0, 2, 0, 0, 0, max_samples=100)
    assert len(loader) == 6
    assert len(list(loader)) == 6


def test_train_augmented_batch_range(shards):
    loader = make_train_loader(shards, "train", 32, 0, 1, 0, seed=1, epoch=0)
    images, labels = next(iter(loader))
    assert images.shape == (32, 3, 32, 32)
    assert labels.min() >= 0
    assert labels.max() <= 9
    # Pixels lie in [-1, 1] before noise of standard deviation 0.03 is added.
    assert images.min() >= -1 - 6 * 0.03
    assert images.max() <= 1 + 6 * 0.03
    clean, _ = next(iter(make_train_loader(shards, "train", 32, 0, 1, 0, seed=1, epoch=0, noise_std=0.0)))
    assert abs((images - clean).std().item() - 0.03) < 0.002


def test_augment_crop_is_window_of_reflect_pad(cifar10_subset):
    images = np.stack([image for image, _ in list(open_source(cifar10_subset).iter("test"))[:8]])
    rng = np.random.default_rng(0)
    batch = augment(images, rng, pad=4, flip=False, noise_std=0.0)
    pixels = torch.round((batch + 1) * 127.5).to(torch.uint8).numpy().transpose(0, 2, 3, 1)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    for index in range(8):
        windows = [padded[index, top:top + 32, left:left + 32] for top in range(9) for left in range(9)]
        assert any(np.array_equal(pixels[index], window) for window in windows)


def test_augment_flip_mirrors_or_keeps(cifar10_subset):
    images = np.stack([image for image, _ in list(open_source(cifar10_subset).iter("test"))[:32]])
    batch = augment(images, np.random.default_rng(1), pad=0, flip=True, noise_std=0.0)
    pixels = torch.round((batch + 1) * 127.5).to(torch.uint8).numpy().transpose(0, 2, 3, 1)
    unchanged = [np.array_equal(pixels[i], images[i]) for i in range(32)]
    mirrored = [np.array_equal(pixels[i], images[i, :, ::-1]) for i in range(32)]
    assert all(same or flipped for same, flipped in zip(unchanged, mirrored))
    assert 0 < sum(mirrored) < 32


def test_eval_covers_each_sample_once(shards):
    expected = source_keys(shards, "train")
    keys_by_rank = []
    for rank in (0, 1):
        loader = make_eval_loader(shards, "train", 32, rank=rank, world_size=2, num_workers=2, return_keys=True)
        batches = list(loader)
        assert len(loader) == len(batches)
        keys_by_rank.append([key for _, _, keys in batches for key in keys])
        for images, _, _ in batches:
            assert images.min() >= -1
            assert images.max() <= 1
    assert len(keys_by_rank[0]) == 150
    assert len(keys_by_rank[1]) == 150
    all_keys = keys_by_rank[0] + keys_by_rank[1]
    assert len(set(all_keys)) == 300
    assert sorted(all_keys) == [f"train-{position:08d}" for position in range(300)]
    assert len(expected) == 300


def test_eval_pixels_exact_and_deterministic(shards, cifar10_subset):
    source_images = np.stack([image for image, _ in open_source(cifar10_subset).iter("test", 0)])
    first = [batch for batch in make_eval_loader(shards, "test", 25)]
    second = [batch for batch in make_eval_loader(shards, "test", 25)]
    images = torch.cat([images for images, _ in first])
    pixels = torch.round((images + 1) * 127.5).to(torch.uint8).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(pixels, source_images)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))


def test_load_split_tensors_limit(shards):
    images, labels = load_split_tensors(shards, "test", limit=30)
    assert images.shape == (30, 3, 32, 32)
    assert labels.shape == (30,)
    all_images, all_labels = load_split_tensors(shards, "test")
    assert all_images.shape == (100, 3, 32, 32)
    assert torch.equal(images, all_images[:30])
    assert torch.bincount(all_labels).tolist() == [10] * 10


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rank": 2}, "invalid rank 2 for world_size 2"),
        ({"batch_size": 200}, "fewer than one global batch"),
        ({"split": "valid"}, "split 'valid' not in the manifest"),
        ({"num_workers": -1}, "invalid num_workers -1"),
        ({"max_samples": 0}, "invalid max_samples 0"),
    ],
)
def test_train_invalid_arguments(shards, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_train_epoch(shards, **{"rank": 0, **overrides})


def test_loader_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        make_eval_loader(str(tmp_path), "test", 8)


def test_s3_stream_with_two_workers(cifar10_subset, s3_server, monkeypatch):
    reset_s3(s3_server)
    options = {"endpoint_url": s3_server}
    s3fs.S3FileSystem(**options).mkdir("bucket")
    url = "s3://bucket/prefix/cifar10"
    write_shards(open_source(cifar10_subset), url, "cifar10", shard_size=SHARD_SIZE, storage_options=options)

    length, batches = run_train_epoch(url, 0, storage_options=options)
    assert length == 9
    assert len(batches) == 9
    stored_images, _ = load_split_tensors(url, "train", storage_options=options)
    seen = {key for images, _ in batches for key in pixel_keys(images)}
    assert seen <= set(pixel_keys(stored_images))
    assert len(seen) >= 120

    # The endpoint given only through GMMC_S3_ENDPOINT_URL reaches the loader workers too.
    monkeypatch.setenv(storage.ENDPOINT_ENV_VAR, s3_server)
    s3fs.S3FileSystem.clear_instance_cache()
    loader = make_eval_loader(url, "test", 20, rank=0, world_size=1, num_workers=2, return_keys=True)
    keys = [key for _, _, batch_keys in loader for key in batch_keys]
    assert sorted(keys) == [f"test-{position:08d}" for position in range(100)]
