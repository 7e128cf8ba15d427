"""The data sets twml opens by name, and a check of a --dataset value that needs no torch: the
command line refuses a name it could not open before it loads torch and MLflow (data.py opens
what passes)."""

from __future__ import annotations

from pathlib import Path

from .errors import TwmlError

EMBEDDED = "digits"
EMBEDDED_16 = "digits16"
TORCHVISION = ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "gtsrb")
DATASETS = (EMBEDDED, EMBEDDED_16, *TORCHVISION)


def is_folder(name: str) -> bool:
    """Whether `name` is an image folder. The names of DATASETS come first: a folder ./digits
    beside a command does not replace the embedded digits (write ./digits for the folder)."""
    return name not in DATASETS and Path(name).is_dir()


def check(name: str) -> None:
    """Raise what opening `name` would for a name that is neither one of DATASETS, nor a folder,
    nor an .npz file that exists. What lies inside a folder or a file is data.py's to check."""
    if name in DATASETS or is_folder(name):
        return
    if not name.endswith(".npz"):
        raise unknown(name)
    if not Path(name).is_file():
        raise missing(name)


def unknown(name: str) -> TwmlError:
    return TwmlError(
        f"unknown data set '{name}': use one of {', '.join(DATASETS)}, a path to an .npz file or an image folder"
    )


def missing(path: str | Path) -> TwmlError:
    return TwmlError(f"data file '{path}' does not exist")
