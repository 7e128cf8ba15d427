"""BadNets (Gu et al., 2017): stamp a small white square on a fraction of the training images,
relabel them to the target class, train as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import Trigger, check_poison_rate
from .runtime import autocast, batches, generator, to_device_layout

POISON_STREAM = 3


def default_trigger_size(height: int, width: int) -> int:
    """About a tenth of the image side: 3 on 32x32 (BadNets' and BackdoorBench's 3x3, 0.9% of
    the image), 1 on 8x8 (1.6% of it; a 2x2 square would cover 6%, more than some digits'
    own distinguishing strokes, which is what Neural Cleanse compares against)."""
    return max(1, round(min(height, width) / 10))


def poison(
    x: torch.Tensor, y: torch.Tensor, target: int, rate: float, trigger: Trigger, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A poisoned copy of the training set: round(rate * N) images of classes other than the
    target get the trigger and the target label. Returns (x, y, indices of poisoned images)."""
    check_poison_rate(rate)
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
