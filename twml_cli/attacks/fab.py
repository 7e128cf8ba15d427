"""FAB-T (Croce and Hein, ICML 2020), L-inf: the targeted fast adaptive boundary attack, a
minimal-distortion attack.

At each step the decision boundary between the true class y and the target t is linearized,
z_t(z) - z_y(z) ~ f + w . (z - x_k). Both the current point and the original image are
projected onto that hyperplane inside the box [0, 1] (the smallest L-inf move, solved exactly
below); the step mixes the two projections, leaning toward the original by at most
alpha_max, and overshoots by eta. Once a point is adversarial it is kept if closer than the
best so far, and the next step starts between it and the original (a backward step, beta).
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import autocast

ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9  # the paper's values for L-inf


def project_linf(p: torch.Tensor, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The smallest L-inf move d (rows of p, w: (B, D); f: (B,)) with w . d = -f and p + d in
    [0, 1]. Moving every coordinate by eps toward -f's side (each clipped at its bound), w . d
    grows piecewise linearly in eps; the breakpoints are where coordinates hit their bounds,
    so sorting them finds eps exactly. When no move inside the box reaches the plane, the
    move that gets closest (every coordinate at its bound) is returned."""
    direction = torch.sign(-f)[:, None] * torch.sign(w)
    room = torch.where(direction > 0, 1 - p, torch.where(direction < 0, p, torch.zeros_like(p)))
    rate = w.abs() * (direction != 0)
    need = f.abs()
    caps, order = room.sort(dim=1)
    rates = rate.gather(1, order)
    before = torch.cumsum(rates * caps, dim=1) - rates * caps  # sum of r_j c_j over the coordinates saturated first
    after = rates.flip(1).cumsum(1).flip(1)  # sum of r_j over the coordinates still moving
    reach = before + caps * after  # w . d when eps equals each breakpoint
    enough = reach >= need[:, None]
    k = enough.float().argmax(dim=1)
    feasible = enough.any(dim=1)
    eps = (need - before.gather(1, k[:, None])[:, 0]) / after.gather(1, k[:, None])[:, 0].clamp_min(1e-12)
    eps = torch.where(feasible, eps, caps[:, -1])
    return direction * torch.minimum(eps[:, None], room)


def _boundary(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor):
    """(logits, f = z_t - z_y, its gradient w.r.t. x) at x."""
    x = x.clone().requires_grad_(True)
    with autocast(x.device):
        logits = model(x)
    z = logits.float()
    f = z.gather(1, target[:, None])[:, 0] - z.gather(1, y[:, None])[:, 0]
    (w,) = torch.autograd.grad(f.sum(), x)
    return logits.detach(), f.detach(), w


def fab_targeted(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, eps: float, n_iter: int = 100
) -> torch.Tensor:
    """FAB-T toward `target` (a class per example), started at x. Returns, per example, the
    closest adversarial point found within eps (L-inf), else x itself."""
    shape, n = x.shape, len(x)
    x0 = x.flatten(1)
    x_k = x0.clone()
    best = x0.clone()
    best_norm = torch.full((n,), float("inf"), device=x.device)
    for _ in range(n_iter):
        _, f, w = _boundary(model, x_k.view(shape), y, target)
        with torch.no_grad():
            w = w.flatten(1)
            d_k = project_linf(x_k, w, f)
            d_orig = project_linf(x0, w, f + (w * (x0 - x_k)).sum(1))  # the same hyperplane, seen from the original
            a_k, a_orig = d_k.abs().amax(1), d_orig.abs().amax(1)
            alpha = (a_k / (a_k + a_orig).clamp_min(1e-12)).clamp(0, ALPHA_MAX)[:, None]
            x_k = ((1 - alpha) * (x_k + ETA * d_k) + alpha * (x0 + ETA * d_orig)).clamp(0, 1)
            with autocast(x.device):
                adversarial = model(x_k.view(shape)).argmax(1) != y
            norm = (x_k - x0).abs().amax(1)
            closer = adversarial & (norm < best_norm)
            best = torch.where(closer[:, None], x_k, best)
            best_norm = torch.where(closer, norm, best_norm)
            x_k = torch.where(adversarial[:, None], (1 - BETA) * x0 + BETA * x_k, x_k)  # back toward the original
    found = best_norm <= eps + 1e-7
    return torch.where(found[:, None], best, x0).view(shape).detach()
