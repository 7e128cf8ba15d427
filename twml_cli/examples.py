"""Examples as the algorithms consume them: batches of ([0, 1] images, labels, indices) on the
device, from memory or streamed from disk, with the training augmentation applied.

- `InMemory`: a data set that fits (digits, MNIST, CIFAR-10, an .npz) lives as one tensor on
  the device; a batch is an index, the augmentation runs on the device.
- `Folder`: an ImageNet-style folder of class subfolders, decoded by DataLoader workers into
  pinned memory and copied without blocking.

Both draw every random choice of the augmentation from a hash keyed by (seed, pass, example
index) (runtime.keyed_uniform), so a batch is the same whatever the batch size, the number
of processes, or an interruption and resume. Evaluation is never augmented.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .distributed import shard
from .errors import TwmlError
from .runtime import derive_seed, keyed_uniform, machine_cores, to_device_layout

AUGMENT_STREAM = 5
# each data set's usual training augmentation (the papers'): crops with 4-pixel padding and
# flips for CIFAR, crops without flips for digits-in-the-wild and signs, none for MNIST-like
USUAL = {"cifar10": "crop-flip", "cifar100": "crop-flip", "svhn": "crop", "gtsrb": "crop"}


def usual_augmentation(dataset: str, streamed: bool) -> str:
    """The augmentation a data set is usually trained with; ImageNet's for image folders."""
    return "resized-crop-flip" if streamed else USUAL.get(dataset, "none")


@dataclass(frozen=True)
class Augment:
    """The training augmentation of one pass over the data."""

    policy: str  # one of configs.POLICIES
    seed: int
    pass_index: int


def crop_padding(side: int) -> int:
    """4 pixels on 32x32, as the papers; an eighth of the side in general."""
    return max(1, round(side / 8))


