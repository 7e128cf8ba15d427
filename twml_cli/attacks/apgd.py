"""APGD (Croce and Hein, ICML 2020), L-inf: PGD with a step size that needs no tuning.

The step starts at 2 eps and is halved at checkpoints when the loss stalls; a momentum of
0.75 mixes each step with the last; after a halving the search restarts from the best point
so far. APGD-CE maximizes cross-entropy; APGD-T maximizes the targeted DLR loss
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
toward a target class t (pi: the logits sorted in decreasing order), invariant to the logits'
scale, so a model cannot hide behind large or saturated logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import autocast, keyed_uniform

APGD_STREAM = 8
RHO = 0.75  # a checkpoint halves the step unless the loss rose in at least 75% of the steps since the last
MOMENTUM = 0.75


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per example, the targeted DLR loss (larger: closer to class `target`). Needs 4 classes."""
    z = logits.float()
    top = z.sort(dim=1, descending=True).values
    margin = z.gather(1, y[:, None])[:, 0] - z.gather(1, target[:, None])[:, 0]
    return -margin / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None):
    """(per-example loss, logits, gradient of the loss w.r.t. x)."""
    x = x.clone().requires_grad_(True)
    with autocast(x.device):
        logits = model(x)
    if target is None:
        loss = F.cross_entropy(logits.float(), y, reduction="none")
    elif logits.shape[1] >= 4:
        loss = dlr_targeted(logits, y, target)
    else:  # too few classes for DLR: targeted cross-entropy
        loss = -F.cross_entropy(logits.float(), target, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), logits.detach(), grad


def checkpoints(n_iter: int) -> list[int]:
    """The iterations after which the step size is checked: the first after 22% of the budget,
    then ever closer (the interval shrinks by 3% of the budget a time, to at least 6%)."""
    interval, shrink, floor = max(round(0.22 * n_iter), 1), max(round(0.03 * n_iter), 1), max(round(0.06 * n_iter), 1)
    points, at = [], interval
    while at < n_iter:
        points.append(at)
        interval = max(interval - shrink, floor)
        at += interval
    return points


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    n_iter: int = 100,
    target: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    seed: int = 0,
    restart: int = 0,
) -> torch.Tensor:
    """APGD-CE (target None) or APGD-T (target: a class per example). Returns, per example, an
    adversarial point if one was found, else the point of highest loss; all within the
    eps-ball of x and in [0, 1]. The random start is keyed by (seed, example, restart)."""
    device = x.device
    indices = torch.arange(len(x), device=device) if indices is None else indices.to(device)
    t = 2 * keyed_uniform(indices, tuple(x.shape[1:]), seed, APGD_STREAM, restart).to(x.dtype).view_as(x) - 1
    t = t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)  # a start on the ball's surface

    def project(z: torch.Tensor) -> torch.Tensor:
        return torch.min(torch.max(z, x - eps), x + eps).clamp(0, 1)

    x_adv = project(x + eps * t)
    loss, logits, grad = _loss(model, x_adv, y, target)
    fooled = logits.argmax(1) != y
    x_found = torch.where(fooled.view(-1, 1, 1, 1), x_adv, x)
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    step = torch.full((len(x), 1, 1, 1), 2.0 * eps, device=device)
    x_prev = x_adv.clone()
    marks = set(checkpoints(n_iter))
    last_mark, rises = 0, torch.zeros(len(x), device=device)
    # As the original counts them: the first step's loss is compared with 0 (its loss history
    # starts as zeros), and the first checkpoint halves only for oscillation, never for "no
    # improvement since the last checkpoint" (it treats the start as a checkpoint that halved).
    loss = torch.zeros_like(loss)
    best_at_last_mark, halved_at_last_mark = loss_best.clone(), torch.ones(len(x), dtype=torch.bool, device=device)
    for i in range(n_iter):
        with torch.no_grad():
            a = MOMENTUM if i > 0 else 1.0
            z = project(x_adv + step * grad.sign())
            x_new = project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev))
            x_prev, x_adv = x_adv, x_new
        new_loss, logits, grad = _loss(model, x_adv, y, target)
        with torch.no_grad():
            now_fooled = logits.argmax(1) != y
            x_found = torch.where((now_fooled & ~fooled).view(-1, 1, 1, 1), x_adv, x_found)
            fooled |= now_fooled
            rises += (new_loss > loss).float()
            loss = new_loss
            better = loss > loss_best
            x_best = torch.where(better.view(-1, 1, 1, 1), x_adv, x_best)
            grad_best = torch.where(better.view(-1, 1, 1, 1), grad, grad_best)
            loss_best = torch.where(better, loss, loss_best)
            if i + 1 in marks:
                since = i + 1 - last_mark
                stalled = rises <= RHO * since
                no_progress = ~halved_at_last_mark & (best_at_last_mark >= loss_best)
                halve = stalled | no_progress
                step = torch.where(halve.view(-1, 1, 1, 1), step / 2, step)
                x_adv = torch.where(halve.view(-1, 1, 1, 1), x_best, x_adv)
                grad = torch.where(halve.view(-1, 1, 1, 1), grad_best, grad)
                halved_at_last_mark, best_at_last_mark = halve, loss_best.clone()
                last_mark, rises = i + 1, torch.zeros_like(rises)
    return torch.where(fooled.view(-1, 1, 1, 1), x_found, x_best).detach()
