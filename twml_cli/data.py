"""Data sets: where their [0, 1] images (N, C, H, W) and integer labels (N,) come from.

- ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 grayscale images,
  10 classes), split once, stratified, with a fixed seed. Offline, no download.
- ``digits16``: the same images and split at 16x16 (bilinear upsampling): four times the
  pixels, no more detail; a 1-pixel or 2x2 trigger covers a quarter of the share it covers at 8x8.
- torchvision data sets by name, downloaded under ``data_dir`` on first use.
- a user's ``.npz`` with ``x_train, y_train, x_test, y_test``, loaded with
  ``allow_pickle=False``: uint8 images as (N, H, W, C) or (N, H, W), or float images in
  [0, 1] as (N, C, H, W).
- an ImageNet-style folder holding ``train/`` and ``val/`` (or ``test/``) with one subfolder
  per class: streamed from disk (examples.Folder), images resized to ``image_size``.

Sets that fit in memory stay in memory (on the GPU when there is one) and are batched by
indexing; only folders stream.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from . import data_names
from .data_names import EMBEDDED, EMBEDDED_16, TORCHVISION, is_folder
from .errors import TwmlError
from .examples import Folder, InMemory

DEFAULT_DATA_DIR = "data"
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
GTSRB_SIZE = 32  # GTSRB images come in many sizes; they are resized to 32x32 once and cached


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a data set."""

    name: str
    num_classes: int
    in_chans: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_test: int


@dataclass(frozen=True)
class DataSet:
    """A data set's two splits as examples (examples.py) and its description."""

    train: InMemory | Folder
    test: InMemory | Folder
    info: DataInfo


@dataclass(frozen=True)
class MemoryDataSet(DataSet):
    """A data set whose splits are both in memory (what poisoning and stamping need)."""

    train: InMemory
    test: InMemory


FOLDER_IMAGE_SIZE = 224  # ImageNet's, when a folder is opened without an image size
STATS_IMAGES = 512  # images of a folder's training split its mean and std are measured on


def open_dataset(name: str, data_dir: str | Path | None = None, image_size: int = 0, workers: int = 4) -> DataSet:
    """A data set by name, .npz path or folder path, ready to batch."""
    if is_folder(name):
        return _folder(name, image_size or FOLDER_IMAGE_SIZE, workers)
    train, test = load_dataset(name, data_dir)
    if image_size and image_size != train.tensors[0].shape[-1]:
        raise TwmlError(
            f"--image-size resizes image folders only; '{name}' has {train.tensors[0].shape[-1]}-pixel images"
        )
    return DataSet(InMemory(*train.tensors), InMemory(*test.tensors), describe(name, train, test))


def _folder(name: str, size: int, workers: int) -> DataSet:
    """train/ and val/ (or test/) class folders, streamed; described by `name` as given
    ('./digits' stays distinct from the embedded set's name)."""
    root = Path(name)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise TwmlError(f"image folder '{root}' needs train/ and val/ (or test/) subfolders with one folder per class")
    try:
        train = Folder(root / "train", size, workers)
        test = Folder(test_dir, size, workers, classes=train.dataset.classes)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise TwmlError(f"image folder '{root}': {str(err).splitlines()[0]}") from None
    g = torch.Generator().manual_seed(0)
    sample = torch.randperm(len(train), generator=g)[:STATS_IMAGES]
    x, _ = train.take(sample)
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    info = DataInfo(
        name=name,
        num_classes=len(train.dataset.classes),
        in_chans=x.shape[1],
        input_size=(size, size),
        mean=tuple(round(float(v), 6) for v in x.mean(dim=(0, 2, 3))),
        std=tuple(round(float(v), 6) for v in std),
        num_train=len(train),
        num_test=len(test),
    )
    return DataSet(train, test, info)


