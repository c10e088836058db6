"""Tests of the dataset readers on real images and on small files in the official formats."""

import shutil
import tarfile

import numpy as np
import pytest
import scipy.io
from conftest import CIFAR10_CLASSES, cifar_rows, read_rgb, subset_arrays, write_pickle
from PIL import Image

from gmmc_dist.data.readers import (
    Cifar10Source,
    Cifar100Source,
    FolderSource,
    ImageFolderSource,
    SvhnSource,
    detect_format,
    open_source,
)


def collect(source, split, shuffle_seed=None):
    samples = list(source.iter(split, shuffle_seed))
    return np.stack([image for image, _ in samples]), np.array([label for _, label in samples])


# ---------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------


def test_imagefolder_real_images(cifar10_subset):
    source = open_source(cifar10_subset)
    assert isinstance(source, ImageFolderSource)
    assert source.class_names == CIFAR10_CLASSES
    assert source.splits == ("test", "train")
    assert source.count("train") == 300
    assert source.count("test") == 100
    images, labels = collect(source, "train")
    expected_images, expected_labels = subset_arrays(cifar10_subset, "train")
    assert images.dtype == np.uint8
    assert images.shape == (300, 32, 32, 3)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


def test_imagefolder_shuffle_is_permutation(cifar10_subset):
    source = open_source(cifar10_subset, "imagefolder")
    images, labels = collect(source, "test", shuffle_seed=7)
    again, _ = collect(source, "test", shuffle_seed=7)
    plain, plain_labels = collect(source, "test")
    order = np.random.default_rng(7).permutation(100)
    np.testing.assert_array_equal(images, plain[order])
    np.testing.assert_array_equal(labels, plain_labels[order])
    np.testing.assert_array_equal(images, again)


def test_imagefolder_explicit_class_order(cifar10_subset):
    reversed_names = CIFAR10_CLASSES[::-1]
    source = open_source(cifar10_subset, "imagefolder", class_names=reversed_names)
    _, labels = collect(source, "test")
    _, alphabetical = subset_arrays(cifar10_subset, "test")
    assert source.class_names == reversed_names
    assert sorted(labels.tolist()) == sorted((9 - alphabetical).tolist())
    assert labels[0] == 0  # the first file of the first class folder in the new order, truck


def test_imagefolder_unknown_class_folder(cifar10_subset):
    with pytest.raises(ValueError, match=r"class folders \['truck'\]"):
        ImageFolderSource(cifar10_subset, class_names=CIFAR10_CLASSES[:9])


def test_imagefolder_without_class_folders(data_root, tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    shutil.copy(data_root / "cifar10" / "train" / "cat" / "0000.jpg", split / "0000.jpg")
    with pytest.raises(ValueError, match=f"{split} has no class subfolders.*pass its parent folder"):
        ImageFolderSource(tmp_path)


def test_imagefolder_root_without_splits(tmp_path):
    with pytest.raises(ValueError, match="has no split folders"):
        ImageFolderSource(tmp_path)


def test_imagefolder_wrong_image_size(data_root, tmp_path):
    folder = tmp_path / "train" / "face"
    folder.mkdir(parents=True)
    shutil.copy(data_root / "celeba" / "000001.jpg", folder / "000001.jpg")
    source = ImageFolderSource(tmp_path)
    with pytest.raises(ValueError, match=r"000001.jpg is 89x109 RGB, expected 32x32 RGB"):
        next(source.iter("train"))


def test_imagefolder_grayscale_rejected(data_root, tmp_path):
    folder = tmp_path / "train" / "cat"
    folder.mkdir(parents=True)
    Image.open(data_root / "cifar10" / "train" / "cat" / "0000.jpg").convert("L").save(folder / "gray.png")
    with pytest.raises(ValueError, match="gray.png is 32x32 L, expected 32x32 RGB"):
        next(ImageFolderSource(tmp_path).iter("train"))


def test_missing_split_named(cifar10_subset):
    source = open_source(cifar10_subset)
    with pytest.raises(ValueError, match=r"split 'valid' not found in .*available splits are \['test', 'train'\]"):
        source.count("valid")


def test_missing_source_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        open_source(tmp_path / "absent")


def test_invalid_format_name(cifar10_subset):
    with pytest.raises(ValueError, match="invalid format 'jpeg'"):
        open_source(cifar10_subset, "jpeg")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_archive", [False, True], ids=["folder", "tar.gz"])
def test_cifar10_python_round_trip(cifar10_python, use_archive):
    folder, archive, arrays = cifar10_python
    path = archive if use_archive else folder
    assert detect_format(path) == "cifar10"
    source = open_source(path)
    assert isinstance(source, Cifar10Source)
    assert source.class_names == CIFAR10_CLASSES
    assert source.splits == ("train", "test")
    for split in ("train", "test"):
        images, labels = collect(source, split)
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])
    assert source.count("train") == 300
    assert source.count("test") == 100


