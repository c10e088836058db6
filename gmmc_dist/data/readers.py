"""Readers that yield `(image, label)` pairs from the usual on-disk formats of small image datasets.

Every reader yields images as `numpy.uint8` arrays of shape `[32, 32, 3]` (height, width, RGB) and
labels as Python ints (`-1` for unlabeled sets). Formats:

- `imagefolder`: `root/<split>/<class>/*.jpg|*.jpeg|*.png`; images must already be 32x32 RGB.
- `cifar10`: the official python version, an extracted `cifar-10-batches-py` folder or
  `cifar-10-python.tar.gz`.
- `cifar100`: the official python version, an extracted `cifar-100-python` folder or
  `cifar-100-python.tar.gz`, with fine (100) or coarse (20) labels.
- `svhn`: the cropped-digits `.mat` files `train_32x32.mat`, `test_32x32.mat`, `extra_32x32.mat`.
- `folder`: a flat folder of unlabeled images of any size, center-cropped to a square and resized
  to 32x32 (for out-of-distribution sets such as CelebA).

The official CIFAR files are Python pickles, and unpickling can run arbitrary code stored in the
file. These readers unpickle only files that the user points them at (their own local copy of the
official archive); never point them at files from an untrusted source.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
UNLABELED = -1
FORMATS = ("auto", "imagefolder", "cifar10", "cifar100", "svhn", "folder")

Sample = tuple[np.ndarray, int]


class ImageSource(ABC):
    """A dataset on disk with named splits, each an iterable of `(image, label)` samples."""

    format_name: str = ""

    def __init__(self, path: str | os.PathLike, class_names: Sequence[str], splits: Sequence[str]):
        self.path = Path(path)
        self.class_names = list(class_names)
        self.splits = tuple(splits)

    @abstractmethod
    def count(self, split: str) -> int:
        """Return the number of samples in `split`."""

    @abstractmethod
    def iter(self, split: str, shuffle_seed: int | None = None) -> Iterator[Sample]:
        """Yield the samples of `split` in source order, or in a permutation seeded by `shuffle_seed`."""

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(
                f"split {split!r} not found in {self.path} ({self.format_name}): "
                f"available splits are {list(self.splits)}"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, classes={len(self.class_names)}, "
            f"splits={list(self.splits)})"
        )


def _order(count: int, shuffle_seed: int | None) -> np.ndarray:
    if shuffle_seed is None:
        return np.arange(count)
    return np.random.default_rng(shuffle_seed).permutation(count)


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def load_image_32(path: Path) -> np.ndarray:
    """Decode an image file that must already be 32x32 RGB. Raises ValueError naming the file."""
    with Image.open(path) as image:
        if image.size != (IMAGE_SIZE, IMAGE_SIZE) or image.mode != "RGB":
            raise ValueError(
                f"image {path} is {image.size[0]}x{image.size[1]} {image.mode}, expected 32x32 RGB: "
                "convert the images to 32x32 RGB first, or use format='folder' to crop and resize "
                "an unlabeled folder"
            )
        return np.asarray(image, dtype=np.uint8).copy()


def load_image_resized(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode any image, center-crop it to a square and resize it to `size` x `size` RGB.

    The resize uses Pillow's bicubic filter, which is antialiased when downscaling.
    """
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        side = min(width, height)
        left = (width - side) // 2
        top = (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if side != size:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------
# ImageFolder and flat folders
# ---------------------------------------------------------------------------------------------


class ImageFolderSource(ImageSource):
    """`root/<split>/<class>/<image>`; class index = position in `class_names` (default: sorted
    class folder names of the `train` split, or of the first split if there is no `train`)."""

    format_name = "imagefolder"

    def __init__(self, root: str | os.PathLike, class_names: Sequence[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {root} not found or not a directory")
        split_dirs = sorted(child for child in root.iterdir() if child.is_dir())
        if not split_dirs:
            raise ValueError(
                f"ImageFolder root {root} has no split folders: expected {root}/<split>/<class>/<image>, "
                "for example train/cat/0001.png; use format='folder' for a flat folder of unlabeled images"
            )
        self._files: dict[str, list[tuple[Path, int]]] = {}
        folder_classes = {split_dir.name: self._class_dirs(split_dir) for split_dir in split_dirs}
        if class_names is None:
            reference = "train" if "train" in folder_classes else split_dirs[0].name
            class_names = sorted(folder_classes[reference])
        class_index = {name: index for index, name in enumerate(class_names)}
        for split_dir in split_dirs:
            unknown = sorted(set(folder_classes[split_dir.name]) - set(class_index))
            if unknown:
                raise ValueError(
                    f"class folders {unknown} in {split_dir} are not in the class list {list(class_names)}: "
                    "pass a class list that names every class folder, or remove those folders"
                )
            self._files[split_dir.name] = [
                (file, class_index[name])
                for name in sorted(folder_classes[split_dir.name], key=class_index.__getitem__)
                for file in sorted(folder_classes[split_dir.name][name])
            ]
        super().__init__(root, class_names, sorted(self._files))

    @staticmethod
    def _class_dirs(split_dir: Path) -> dict[str, list[Path]]:
        loose_images = [child for child in split_dir.iterdir() if _is_image_file(child)]
        class_dirs = sorted(child for child in split_dir.iterdir() if child.is_dir())
        if not class_dirs:
            hint = (
                f"; it contains images directly, so pass its parent folder as the root, or use "
                f"format='folder' for unlabeled images"
                if loose_images
                else ""
            )
            raise ValueError(
                f"ImageFolder split folder {split_dir} has no class subfolders: expected "
                f"{split_dir}/<class>/<image>{hint}"
            )
        classes = {class_dir.name: [f for f in class_dir.iterdir() if _is_image_file(f)] for class_dir in class_dirs}
        if not any(classes.values()):
            raise ValueError(
                f"ImageFolder split folder {split_dir} has class folders but no {'/'.join(IMAGE_EXTENSIONS)} "
                "images in them; check the path"
            )
        return classes

    def count(self, split: str) -> int:
        self.check_split(split)
        return len(self._files[split])

    def iter(self, split: str, shuffle_seed: int | None = None) -> Iterator[Sample]:
        self.check_split(split)
        files = self._files[split]
        for index in _order(len(files), shuffle_seed):
            path, label = files[index]
            yield load_image_32(path), label


class FolderSource(ImageSource):
    """A flat folder of unlabeled images (label -1), resized to 32x32 as in `load_image_resized`.

    The folder is exposed as one split, named by `split` (default `test`, because out-of-distribution
    sets are used for evaluation).
    """

    format_name = "folder"

    def __init__(self, root: str | os.PathLike, split: str = "test"):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} not found or not a directory")
        self._files = sorted(child for child in root.iterdir() if _is_image_file(child))
        if not self._files:
            raise ValueError(f"image folder {root} contains no {'/'.join(IMAGE_EXTENSIONS)} files")
        super().__init__(root, [], [split])

    def count(self, split: str) -> int:
        self.check_split(split)
        return len(self._files)

    def iter(self, split: str, shuffle_seed: int | None = None) -> Iterator[Sample]:
        self.check_split(split)
        for index in _order(len(self._files), shuffle_seed):
            yield load_image_resized(self._files[index]), UNLABELED


# ---------------------------------------------------------------------------------------------
# Array-backed formats: CIFAR-10, CIFAR-100 (pickled batches), SVHN (.mat)
# ---------------------------------------------------------------------------------------------


class ArraySource(ImageSource):
    """Base for formats stored as whole arrays; keeps the arrays of the last split loaded."""

    def __init__(self, path, class_names, splits):
        super().__init__(path, class_names, splits)
        self._cached_split: str | None = None
        self._cached_arrays: tuple[np.ndarray, np.ndarray] | None = None

    @abstractmethod
    def _load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Return `images [N, 32, 32, 3] uint8` and `labels [N] int64` for `split`."""

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        self.check_split(split)
        if self._cached_split != split:
            images, labels = self._load_split(split)
            self._check_arrays(split, images, labels)
            self._cached_split, self._cached_arrays = split, (images, labels)
        return self._cached_arrays

    def _check_arrays(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
            raise ValueError(
                f"split {split!r} of {self.path} has images of shape {images.shape} and dtype {images.dtype}, "
                f"expected [N, 32, 32, 3] uint8: the file is not in the official {self.format_name} format"
            )
        if len(labels) != len(images):
            raise ValueError(
                f"split {split!r} of {self.path} has {len(images)} images but {len(labels)} labels: "
                "the file is truncated or corrupt; extract the official archive again"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(
                f"split {split!r} of {self.path} has labels in [{labels.min()}, {labels.max()}], expected "
                f"0..{len(self.class_names) - 1} for {len(self.class_names)} classes"
            )

    def count(self, split: str) -> int:
        return len(self.arrays(split)[1])

    def iter(self, split: str, shuffle_seed: int | None = None) -> Iterator[Sample]:
        images, labels = self.arrays(split)
        for index in _order(len(labels), shuffle_seed):
            yield images[index], int(labels[index])


class _PickleFiles:
    """Read pickled batch files by base name from an extracted folder or a `.tar.gz` archive."""

    def __init__(self, path: Path, folder_name: str):
        self.path = path
        self.folder_name = folder_name
        self.is_archive = path.is_file()
        if self.is_archive and not tarfile.is_tarfile(path):
            raise ValueError(f"{path} is not a tar archive: give the official .tar.gz or the extracted {folder_name} folder")
        if not self.is_archive and not path.is_dir():
            raise FileNotFoundError(f"dataset path {path} not found")

    def load(self, names: Sequence[str]) -> dict[str, dict]:
        if self.is_archive:
            contents = self._read_archive_members(names)
        else:
            contents = {}
            for name in names:
                file = self.path / name
                if not file.is_file():
                    raise FileNotFoundError(
                        f"batch file {file} not found: extract the official {self.folder_name} archive again"
                    )
                contents[name] = file.read_bytes()
        return {name: self._unpickle(name, data) for name, data in contents.items()}

    def _read_archive_members(self, names: Sequence[str]) -> dict[str, bytes]:
        requested = set(names)
        found: dict[str, bytes] = {}
        with tarfile.open(self.path, "r:*") as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in requested and base not in found:
                    found[base] = archive.extractfile(member).read()
                    if len(found) == len(requested):
                        break
        missing = sorted(requested - set(found))
        if missing:
            raise FileNotFoundError(
                f"archive {self.path} has no member(s) {missing}: expected the official archive with "
                f"{self.folder_name}/{missing[0]}"
            )
        return found

    def _unpickle(self, name: str, data: bytes) -> dict:
        try:
            loaded = pickle.load(io.BytesIO(data), encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            raise ValueError(f"cannot read batch {name!r} from {self.path}: {error}") from error
        if not isinstance(loaded, dict):
            raise ValueError(f"batch {name!r} in {self.path} is a {type(loaded).__name__}, expected a dict")
        # Files written by Python 2 have byte-string keys, files pickled by Python 3 code str keys.
        return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in loaded.items()}


def _field(batch: dict, key: str, name: str, path: Path):
    if key not in batch:
        raise ValueError(f"batch {name!r} in {path} has no {key!r} entry (keys: {sorted(batch)})")
    return batch[key]


def _names(values) -> list[str]:
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in values]


def _cifar_images(data, name: str, path: Path) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or data.dtype != np.uint8:
        raise ValueError(
            f"batch {name!r} in {path} has data of shape {data.shape} and dtype {data.dtype}, expected [N, 3072] uint8"
        )
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane in row-major order.
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)


class Cifar10Source(ArraySource):
    """Official CIFAR-10 python version: `data_batch_1..5` form `train`, `test_batch` forms `test`."""

    format_name = "cifar10"
    FOLDER = "cifar-10-batches-py"
    SPLIT_FILES = {"train": [f"data_batch_{index}" for index in range(1, 6)], "test": ["test_batch"]}

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir() and (path / self.FOLDER).is_dir():
            path = path / self.FOLDER
        self._files = _PickleFiles(path, self.FOLDER)
        meta = self._files.load(["batches.meta"])["batches.meta"]
        class_names = _names(_field(meta, "label_names", "batches.meta", path))
        super().__init__(path, class_names, list(self.SPLIT_FILES))

    def _load_split(self, split):
        batches = self._files.load(self.SPLIT_FILES[split])
        images, labels = [], []
        for name in self.SPLIT_FILES[split]:
            images.append(_cifar_images(_field(batches[name], "data", name, self.path), name, self.path))
            labels.append(np.asarray(_field(batches[name], "labels", name, self.path), dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels)


class Cifar100Source(ArraySource):
    """Official CIFAR-100 python version (`train`, `test`, `meta`) with fine or coarse labels."""

    format_name = "cifar100"
    FOLDER = "cifar-100-python"
    LABEL_KINDS = ("fine", "coarse")

    def __init__(self, path: str | os.PathLike, label_kind: str = "fine"):
        if label_kind not in self.LABEL_KINDS:
            raise ValueError(f"invalid CIFAR-100 label kind {label_kind!r}: use 'fine' (100 classes) or 'coarse' (20)")
        path = Path(path)
        if path.is_dir() and (path / self.FOLDER).is_dir():
            path = path / self.FOLDER
        self.label_kind = label_kind
        self._files = _PickleFiles(path, self.FOLDER)
        meta = self._files.load(["meta"])["meta"]
        class_names = _names(_field(meta, f"{label_kind}_label_names", "meta", path))
        super().__init__(path, class_names, ["train", "test"])

    def _load_split(self, split):
        batch = self._files.load([split])[split]
        images = _cifar_images(_field(batch, "data", split, self.path), split, self.path)
        labels = np.asarray(_field(batch, f"{self.label_kind}_labels", split, self.path), dtype=np.int64)
        return images, labels


class SvhnSource(ArraySource):
    """SVHN cropped digits: `<split>_32x32.mat` with `X [32, 32, 3, N]` and `y [N, 1]` in 1..10.

    The label 10 stands for the digit 0 and is mapped to 0, so label = digit.
    """

    format_name = "svhn"
    SPLITS = ("train", "test", "extra")

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_file():
            split = path.name.removesuffix("_32x32.mat")
            if split == path.name:
                raise ValueError(f"SVHN file {path} is not named <split>_32x32.mat (for example train_32x32.mat)")
            self._mat_files = {split: path}
            folder = path.parent
        elif path.is_dir():
            self._mat_files = {
                split: path / f"{split}_32x32.mat" for split in self.SPLITS if (path / f"{split}_32x32.mat").is_file()
            }
            folder = path
            if not self._mat_files:
                raise FileNotFoundError(
                    f"no SVHN files in {path}: expected train_32x32.mat, test_32x32.mat or extra_32x32.mat"
                )
        else:
            raise FileNotFoundError(f"SVHN path {path} not found")
        super().__init__(folder, [str(digit) for digit in range(10)], list(self._mat_files))

    def _load_split(self, split):
        import scipy.io

        file = self._mat_files[split]
        try:
            contents = scipy.io.loadmat(file)
        except NotImplementedError as error:  # MATLAB v7.3 files are HDF5, which loadmat does not read
            raise ValueError(f"cannot read {file}: {error}. Save it as a MATLAB v5 file (the official format).") from error
        for key in ("X", "y"):
            if key not in contents:
                raise ValueError(f"SVHN file {file} has no {key!r} variable: not the official cropped-digits format")
        images, digits = contents["X"], np.asarray(contents["y"]).reshape(-1).astype(np.int64)
        if images.ndim != 4 or images.shape[:3] != IMAGE_SHAPE:
            raise ValueError(f"SVHN file {file} has X of shape {images.shape}, expected [32, 32, 3, N]")
        if len(digits) and (digits.min() < 1 or digits.max() > 10):
            raise ValueError(f"SVHN file {file} has labels in [{digits.min()}, {digits.max()}], expected 1..10")
        return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), digits % 10


# ---------------------------------------------------------------------------------------------
# Format detection
# ---------------------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format of `path` from file names only; raises ValueError listing what was checked."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} not found")
    if path.is_file():
        if path.name.endswith("_32x32.mat"):
            return "svhn"
        if tarfile.is_tarfile(path):
            with tarfile.open(path, "r:*") as archive:
                first = archive.next()
                top = first.name.split("/", 1)[0] if first is not None else ""
            for source in (Cifar10Source, Cifar100Source):
                if top == source.FOLDER:
                    return source.format_name
        raise ValueError(
            f"cannot detect the format of file {path}: expected cifar-10-python.tar.gz, "
            "cifar-100-python.tar.gz or <split>_32x32.mat; pass format= explicitly"
        )
    names = {child.name for child in path.iterdir()}
    if "batches.meta" in names or Cifar10Source.FOLDER in names:
        return "cifar10"
    if ("meta" in names and "train" in names and (path / "train").is_file()) or Cifar100Source.FOLDER in names:
        return "cifar100"
    if any(name.endswith("_32x32.mat") for name in names):
        return "svhn"
    children = list(path.iterdir())
    if any(_is_image_file(child) for child in children):
        return "folder"
    if any(child.is_dir() for child in children):
        return "imagefolder"
    raise ValueError(
        f"cannot detect the format of folder {path}: it has no CIFAR batches, no SVHN .mat files, "
        "no images and no subfolders; pass format= explicitly"
    )


def open_source(
    path: str | os.PathLike,
    format: str = "auto",
    *,
    class_names: Sequence[str] | None = None,
    label_kind: str = "fine",
    folder_split: str = "test",
) -> ImageSource:
    """Open a dataset on local disk as an `ImageSource`.

    `class_names` fixes the class order of an ImageFolder tree, `label_kind` selects CIFAR-100 fine
    or coarse labels, and `folder_split` names the single split of a flat unlabeled folder.
    """
    if format not in FORMATS:
        raise ValueError(f"invalid format {format!r}: choose one of {list(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} not found: check the path")
    if format == "auto":
        format = detect_format(path)
        logger.info("detected format %s for %s", format, path)
    if format == "imagefolder":
        return ImageFolderSource(path, class_names=class_names)
    if format == "cifar10":
        return Cifar10Source(path)
    if format == "cifar100":
        return Cifar100Source(path, label_kind=label_kind)
    if format == "svhn":
        return SvhnSource(path)
    return FolderSource(path, split=folder_split)
