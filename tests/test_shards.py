"""Tests of shard writing, the manifest, rerun safety and checksum verification."""

import hashlib
import json
import logging

import numpy as np
import pytest
import s3fs
from conftest import CIFAR10_CLASSES, reset_s3

from gmmc_dist import storage
from gmmc_dist.data.loader import decode_sample, iter_shard
from gmmc_dist.data.readers import open_source
from gmmc_dist.data.shards import MANIFEST_NAME, read_manifest, verify, write_shards


def read_all(url, manifest, split, options=None):
    """All samples of a split as `(keys, images, labels)` in manifest order."""
    keys, images, labels = [], [], []
    for shard_url in manifest.shard_urls(url, split):
        for sample in iter_shard(shard_url, options):
            assert set(sample) >= {"__key__", "png", "cls"}
            image, label = decode_sample(sample)
            keys.append(sample["__key__"])
            images.append(image)
            labels.append(label)
    return keys, np.stack(images), np.array(labels)


def expected_samples(source, split, seed=0):
    samples = list(source.iter(split, seed))
    return np.stack([image for image, _ in samples]), np.array([label for _, label in samples])


def test_imagefolder_round_trip(cifar10_subset, tmp_path):
    source = open_source(cifar10_subset)
    out = str(tmp_path / "shards")
    manifest = write_shards(source, out, "cifar10", shard_size=64)

    assert manifest.dataset == "cifar10"
    assert manifest.class_names == tuple(CIFAR10_CLASSES)
    assert manifest.shard_size == 64
    assert manifest.format_version == 1
    assert manifest.splits["train"].count == 300
    assert [shard.count for shard in manifest.splits["train"].shards] == [64, 64, 64, 64, 44]
    assert [shard.name for shard in manifest.splits["test"].shards] == ["test-000000.tar", "test-000001.tar"]
    assert read_manifest(out) == manifest

    for split in ("train", "test"):
        keys, images, labels = read_all(out, manifest, split)
        expected_images, expected_labels = expected_samples(source, split)
        assert len(set(keys)) == len(keys)
        assert keys[0] == f"{split}-00000000"
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)

    for shard in manifest.splits["train"].shards:
        data = (tmp_path / "shards" / shard.name).read_bytes()
        assert shard.bytes == len(data)
        assert shard.sha256 == hashlib.sha256(data).hexdigest()
    assert verify(out) == []


def test_shards_mix_classes(cifar10_subset, tmp_path):
    manifest = write_shards(open_source(cifar10_subset), str(tmp_path), "cifar10", splits=["train"], shard_size=64)
    _, _, labels = read_all(str(tmp_path), manifest, "train")
    assert len(set(labels[:64].tolist())) == 10


def test_manifest_document_fields(cifar10_subset, tmp_path):
    write_shards(open_source(cifar10_subset), str(tmp_path), "cifar10", splits=["test"], shard_size=100)
    document = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert document["format_version"] == 1
    assert document["image_shape"] == [32, 32, 3]
    assert document["splits"]["test"]["count"] == 100
    assert set(document["splits"]["test"]["shards"][0]) == {"name", "count", "bytes", "sha256"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "test-000000.tar"]


@pytest.mark.parametrize("use_archive", [False, True], ids=["folder", "tar.gz"])
def test_cifar10_python_round_trip(cifar10_python, tmp_path, use_archive):
    folder, archive, arrays = cifar10_python
    source = open_source(archive if use_archive else folder)
    manifest = write_shards(source, str(tmp_path), "cifar10", shard_size=128, shuffle_seed=None)
    assert manifest.splits["train"].count == 300
    assert manifest.splits["test"].count == 100
    for split in ("train", "test"):
        _, images, labels = read_all(str(tmp_path), manifest, split)
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])


