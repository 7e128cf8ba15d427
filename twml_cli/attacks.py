"""Untargeted white-box L-inf PGD (Madry et al., 2018) and the robustness evaluation.

Inputs are [0, 1] images and the model normalizes inside, so eps and alpha are in pixel
units. The model is evaluated in eval mode. Under torchrun every process attacks its share
of the test set and the counts are summed: the per-example random starts are keyed by the
example's index, so the figures equal one process's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime
from .examples import InMemory
from .runtime import Progress, Timer, autocast, frozen, keyed_uniform, no_progress

PGD_STREAM = 1  # key that separates PGD's random starts from other derived streams


@dataclass(frozen=True)
class PGDConfig:
    eps: float
    alpha: float
    steps: int = 10
    restarts: int = 1

    def __post_init__(self):
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"eps must lie in [0, 1] (pixel units), got {self.eps}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"pgd alpha must lie in (0, 1], got {self.alpha}")
        if self.steps < 1:
            raise ValueError(f"pgd steps must be >= 1, got {self.steps}")
        if self.restarts < 1:
            raise ValueError(f"pgd restarts must be >= 1, got {self.restarts}")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: PGDConfig,
    indices: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Adversarial examples in the eps-ball around x (and in [0, 1]).

    Each restart starts uniformly in the ball and takes `steps` signed-gradient steps of
    size alpha on the cross-entropy. Per example the most damaging restart is kept: one
    that is misclassified, else the one with the highest loss. The random start of
    example i is hashed from (seed, indices[i], restart) on the device (no Python loop), so
    results do not depend on batching or on how the data is split across processes.
    """
    eps, alpha = config.eps, config.alpha
    device = x.device
    indices = torch.arange(len(x), device=device) if indices is None else torch.as_tensor(indices, device=device)
    with torch.enable_grad(), frozen(model):
        best = x.clone()
        best_loss = torch.full((len(x),), -float("inf"), device=device)
        best_fooled = torch.zeros(len(x), dtype=torch.bool, device=device)
        for restart in range(config.restarts):
            start = keyed_uniform(indices, tuple(x.shape[1:]), seed, PGD_STREAM, restart).to(x.dtype).view_as(x)
            x_adv = (x + (2 * start - 1) * eps).clamp(0, 1)
            for _ in range(config.steps):
                x_adv.requires_grad_(True)
                with autocast(device):
                    loss = F.cross_entropy(model(x_adv), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x_adv)
                x_adv = x_adv.detach() + alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
            with torch.no_grad(), autocast(device):
                logits = model(x_adv)
                loss = F.cross_entropy(logits.float(), y, reduction="none")
                fooled = logits.argmax(1) != y
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            best = torch.where(better.view(-1, 1, 1, 1), x_adv, best)
            best_loss = torch.where(better, loss, best_loss)
            best_fooled |= fooled
    return best.detach()


@dataclass(frozen=True)
class RobustnessResult:
    accuracy: float  # clean test accuracy
    pgd_success_rate: float  # fraction misclassified under attack; already-wrong inputs count as successes
    robust_accuracy: float  # fraction classified correctly under attack (= 1 - success rate)
    num_examples: int
    attack_time_s: float


def evaluate_robustness(
    model: nn.Module,
    data,
    config: PGDConfig,
    batch_size: int = 512,
    seed: int = 0,
    progress: Progress = no_progress,
) -> RobustnessResult:
    """Clean accuracy and PGD on every example of `data` (examples.InMemory or Folder, or a
    pair of tensors), counted on the device; each process takes its share."""
    device = next(model.parameters()).device
    data = _examples(data)
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    robust = torch.zeros((), dtype=torch.long, device=device)
    mine = _my_batches(len(data), batch_size)
    with Timer(device) as timer:
        for xb, yb, idx in progress(data.batches(mine, device), len(mine), "PGD"):
            with torch.inference_mode(), autocast(device):
                correct += (model(xb).argmax(1) == yb).sum()
            x_adv = pgd(model, xb, yb, config, indices=idx, seed=seed)
            with torch.inference_mode(), autocast(device):
                robust += (model(x_adv).argmax(1) == yb).sum()
        counts = runtime.all_reduce_sum(torch.stack([correct, robust]))
    n = len(data)
    robust_accuracy = counts[1].item() / n
    return RobustnessResult(
        accuracy=counts[0].item() / n,
        pgd_success_rate=1.0 - robust_accuracy,
        robust_accuracy=robust_accuracy,
        num_examples=n,
        attack_time_s=timer.seconds,
    )


def accuracy(model: nn.Module, data, batch_size: int = 1024) -> float:
    """Clean accuracy in eval mode on `data` (examples, or a pair of tensors), counted on the
    device; each process takes its share."""
    device = next(model.parameters()).device
    data = _examples(data)
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    with torch.inference_mode(), autocast(device):
        for xb, yb, _ in data.batches(_my_batches(len(data), batch_size), device):
            correct += (model(xb).argmax(1) == yb).sum()
    return runtime.all_reduce_sum(correct).item() / len(data)


def _examples(data):
    return InMemory(*data) if isinstance(data, tuple) else data


def _my_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    """This process's share of range(n), in batches."""
    mine = torch.arange(n)[runtime.shard(n)]
    return list(mine.split(batch_size))