def test_cifar10_parent_folder_detected(cifar10_python):
    folder, _, _ = cifar10_python
    assert detect_format(folder.parent) == "cifar10"
    assert open_source(folder.parent).path == folder


def test_cifar10_missing_batch(cifar10_python, tmp_path):
    folder, _, _ = cifar10_python
    copy = tmp_path / "cifar-10-batches-py"
    shutil.copytree(folder, copy)
    (copy / "data_batch_3").unlink()
    source = open_source(copy)
    with pytest.raises(FileNotFoundError, match="data_batch_3 not found"):
        source.count("train")


def test_cifar10_archive_missing_member(cifar10_python, tmp_path):
    folder, _, _ = cifar10_python
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "batches.meta", arcname="cifar-10-batches-py/batches.meta")
    source = open_source(archive)
    with pytest.raises(FileNotFoundError, match=r"no member\(s\) \['test_batch'\]"):
        source.count("test")


def test_cifar10_wrong_data_shape(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_pickle(folder / "batches.meta", {b"label_names": [name.encode() for name in CIFAR10_CLASSES]})
    write_pickle(folder / "test_batch", {b"data": np.zeros((4, 1024), np.uint8), b"labels": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"shape \(4, 1024\).*expected \[N, 3072\] uint8"):
        Cifar10Source(folder).count("test")


# ---------------------------------------------------------------------------------------------
# CIFAR-100 python format
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def cifar100_python(cifar10_subset, tmp_path):
    """A CIFAR-100 python folder and archive holding real images with made-up fine/coarse labels."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine_names = [f"fine_{index:02d}" for index in range(100)]
    coarse_names = [f"coarse_{index:02d}" for index in range(20)]
    arrays = {}
    for split in ("train", "test"):
        images, labels = subset_arrays(cifar10_subset, split)
        fine = (labels * 10 + np.arange(len(labels)) % 10).astype(np.int64)
        coarse = fine // 5
        arrays[split] = (images, fine, coarse)
        write_pickle(folder / split, {
            b"filenames": [f"{n}.png".encode() for n in range(len(labels))],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": coarse.tolist(),
            b"data": cifar_rows(images),
        })
    write_pickle(folder / "meta", {
        b"fine_label_names": [name.encode() for name in fine_names],
        b"coarse_label_names": [name.encode() for name in coarse_names],
    })
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    return folder, archive, arrays


@pytest.mark.parametrize("use_archive", [False, True], ids=["folder", "tar.gz"])
def test_cifar100_fine_and_coarse(cifar100_python, use_archive):
    folder, archive, arrays = cifar100_python
    path = archive if use_archive else folder
    assert detect_format(path) == "cifar100"
    fine_source = open_source(path)
    coarse_source = open_source(path, label_kind="coarse")
    assert isinstance(fine_source, Cifar100Source)
    assert len(fine_source.class_names) == 100
    assert fine_source.class_names[37] == "fine_37"
    assert len(coarse_source.class_names) == 20
    assert coarse_source.class_names[19] == "coarse_19"
    for split in ("train", "test"):
        images, fine = collect(fine_source, split)
        coarse_images, coarse = collect(coarse_source, split)
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(coarse_images, arrays[split][0])
        np.testing.assert_array_equal(fine, arrays[split][1])
        np.testing.assert_array_equal(coarse, arrays[split][2])


def test_cifar100_invalid_label_kind(cifar100_python):
    folder, _, _ = cifar100_python
    with pytest.raises(ValueError, match="invalid CIFAR-100 label kind 'medium'"):
        open_source(folder, label_kind="medium")


# ---------------------------------------------------------------------------------------------
# SVHN .mat
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def svhn_folder(cifar10_subset, tmp_path):
    """`train_32x32.mat` and `test_32x32.mat` with real images and digit labels 1..10."""
    arrays = {}
    for split in ("train", "test"):
        images, labels = subset_arrays(cifar10_subset, split)
        stored = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)  # label 10 is digit 0
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": stored})
        arrays[split] = (images, labels)
    return tmp_path, arrays


def test_svhn_mat_labels_and_pixels(svhn_folder):
    folder, arrays = svhn_folder
    assert detect_format(folder) == "svhn"
    source = open_source(folder)
    assert isinstance(source, SvhnSource)
    assert source.splits == ("train", "test")
    assert source.class_names == [str(digit) for digit in range(10)]
    for split in ("train", "test"):
        images, labels = collect(source, split)
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])
    _, train_labels = collect(source, "train")
    assert (train_labels == 0).sum() == 30
    assert train_labels.max() == 9


def test_svhn_single_file(svhn_folder):
    folder, arrays = svhn_folder
    source = open_source(folder / "test_32x32.mat")
    assert source.splits == ("test",)
    assert source.count("test") == 100
    with pytest.raises(ValueError, match="split 'train' not found"):
        source.count("train")


def test_svhn_wrong_shape(tmp_path):
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(ValueError, match=r"X of shape \(28, 28, 3, 2\), expected \[32, 32, 3, N\]"):
        SvhnSource(tmp_path).count("train")


def test_svhn_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SVHN files"):
        SvhnSource(tmp_path)


# ---------------------------------------------------------------------------------------------
# Flat unlabeled folder (CelebA)
# ---------------------------------------------------------------------------------------------


def test_folder_celeba_resized(data_root, tmp_path):
    for name in ("000001.jpg", "000002.jpg", "000003.jpg"):
        (tmp_path / name).symlink_to(data_root / "celeba" / name)
    assert detect_format(tmp_path) == "folder"
    source = open_source(tmp_path)
    assert isinstance(source, FolderSource)
    assert source.splits == ("test",)
    assert source.class_names == []
    assert source.count("test") == 3
    samples = list(source.iter("test"))
    assert [label for _, label in samples] == [-1, -1, -1]
    # 89x109 faces: the centered 89x89 square starts 10 rows down, then a bicubic resize to 32x32.
    original = Image.open(data_root / "celeba" / "000001.jpg")
    assert original.size == (89, 109)
    expected = np.asarray(original.crop((0, 10, 89, 99)).resize((32, 32), Image.Resampling.BICUBIC))
    assert samples[0][0].shape == (32, 32, 3)
    np.testing.assert_array_equal(samples[0][0], expected)


def test_folder_split_name(data_root, tmp_path):
    (tmp_path / "a.jpg").symlink_to(data_root / "celeba" / "000001.jpg")
    source = open_source(tmp_path, "folder", folder_split="ood")
    assert source.splits == ("ood",)


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="contains no .jpg/.jpeg/.png files"):
        FolderSource(tmp_path)


def test_detect_format_imagefolder(cifar10_subset):
    assert detect_format(cifar10_subset) == "imagefolder"
    assert read_rgb(next((cifar10_subset / "train" / "cat").iterdir())).shape == (32, 32, 3)
