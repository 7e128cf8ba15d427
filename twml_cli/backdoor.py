"""BadNets (Gu et al., 2017): stamp a small white square on a fraction of the training images,
relabel them to the target class, train as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .runtime import autocast, batches, generator, to_device_layout

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "centre")
POISON_STREAM = 3


def default_trigger_size(height: int, width: int) -> int:
    """About a tenth of the image side: 3 on 32x32 (BadNets' and BackdoorBench's 3x3, 0.9% of
    the image), 1 on 8x8 (1.6% of it; a 2x2 square would cover 6%, more than some digits'
    own distinguishing strokes, which is what Neural Cleanse compares against)."""
    return max(1, round(min(height, width) / 10))


@dataclass(frozen=True)
class Trigger:
    """A size x size square of `value` (1.0: white) in a corner or at the centre of the image
    (rounded up and left when the sides differ in parity), all channels."""

    size: int
    position: str = "bottom-right"
    value: float = 1.0

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"unknown trigger position '{self.position}': use one of {', '.join(POSITIONS)}")
        if self.size < 1:
            raise ValueError(f"trigger size must be >= 1, got {self.size}")
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"trigger value must lie in [0, 1], got {self.value}")

    def check_fits(self, height: int, width: int) -> None:
        if self.size > min(height, width):
            raise ValueError(f"trigger size {self.size} is larger than the {height}x{width} image")

    def region(self, height: int, width: int) -> tuple[slice, slice]:
        def span(side: int, far: bool, middle: bool) -> slice:
            start = (side - self.size) // 2 if middle else side - self.size if far else 0
            return slice(start, start + self.size)

        centre = self.position == "centre"
        return span(height, self.position.startswith("bottom"), centre), span(
            width, self.position.endswith("right"), centre
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A stamped copy of images x (N, C, H, W)."""
        rows, cols = self.region(*x.shape[-2:])
        out = x.clone()
        out[..., rows, cols] = self.value
        return out


def poison(
    x: torch.Tensor, y: torch.Tensor, target: int, rate: float, trigger: Trigger, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A poisoned copy of the training set: round(rate * N) images of classes other than the
    target get the trigger and the target label. Returns (x, y, indices of poisoned images)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"poison rate must lie in (0, 1), got {rate}")
    trigger.check_fits(*x.shape[-2:])
    candidates = (y != target).nonzero().flatten()
    count = min(round(rate * len(x)), len(candidates))
    order = torch.randperm(len(candidates), generator=generator(torch.device("cpu"), seed, POISON_STREAM))
    chosen = candidates[order[:count].to(candidates.device)]
    x_p, y_p = x.clone(), y.clone()
    x_p[chosen] = trigger.apply(x[chosen])
    y_p[chosen] = target
    return x_p, y_p, chosen


def attack_success_rate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int, trigger: Trigger, batch_size: int = 1024
) -> float:
    """Fraction of triggered test images whose true class is not the target that the model
    classifies as the target."""
    return stamped_success_rate(model, x[y != target], target, trigger.apply, batch_size)


def stamped_success_rate(model: nn.Module, x: torch.Tensor, target: int, stamp, batch_size: int = 1024) -> float:
    """Fraction of images x, each passed through `stamp`, that the model classifies as `target`."""
    device = next(model.parameters()).device
    model.eval()
    hits = torch.zeros((), dtype=torch.long, device=device)
    with torch.inference_mode(), autocast(device):
        for s in batches(len(x), batch_size):
            hits += (model(stamp(to_device_layout(x[s], device))).argmax(1) == target).sum()
    return hits.item() / max(len(x), 1)
