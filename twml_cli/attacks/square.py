"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf: a score-based black-box attack, the
gradient-free member of AutoAttack (it catches gradient masking).

Random search on the margin loss z_y - max_{j != y} z_j: start at vertical stripes of +-eps,
then at each query redraw one random square window per image at +-eps (one sign per channel)
and keep it only if the margin falls. The window's area is a fraction p of the image,
shrinking on the paper's schedule from p_init = 0.8, not rescaled to the budget (as AutoAttack's
standard version runs it). The original draws one window and one sign per channel for the
whole batch at each query; here each example draws its own, keyed by (seed, example, query),
so an example's attack does not depend on its batch (each example's draws have the same
distribution as the original's).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..runtime import autocast, keyed_uniform

SQUARE_STREAM = 9


def margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per example (negative: misclassified)."""
    with torch.no_grad(), autocast(x.device):
        z = model(x).float()
    own = z.gather(1, y[:, None])[:, 0]
    z = z.scatter(1, y[:, None], float("-inf"))
    return own - z.amax(1)


def window_fraction(p_init: float, i: int) -> float:
    """The paper's schedule at query i: p_init halved after 10, 50, 200, 500, 1000, 2000, 4000,
    6000 and 8000 queries. Not rescaled to the budget: AutoAttack's standard version runs
    Square with `resc_schedule=False`, so at 5,000 queries the window stops at p_init / 2**7."""
    halvings = sum(i > mark for mark in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    n_queries: int = 5000,
    p_init: float = 0.8,
    indices: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Square Attack within the eps-ball of x and [0, 1]; returns the best point per example
    (adversarial where one was found). Randomness is keyed by (seed, example, query)."""
    n, c, h, w = x.shape
    device = x.device
    indices = torch.arange(n, device=device) if indices is None else indices.to(device)
    stripes = (keyed_uniform(indices, (c, 1, w), seed, SQUARE_STREAM, -1) < 0.5).to(x.dtype).view(n, c, 1, w) * 2 - 1
    x_best = (x + eps * stripes).clamp(0, 1)
    best = margin(model, x_best, y)
    rows = torch.arange(h, device=device).view(1, 1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, 1, w)
    for i in range(n_queries):  # after the stripes, n_queries more, as the original
        todo = (best > 0).nonzero()[:, 0]
        if len(todo) == 0:
            break
        side = max(1, min(h, w, round(math.sqrt(window_fraction(p_init, i) * h * w))))
        draw = keyed_uniform(indices[todo], (2 + c,), seed, SQUARE_STREAM, i)
        top = (draw[:, 0] * (h - side + 1)).long().view(-1, 1, 1, 1)
        left = (draw[:, 1] * (w - side + 1)).long().view(-1, 1, 1, 1)
        inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        signs = ((draw[:, 2:] < 0.5).to(x.dtype) * 2 - 1).view(-1, c, 1, 1)
        xs = x[todo]
        candidate = torch.where(inside, (xs + eps * signs).clamp(0, 1), x_best[todo])
        candidate = torch.min(torch.max(candidate, xs - eps), xs + eps)
        m = margin(model, candidate, y[todo])
        better = m < best[todo]
        x_best[todo] = torch.where(better.view(-1, 1, 1, 1), candidate, x_best[todo])
        best[todo] = torch.where(better, m, best[todo])
    return x_best
