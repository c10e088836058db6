"""Shared fixtures: the real data copy, one Ray instance per session, a loopback S3 server."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder with the real data copies (`cifar10/`, `celeba/`), set by GMMC_DATA_ROOT."""
    root = Path(os.environ.get("GMMC_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "cifar10" / "train").is_dir():
        pytest.fail(
            f"real data not found under {root}: set GMMC_DATA_ROOT to the folder that holds "
            "cifar10/train and cifar10/test"
        )
    return root


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance shared by every test that needs it (ray.init costs seconds).

    Starts after `s3_server`, so Ray's processes inherit its dummy AWS_* credentials and guard
    endpoint. They never see GMMC_S3_ENDPOINT_URL: runs reach the moto server only through
    `run.s3_endpoint_url`.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1 with dummy credentials.

    Yields the endpoint URL. Tests that need an empty store call `reset_s3(endpoint)`.
    """
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(_S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Guard: an S3 client created without an explicit endpoint connects to this closed loopback
    # port and fails, instead of reaching AWS.
    "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
}


def reset_s3(endpoint: str) -> None:
    """Empty the moto server and drop s3fs's cached filesystem instances."""
    import urllib.request

    import s3fs

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------------------------------------
# Small data sets built from the real CIFAR-10 copy
# ---------------------------------------------------------------------------------------------

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SUBSET_PER_CLASS = {"train": 30, "test": 10}


@pytest.fixture(scope="session")
def cifar10_subset(data_root, tmp_path_factory) -> Path:
    """An ImageFolder tree of real CIFAR-10 JPEGs (symlinks): 30 train and 10 test images per class."""
    root = tmp_path_factory.mktemp("cifar10_subset")
    for split, per_class in SUBSET_PER_CLASS.items():
        for name in CIFAR10_CLASSES:
            target = root / split / name
            target.mkdir(parents=True)
            for file in sorted((data_root / "cifar10" / split / name).iterdir())[:per_class]:
                (target / file.name).symlink_to(file.resolve())
    return root


def read_rgb(path: Path):
    """Decode an image file into a uint8 [H, W, 3] array."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def subset_arrays(root: Path, split: str):
    """Images `uint8 [N, 32, 32, 3]` and labels of an ImageFolder split, in class then file order."""
    import numpy as np

    images, labels = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        for file in sorted((root / split / name).iterdir()):
            images.append(read_rgb(file))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def cifar_rows(images):
    """Convert `uint8 [N, 32, 32, 3]` into the official CIFAR row layout `[N, 3072]` (R, G, B planes)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1).copy()


def write_pickle(path: Path, document: dict) -> None:
    """Write a dict the way the official CIFAR batches are stored: a protocol-2 pickle, byte-string keys."""
    import pickle

    with open(path, "wb") as handle:
        pickle.dump(document, handle, protocol=2)


@pytest.fixture(scope="session")
def cifar10_python(cifar10_subset, tmp_path_factory):
    """The official CIFAR-10 python layout written from real images: `(folder, tar.gz path, arrays)`.

    The 300 train images go round-robin into data_batch_1..5 (60 each), the 100 test images into
    test_batch. `arrays` maps each split to the `(images, labels)` in batch order.
    """
    import tarfile

    import numpy as np

    root = tmp_path_factory.mktemp("cifar10_python")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    train_images, train_labels = subset_arrays(cifar10_subset, "train")
    test_images, test_labels = subset_arrays(cifar10_subset, "test")
    ordered_images, ordered_labels = [], []
    for index in range(5):
        images, labels = train_images[index::5], train_labels[index::5]
        ordered_images.append(images)
        ordered_labels.append(labels)
        write_pickle(folder / f"data_batch_{index + 1}", {
            b"batch_label": f"training batch {index + 1} of 5".encode(),
            b"labels": [int(label) for label in labels],
            b"data": cifar_rows(images),
            b"filenames": [f"image_{index}_{n}.png".encode() for n in range(len(labels))],
        })
    write_pickle(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(label) for label in test_labels],
        b"data": cifar_rows(test_images),
        b"filenames": [f"test_{n}.png".encode() for n in range(len(test_labels))],
    })
    write_pickle(folder / "batches.meta", {
        b"label_names": [name.encode() for name in CIFAR10_CLASSES],
        b"num_cases_per_batch": 60,
        b"num_vis": 3072,
    })
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    arrays = {
        "train": (np.concatenate(ordered_images), np.concatenate(ordered_labels)),
        "test": (test_images, test_labels),
    }
    return folder, archive, arrays


def copy_cifar_subset(data_root: Path, target: Path, per_class: dict[str, int]) -> Path:
    """Copy the first `per_class[split]` images of every class into a small ImageFolder tree."""
    import shutil

    for split, count in per_class.items():
        for name in CIFAR10_CLASSES:
            (target / split / name).mkdir(parents=True)
            for image in sorted((data_root / "cifar10" / split / name).iterdir())[:count]:
                shutil.copy(image, target / split / name / image.name)
    return target