def augment_batch(x: torch.Tensor, idx: torch.Tensor, augment: Augment | None) -> torch.Tensor:
    """Random crops of the zero-padded image and/or horizontal flips, one draw per example
    keyed by (seed, pass, index); on x's device, no Python loop."""
    if augment is None or augment.policy == "none":
        return x
    n, _, h, w = x.shape
    u = keyed_uniform(idx.to(x.device), (3,), augment.seed, AUGMENT_STREAM, augment.pass_index)
    if "crop" in augment.policy:
        pad = crop_padding(min(h, w))
        dy, dx = (u[:, 0] * (2 * pad + 1)).long(), (u[:, 1] * (2 * pad + 1)).long()
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = dy[:, None] + torch.arange(h, device=x.device)
        cols = dx[:, None] + torch.arange(w, device=x.device)
        x = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(
            0, 3, 1, 2
        )
    if "flip" in augment.policy:
        x = torch.where((u[:, 2] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
    return x


class InMemory:
    """Images (N, C, H, W) in [0, 1] and labels (N,), kept on one device."""

    streamed = False

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels), as a TensorDataset has them."""
        return self.x, self.y

    def to(self, device: torch.device) -> InMemory:
        if self.x.device == device:
            return self
        return InMemory(to_device_layout(self.x, device), self.y.to(device))

    def digest(self) -> str:
        """A short hash of every image and label: equal digests, equal data."""
        if not hasattr(self, "_digest"):
            h = hashlib.sha256(self.y.cpu().numpy().tobytes())
            h.update(self.x.cpu().contiguous().numpy().tobytes())
            h.update(str(tuple(self.x.shape)).encode())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def profile(self) -> dict:
        return {
            "num_examples": len(self),
            "shape": list(self.x.shape[1:]),
            "classes": int(self.y.max()) + 1 if len(self) else 0,
        }

    def take(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at `indices`, unaugmented, on the CPU."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return self.x[indices.to(self.x.device)].cpu(), self.y[indices.to(self.y.device)].cpu()

    def batches(
        self, index_batches: Sequence[torch.Tensor], device: torch.device, augment: Augment | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        data = self.to(device)
        for idx in index_batches:
            idx = idx.to(device)
            yield augment_batch(data.x[idx], idx, augment), data.y[idx], idx


class Folder:
    """An ImageNet-style folder (one subfolder per class), streamed: DataLoader workers decode,
    resize and augment; batches arrive in pinned memory and are copied without blocking.
    Training: a random resized crop and a flip; evaluation: resize to 8/7 of the size, center crop."""

    streamed = True

    def __init__(self, root: Path, image_size: int, workers: int, classes: list[str] | None = None):
        from torchvision.datasets import ImageFolder

        cores, procs = machine_cores()  # more workers than cores only queue for them (and torch warns)
        self.root, self.image_size, self.workers = Path(root), image_size, min(workers, max(1, cores // procs))
        self.dataset = ImageFolder(str(root))
        if classes is not None and self.dataset.classes != classes:
            raise ValueError(f"{root} has classes {self.dataset.classes}, but the training folder has {classes}")
        self.y = torch.tensor(self.dataset.targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    def to(self, device: torch.device) -> Folder:
        return self  # streamed: batches move to the device as they come

    def digest(self) -> str:
        """A short hash of every file's path (relative to the folder), size and label."""
        if not hasattr(self, "_digest"):
            h = hashlib.sha256()
            for path, label in self.dataset.samples:
                h.update(f"{Path(path).relative_to(self.root)}:{Path(path).stat().st_size}:{label};".encode())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def profile(self) -> dict:
        return {
            "num_examples": len(self),
            "image_size": self.image_size,
            "classes": len(self.dataset.classes),
            "root": str(self.root),
        }

    def take(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        indices = [int(i) for i in torch.as_tensor(indices).flatten()]
        view = _FolderView(self.dataset, self.image_size, None)
        images = (
            torch.stack([view[(i, -1)][0] for i in indices])
            if indices
            else torch.zeros(0, 3, self.image_size, self.image_size)
        )
        return images, self.y[indices]

    def batches(
        self, index_batches: Sequence[torch.Tensor], device: torch.device, augment: Augment | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        tag = -1 if augment is None else augment.pass_index
        sampler = [[(int(i), tag) for i in idx] for idx in index_batches]
        view = _FolderView(self.dataset, self.image_size, augment)
        cuda = device.type == "cuda"
        loader = DataLoader(
            view,
            batch_sampler=sampler,
            num_workers=self.workers,
            pin_memory=cuda,
            persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
        )
        for x, y, idx in loader:
            yield to_device_layout(x, device), y.to(device, non_blocking=True), idx.to(device, non_blocking=True)


class UnreadableImage(TwmlError):
    """A file of an image folder that PIL cannot decode. Raised in a DataLoader worker, it comes
    back to the main process built from the worker's whole traceback: keep the message alone."""

    def __init__(self, message: str):
        super().__init__(message.strip().splitlines()[-1].split("UnreadableImage: ", 1)[-1])


class _FolderView(torch.utils.data.Dataset):
    """Decodes one image at (index, pass): augmented for the training view, centered otherwise."""

    def __init__(self, dataset, size: int, augment: Augment | None):
        self.dataset, self.size, self.augment = dataset, size, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        from torchvision.transforms.v2 import functional as TF

        index, pass_index = key
        path, label = self.dataset.samples[index]
        try:
            image = TF.to_image(self.dataset.loader(path))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            from PIL import UnidentifiedImageError

            why = "no image format PIL knows" if isinstance(err, UnidentifiedImageError) else str(err).strip()
            why = why.splitlines()[0] if why else type(err).__name__
            raise UnreadableImage(
                f"image folder file '{path}' is not an image PIL can read ({why}); remove or replace it"
            ) from None
        if self.augment is None or self.augment.policy == "none":
            short = math.floor(self.size / 0.875)  # the usual 256 -> 224
            image = TF.center_crop(TF.resize(image, short, antialias=True), self.size)
        else:
            g = torch.Generator().manual_seed(derive_seed(self.augment.seed, AUGMENT_STREAM, pass_index, index))
            top, left, h, w = resized_crop_box(image.shape[-2], image.shape[-1], g)
            image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
            if "flip" in self.augment.policy and torch.rand((), generator=g) < 0.5:
                image = TF.horizontal_flip(image)
        return TF.to_dtype(image, torch.float32, scale=True), label, index


def resized_crop_box(
    height: int, width: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """ImageNet's random resized crop (Szegedy et al.): an area of 8% to 100% of the image at an
    aspect ratio of 3/4 to 4/3, ten tries, else the central crop; drawn from generator g."""
    area = height * width
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g)))
        log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(torch.rand((), generator=g))
        w = round(math.sqrt(target * math.exp(log_ratio)))
        h = round(math.sqrt(target / math.exp(log_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def batch_indices(order: torch.Tensor, batch_size: int, part: int = 0, parts: int = 1) -> list[torch.Tensor]:
    """Consecutive global batches of `order`, each cut to the share of process `part` of `parts`
    (distributed.shard: contiguous, sizes within one)."""
    out = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        out.append(batch[shard(len(batch), part, parts)])
    return out
