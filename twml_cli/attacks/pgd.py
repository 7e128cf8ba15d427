"""Untargeted white-box L-inf PGD (Madry et al., 2018), with random starts and restarts.

Inputs are [0, 1] images and the model normalizes inside, so eps and alpha are in pixel
units; the model is attacked in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import PGDConfig
from ..runtime import autocast, frozen, keyed_uniform

PGD_STREAM = 1  # key that separates PGD's random starts from other derived streams


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