def test_rerun_skips_and_repairs(cifar10_subset, tmp_path, caplog):
    source = open_source(cifar10_subset)
    out = str(tmp_path)
    first = write_shards(source, out, "cifar10", splits=["test"], shard_size=40)
    shard_path = tmp_path / "test-000001.tar"
    original = shard_path.read_bytes()

    caplog.set_level(logging.INFO, logger="gmmc_dist.data.shards")
    caplog.clear()
    second = write_shards(source, out, "cifar10", splits=["test"], shard_size=40)
    assert second == first
    assert sum("checksum verified, skipped" in message for message in caplog.messages) == 3

    corrupted = bytearray(original)
    corrupted[2000] ^= 0xFF
    shard_path.write_bytes(bytes(corrupted))
    problems = verify(out)
    assert [(problem.name, problem.reason) for problem in problems] == [
        ("test-000001.tar", "SHA-256 differs from the manifest")
    ]

    caplog.clear()
    third = write_shards(source, out, "cifar10", splits=["test"], shard_size=40)
    assert third == first
    assert sum("different checksum, rewritten" in message for message in caplog.messages) == 1
    assert shard_path.read_bytes() == original
    assert verify(out) == []


def test_verify_missing_and_truncated(cifar10_subset, tmp_path):
    write_shards(open_source(cifar10_subset), str(tmp_path), "cifar10", splits=["test"], shard_size=40)
    (tmp_path / "test-000000.tar").unlink()
    truncated = tmp_path / "test-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    problems = {problem.name: problem.reason for problem in verify(str(tmp_path))}
    assert problems["test-000000.tar"] == "missing"
    assert problems["test-000002.tar"].startswith("size 1000 bytes")
    assert len(problems) == 2


def test_rewrite_one_split_keeps_others(cifar10_subset, tmp_path):
    source = open_source(cifar10_subset)
    write_shards(source, str(tmp_path), "cifar10", shard_size=100)
    manifest = write_shards(source, str(tmp_path), "cifar10", splits=["test"], shard_size=100)
    assert sorted(manifest.splits) == ["test", "train"]
    assert manifest.splits["train"].count == 300


def test_output_under_a_file_fails_early(cifar10_subset, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    with pytest.raises(NotADirectoryError, match="blocker is a file"):
        write_shards(open_source(cifar10_subset), str(blocker / "shards"), "cifar10")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"shard_size": 0}, "invalid shard size 0"),
        ({"splits": ["valid"]}, "split 'valid' not found"),
        ({"splits": []}, "no splits to write"),
    ],
)
def test_invalid_arguments(cifar10_subset, tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        write_shards(open_source(cifar10_subset), str(tmp_path), "cifar10", **arguments)
    assert list(tmp_path.iterdir()) == []


def test_invalid_dataset_name(cifar10_subset, tmp_path):
    with pytest.raises(ValueError, match="invalid dataset name 'imagenet'"):
        write_shards(open_source(cifar10_subset), str(tmp_path), "imagenet")


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json under"):
        read_manifest(str(tmp_path))


def test_manifest_version_mismatch(cifar10_subset, tmp_path):
    write_shards(open_source(cifar10_subset), str(tmp_path), "cifar10", splits=["test"], shard_size=100)
    document = json.loads((tmp_path / MANIFEST_NAME).read_text())
    document["format_version"] = 99
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(ValueError, match="format version 99"):
        read_manifest(str(tmp_path))


def test_s3_round_trip(cifar10_subset, s3_server):
    reset_s3(s3_server)
    options = {"endpoint_url": s3_server}
    s3fs.S3FileSystem(**options).mkdir("bucket")
    source = open_source(cifar10_subset)
    url = "s3://bucket/prefix/cifar10"
    manifest = write_shards(source, url, "cifar10", splits=["test"], shard_size=32, storage_options=options)
    assert read_manifest(url, options) == manifest
    assert verify(url, options) == []
    _, images, labels = read_all(url, manifest, "test", options)
    expected_images, expected_labels = expected_samples(source, "test")
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    fs, _ = storage.resolve(url, options)
    fs.invalidate_cache()
    assert sorted(path.rsplit("/", 1)[-1] for path in fs.find("bucket/prefix/cifar10")) == [
        MANIFEST_NAME, "test-000000.tar", "test-000001.tar", "test-000002.tar", "test-000003.tar",
    ]
