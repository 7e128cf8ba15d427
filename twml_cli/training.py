"""One training loop. Standard, free adversarial, Gaussian-noise and poisoned training differ
only in what they do to a batch (a `Perturbation`); poisoning happens to the data set
before training (see backdoor.py).

Free adversarial training (Shafahi et al., NeurIPS 2019): one perturbation buffer `delta`
(the shape of a minibatch, zero at first) persists across replays, minibatches and
passes. Each minibatch is replayed m times; each replay trains on clamp(x + delta, 0, 1),
and its single backward pass gives the weights' gradient and delta's, then
delta <- clip(delta + eps * sign(grad_delta), -eps, eps). The data is passed over
ceil(epochs / m) times, so the number of SGD steps, and the time, match standard
training for `epochs` epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import Progress, Timer, autocast, generator, no_progress, to_device_layout

SCHEDULES = ("cosine", "step", "constant")
NOISE_STREAM = 2


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum, weight decay and a per-step learning-rate schedule."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{self.schedule}': use one of {', '.join(SCHEDULES)}")


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    progress = step / max(total_steps, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


# ---------------------------------------------------------------- what happens to a batch


class Perturbation:
    """Standard training: the batch goes in as it is, once."""

    name = "standard"
    replays = 1

    def inputs(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The tensor the model trains on at this optimizer step."""
        return x

    def after_backward(self) -> None:
        """Called after loss.backward(), before optimizer.step()."""


class FreeAdversarial(Perturbation):
    """Free adversarial training: m replays per minibatch, one persistent delta."""

    name = "free"

    def __init__(self, eps: float, m: int):
        if m < 1:
            raise ValueError(f"m (replays per minibatch) must be >= 1, got {m}")
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps must lie in [0, 1] (pixel units), got {eps}")
        self.eps, self.replays = eps, m
        self.delta: torch.Tensor | None = None  # (batch_size, C, H, W), persists across everything
        self._leaf: torch.Tensor | None = None

    def inputs(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.delta is None:
            self.delta = torch.zeros((0, *x.shape[1:]), device=x.device)
        if len(self.delta) < len(x):  # the first (full) minibatch sizes the buffer
            self.delta = torch.cat([self.delta, torch.zeros_like(x[len(self.delta) :])])
        self._leaf = self.delta[: len(x)].clone().requires_grad_(True)
        return (x + self._leaf).clamp(0, 1)

    def after_backward(self) -> None:
        leaf = self._leaf
        with torch.no_grad():
            self.delta[: len(leaf)] = (leaf + self.eps * leaf.grad.sign()).clamp(-self.eps, self.eps)


class GaussianNoise(Perturbation):
    """Gaussian data augmentation for randomized smoothing: x + N(0, sigma^2 I), fresh at
    every step, in pixel space, not clamped (Cohen et al., 2019)."""

    name = "noise"

    def __init__(self, sigma: float, seed: int = 0):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma, self.seed = sigma, seed

    def inputs(self, x: torch.Tensor, step: int) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator(x.device, self.seed, NOISE_STREAM, step), device=x.device)
        return x + self.sigma * noise


# ---------------------------------------------------------------- the loop


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # epochs of SGD budget spent so far: pass * replays (aligns free and standard curves)
    loss: float
    accuracy: float  # on the inputs actually trained on (perturbed ones for free training)


@dataclass
class TrainResult:
    steps: int  # optimizer steps
    passes: int  # passes over the training data
    train_time_s: float  # training only, no evaluation
    images_per_s: float  # images through forward+backward per second, replays counted
    history: list[EpochStats] = field(default_factory=list)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    perturbation: Perturbation | None = None,
    progress: Progress = no_progress,
) -> TrainResult:
    """Train `model` (already on its device) on images x in [0, 1] and labels y.

    The data is passed over ceil(epochs / replays) times; each minibatch is replayed
    `perturbation.replays` times, each replay one SGD step, so every method makes
    ceil(epochs / replays) * replays * ceil(N / batch_size) steps.
    """
    perturbation = perturbation or Perturbation()
    device = next(model.parameters()).device
    x, y = to_device_layout(x, device), y.to(device)
    n, bs, replays = len(x), config.batch_size, perturbation.replays
    batches_per_pass = math.ceil(n / bs)
    passes = math.ceil(config.epochs / replays)
    total_steps = passes * batches_per_pass * replays

    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.momentum > 0
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config.schedule, s, total_steps))
    shuffle = generator(device, config.seed)
    history: list[EpochStats] = []
    step = 0
    model.train()
    with Timer(device) as timer:
        ticks = range(passes * batches_per_pass)
        for tick in progress(ticks, len(ticks), f"train ({perturbation.name})"):
            p, b = divmod(tick, batches_per_pass)
            if b == 0:
                order = torch.randperm(n, generator=shuffle, device=device)
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), dtype=torch.long, device=device)
            idx = order[b * bs : (b + 1) * bs]
            xb, yb = x[idx], y[idx]
            for _ in range(replays):
                inputs = perturbation.inputs(xb, step)
                with autocast(device):
                    logits = model(inputs)
                    loss = F.cross_entropy(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                perturbation.after_backward()
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum += loss.detach().float() * len(yb)
                correct += (logits.detach().argmax(1) == yb).sum()
            if b == batches_per_pass - 1:  # one host sync per pass
                seen = n * replays
                history.append(EpochStats((p + 1) * replays, loss_sum.item() / seen, correct.item() / seen))
    model.eval()
    return TrainResult(
        steps=step,
        passes=passes,
        train_time_s=timer.seconds,
        images_per_s=passes * n * replays / timer.seconds,
        history=history,
    )