def load_dataset(name: str = EMBEDDED, data_dir: str | Path | None = None) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) as TensorDatasets of float32 [0, 1] images (N, C, H, W) and int64 labels.

    `name` is one of data_names.DATASETS or a path to an .npz file (image folders stream: open_dataset).
    Raises TwmlError for anything else, for files that cannot be read, and when a
    torchvision data set is neither on disk nor downloadable.
    """
    if name in (EMBEDDED, EMBEDDED_16):
        arrays = _digits(2 if name == EMBEDDED_16 else 1)
    elif name in TORCHVISION:
        arrays = _torchvision(name, Path(data_dir or DEFAULT_DATA_DIR))
    elif str(name).endswith(".npz"):
        arrays = _npz(Path(name))
    else:
        raise data_names.unknown(name)
    x_train, y_train, x_test, y_test = arrays
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)


def describe(name: str, train: TensorDataset, test: TensorDataset) -> DataInfo:
    """Number of classes, shape and per-channel mean/std (of the training split)."""
    x, y = train.tensors
    num_classes = int(max(y.max(), test.tensors[1].max())) + 1
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return DataInfo(
        name=str(name),
        num_classes=num_classes,
        in_chans=x.shape[1],
        input_size=(x.shape[2], x.shape[3]),
        mean=tuple(round(float(v), 6) for v in mean),
        std=tuple(round(float(v), 6) for v in std),
        num_train=len(x),
        num_test=len(test.tensors[0]),
    )


# ---------------------------------------------------------------- sources


def _digits(scale: int = 1):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SPLIT_SEED
    )

    def images(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a[:, None])
        if scale > 1:  # a convex combination of [0, 1] pixels stays in [0, 1]
            t = torch.nn.functional.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False)
        return t.contiguous()

    return images(x_train), torch.from_numpy(y_train), images(x_test), torch.from_numpy(y_test)


def _torchvision(name: str, root: Path):
    import torchvision.datasets as tvd

    def split(train: bool):
        if name == "mnist":
            ds = tvd.MNIST(root, train=train, download=True)
            return ds.data.numpy(), ds.targets.numpy()
        if name == "fashion-mnist":
            ds = tvd.FashionMNIST(root, train=train, download=True)
            return ds.data.numpy(), ds.targets.numpy()
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=train, download=True)
            return ds.data, np.asarray(ds.targets)
        if name == "svhn":
            ds = tvd.SVHN(root / "svhn", split="train" if train else "test", download=True)
            return ds.data.transpose(0, 2, 3, 1), ds.labels  # stored (N, C, H, W)
        return _gtsrb(tvd, root, train)

    try:
        x_train, y_train = split(True)
        x_test, y_test = split(False)
    except (RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TwmlError(
            f"cannot load data set '{name}' from {root.resolve()} ({first}); without internet access, "
            f"download it elsewhere with --data-dir DIR and copy DIR here, or pass an .npz file"
        ) from None
    return (*_from_uint8(x_train, y_train), *_from_uint8(x_test, y_test))


def _gtsrb(tvd, root: Path, train: bool):
    cache = root / f"gtsrb-{'train' if train else 'test'}-{GTSRB_SIZE}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            return f["x"], f["y"]
    from PIL import Image

    ds = tvd.GTSRB(root, split="train" if train else "test", download=True)
    images, labels = [], []
    for path, label in ds._samples:
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("RGB").resize((GTSRB_SIZE, GTSRB_SIZE), Image.Resampling.BILINEAR)))
        labels.append(label)
    x, y = np.stack(images), np.asarray(labels, dtype=np.int64)
    np.savez(cache, x=x, y=y)
    return x, y


def _npz(path: Path):
    if not path.is_file():
        raise data_names.missing(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise TwmlError(f"{path}: missing arrays {', '.join(missing)} (need x_train, y_train, x_test, y_test)")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except TwmlError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # not a zip, pickled objects, truncated
        raise TwmlError(f"{path}: not a readable .npz of plain arrays ({err})") from None
    x_train, y_train = _npz_split(path, "train", arrays["x_train"], arrays["y_train"])
    x_test, y_test = _npz_split(path, "test", arrays["x_test"], arrays["y_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise TwmlError(
            f"{path}: x_train images are {tuple(x_train.shape[1:])} but x_test images are {tuple(x_test.shape[1:])}"
        )
    return x_train, y_train, x_test, y_test


def _npz_split(path: Path, split: str, x: np.ndarray, y: np.ndarray):
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise TwmlError(f"{path}: y_{split} must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(x) != len(y):
        raise TwmlError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
    if len(y) == 0 or y.min() < 0:
        raise TwmlError(
            f"{path}: y_{split} must hold labels 0..K-1 (got {len(y)} labels, min {y.min() if len(y) else 'n/a'})"
        )
    if x.dtype == np.uint8:
        if x.ndim not in (3, 4):
            raise TwmlError(f"{path}: uint8 x_{split} must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
        return _from_uint8(x, y)
    if np.issubdtype(x.dtype, np.floating):
        if x.ndim != 4:
            raise TwmlError(f"{path}: float x_{split} must be (N, C, H, W) in [0, 1], got shape {x.shape}")
        if not np.isfinite(x).all():
            raise TwmlError(f"{path}: x_{split} holds {int((~np.isfinite(x)).sum())} pixels that are NaN or infinite")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise TwmlError(f"{path}: float x_{split} must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    raise TwmlError(f"{path}: x_{split} must be uint8 (N, H, W[, C]) or float (N, C, H, W), got dtype {x.dtype}")


def _from_uint8(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 [0, 1] (N, C, H, W)."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float().div_(255.0)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))
