"""The two benchmark subjects: the embedded default's model on digits (CPU) and timm resnet18
with the CIFAR stem on random CIFAR-10-shaped tensors (GPU; speed does not depend on the data)."""

from __future__ import annotations

import torch

from twml_cli.data import describe, load_dataset
from twml_cli.models import ModelSpec

RESNET18_CIFAR = ModelSpec("resnet18", 10, 3, (32, 32), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), {}, True, "random")


def digits_spec():
    """(spec, train set, test set) of the embedded default."""
    train, test = load_dataset("digits")
    return ModelSpec.for_data("test_byobnet", describe("digits", train, test)), train, test


def subject(cuda: bool, images: int, split: str) -> tuple[ModelSpec, torch.Tensor, str]:
    """(spec, images, name): resnet18 on random 3x32x32 on CUDA, else the digits model on
    the first `images` of the digits `split` ('train' or 'test')."""
    if cuda:
        return (
            RESNET18_CIFAR,
            torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
            "resnet18 3x32x32",
        )
    spec, train, test = digits_spec()
    return spec, (train if split == "train" else test).tensors[0][:images], "test_byobnet digits 8x8"
