"""AutoAttack, standard version (Croce and Hein, ICML 2020), L-inf: APGD-CE, then APGD-T, FAB-T and
Square, each run on the points the previous ones left robust; a point counts as robust only
if it survives all four. The targeted attacks try the 9 classes with the highest clean
logits after the true one (fewer when there are fewer classes).
"""

from __future__ import annotations

import torch
from torch import nn

from ..configs import AutoAttackConfig
from ..runtime import autocast, frozen
from .apgd import apgd
from .fab import fab_targeted
from .square import square


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: AutoAttackConfig,
    indices: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int], dict[str, torch.Tensor]]:
    """(adversarial examples, robust: bool per example, robust count after each attack, robust
    per example after each attack). Points misclassified already are not attacked; `indices`
    key the random starts (batch-independent)."""
    model.eval()
    indices = torch.arange(len(x), device=x.device) if indices is None else indices.to(x.device)
    with torch.no_grad(), autocast(x.device):
        logits = model(x).float()
    robust = logits.argmax(1) == y
    ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
    targets = ranked[:, : min(config.n_targets, logits.shape[1] - 1)]
    x_adv = x.clone()
    after: dict[str, int] = {}
    stages: dict[str, torch.Tensor] = {}
    with torch.enable_grad(), frozen(model):
        for name in config.attacks:
            # the targeted attacks run once per target (k: the target's rank), the others once
            runs = range(targets.shape[1]) if name in ("apgd-t", "fab-t") else [0]
            for k in runs:
                todo = robust.nonzero()[:, 0]
                if len(todo) == 0:
                    break
                xs, ys, ids = x[todo], y[todo], indices[todo]
                if name == "apgd-ce":
                    adv = apgd(model, xs, ys, config.eps, config.n_iter, indices=ids, seed=seed)
                elif name == "apgd-t":
                    adv = apgd(
                        model,
                        xs,
                        ys,
                        config.eps,
                        config.n_iter,
                        target=targets[todo, k],
                        indices=ids,
                        seed=seed,
                        restart=k + 1,
                    )
                elif name == "fab-t":
                    adv = fab_targeted(model, xs, ys, targets[todo, k], config.eps, config.n_iter)
                else:
                    adv = square(model, xs, ys, config.eps, config.n_queries, indices=ids, seed=seed)
                # every attack stays in the ball
                adv = torch.min(torch.max(adv, xs - config.eps), xs + config.eps).clamp(0, 1)
                with torch.no_grad(), autocast(x.device):
                    fooled = model(adv).argmax(1) != ys
                x_adv[todo[fooled]] = adv[fooled]
                robust[todo[fooled]] = False
            after[name] = int(robust.sum())
            stages[name] = robust.clone()
    return x_adv.detach(), robust, after, stages
