"""What each training method does to a batch, one class each: standard training (nothing), free
adversarial training (Shafahi et al.: m replays, one persistent perturbation), fast adversarial
training (Wong et al.: FGSM from a random start, step 1.25 eps) and Gaussian noise (Cohen et
al.'s base classifiers). training.train calls them; they know nothing of the loop around them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configs import check_eps, check_free, check_noise
from .runtime import autocast, generator, keyed_uniform

NOISE_STREAM, FAST_STREAM = 2, 6


@dataclass(frozen=True)
class Batch:
    """One process's share of a global minibatch."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor  # example indices (keys of per-example randomness)
    step: int  # optimizer step
    offset: int  # where this share starts in the global batch
    global_size: int
    pass_index: int = 0  # passes over the data made before this one


class Perturbation:
    """Standard training: the batch goes in as it is, once."""

    name = "standard"
    replays = 1  # SGD steps per minibatch
    passes_per_step = 1  # forward-backward passes per SGD step
    copies = 1  # inputs trained on per example at each step (noisy copies)

    def inputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The tensor the model trains on at this optimizer step."""
        return batch.x

    def objective(
        self, net: nn.Module, model: nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits, labels) of this step: cross-entropy on `inputs` unless a method has its
        own loss. `net` is the module to train through (DDP, compiled), `model` the bare one."""
        with autocast(batch.x.device):
            logits = net(self.inputs(model, batch))
            loss = F.cross_entropy(logits, batch.y)
        return loss, logits, batch.y

    def after_backward(self) -> None:
        """Called after loss.backward(), before optimizer.step()."""

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


class FreeAdversarial(Perturbation):
    """Free adversarial training: m replays per minibatch, one persistent delta."""

    name = "free"

    def __init__(self, eps: float, m: int):
        check_free(eps, m)
        self.eps, self.replays = eps, m
        self.delta: torch.Tensor | None = None  # (batch_size, C, H, W), persists across everything
        self._leaf: torch.Tensor | None = None

    def inputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x = batch.x
        if self.delta is None:
            self.delta = torch.zeros((0, *x.shape[1:]), device=x.device)
        if len(self.delta) < len(x):  # the first (full) minibatch sizes the buffer
            self.delta = torch.cat([self.delta, torch.zeros_like(x[len(self.delta) :])])
        self._leaf = self.delta[: len(x)].clone().requires_grad_(True)
        return (x + self._leaf).clamp(0, 1)

    def after_backward(self) -> None:
        leaf, delta = self._leaf, self.delta
        assert leaf is not None and leaf.grad is not None and delta is not None  # before_forward and backward ran
        with torch.no_grad():
            delta[: len(leaf)] = (leaf + self.eps * leaf.grad.sign()).clamp(-self.eps, self.eps)

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.delta is None else {"delta": self.delta.detach().contiguous()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.delta = tensors.get("delta")


class FastAdversarial(Perturbation):
    """FGSM from a uniform random start in the eps-ball, step alpha (1.25 eps), projected."""

    name = "fast"
    passes_per_step = 2

    def __init__(self, eps: float, alpha: float | None = None, seed: int = 0):
        check_eps(eps)
        self.eps, self.alpha, self.seed = eps, 1.25 * eps if alpha is None else alpha, seed

    def inputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, eps = batch.x, self.eps
        start = keyed_uniform(batch.idx, tuple(x.shape[1:]), self.seed, FAST_STREAM, batch.step).to(x.dtype)
        delta = ((2 * start - 1) * eps).view_as(x)
        delta = (x + delta).clamp(0, 1) - x  # stay in the image
        delta.requires_grad_(True)
        with autocast(x.device):
            loss = F.cross_entropy(model(x + delta), batch.y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + self.alpha * grad.sign()).clamp(-eps, eps)
        return (x + delta).clamp(0, 1)


class GaussianNoise(Perturbation):
    """Gaussian data augmentation for randomized smoothing: x + N(0, sigma^2 I), fresh at
    every step, in pixel space, not clamped (Cohen et al., 2019). The noise of a global batch
    comes from one stream keyed by the step; each process takes its share of it."""

    name = "noise"

    def __init__(self, sigma: float, seed: int = 0):
        check_noise(sigma)
        self.sigma, self.seed = sigma, seed

    def inputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return batch.x + noise_draws(batch, 1, self.sigma, self.seed)[0]


def noise_draws(batch: Batch, copies: int, sigma: float, seed: int) -> torch.Tensor:
    """(copies, len(batch.x), C, H, W) Gaussian noise of standard deviation sigma for this
    process's share of the global batch: one stream per (seed, step), drawn for the whole global
    batch, so the draws do not depend on the number of processes."""
    x = batch.x
    g = generator(x.device, seed, NOISE_STREAM, batch.step)
    noise = torch.randn((copies, batch.global_size, *x.shape[1:]), generator=g, device=x.device)
    return sigma * noise[:, batch.offset : batch.offset + len(x)]
