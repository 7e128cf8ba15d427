"""The robustness evaluation: clean accuracy, PGD and (optionally) AutoAttack over a data set,
sharded over processes, counted on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import runtime
from ..examples import InMemory
from ..runtime import Progress, Timer, autocast, no_progress
from .autoattack import AutoAttackConfig
from .autoattack import autoattack as run_autoattack
from .pgd import PGDConfig, pgd


@dataclass(frozen=True)
class RobustnessResult:
    accuracy: float  # clean test accuracy
    pgd_success_rate: float  # fraction misclassified under attack; already-wrong inputs count as successes
    robust_accuracy: float  # fraction classified correctly under attack (= 1 - success rate)
    num_examples: int
    attack_time_s: float  # PGD's
    autoattack_robust_accuracy: float | None = None  # surviving all four AutoAttack attacks
    robust_accuracy_worst: float | None = None  # surviving PGD and AutoAttack, per example
    autoattack_time_s: float | None = None
    autoattack_after: dict[str, float] | None = None  # robust accuracy after each AutoAttack attack


def evaluate_robustness(
    model: nn.Module,
    data,
    config: PGDConfig,
    batch_size: int = 512,
    seed: int = 0,
    progress: Progress = no_progress,
    autoattack: AutoAttackConfig | None = None,
) -> RobustnessResult:
    """Clean accuracy and PGD (and, if asked, AutoAttack with the per-example worst case of the
    two) on every example of `data` (examples.InMemory or Folder, or a pair of tensors),
    counted on the device. Under torchrun every process attacks its share and the counts are
    summed; random starts are keyed by example, so the figures equal one process's."""
    device = next(model.parameters()).device
    data = _examples(data)
    model.eval()
    # clean, PGD-robust, AutoAttack-robust, robust to both; then robust after each AutoAttack attack
    names = autoattack.attacks if autoattack else ()
    counts = torch.zeros(4 + len(names), dtype=torch.long, device=device)
    mine = _my_batches(len(data), batch_size)
    pgd_s = aa_s = 0.0
    for xb, yb, idx in progress(data.batches(mine, device), len(mine), "PGD" + (" and AutoAttack" if autoattack else "")):
        with torch.inference_mode(), autocast(device):
            counts[0] += (model(xb).argmax(1) == yb).sum()
        with Timer(device) as t:
            x_adv = pgd(model, xb, yb, config, indices=idx, seed=seed)
            with torch.inference_mode(), autocast(device):
                robust = model(x_adv).argmax(1) == yb
        pgd_s += t.seconds
        counts[1] += robust.sum()
        if autoattack is not None:
            with Timer(device) as t:
                _, survived, after = run_autoattack(model, xb, yb, autoattack, indices=idx, seed=seed)
            aa_s += t.seconds
            counts[2] += survived.sum()
            counts[3] += (survived & robust).sum()
            counts[4:] += torch.tensor([after[a] for a in names], device=device)
    counts = runtime.all_reduce_sum(counts).tolist()
    n = len(data)
    aa = autoattack is not None
    return RobustnessResult(
        accuracy=counts[0] / n,
        pgd_success_rate=1.0 - counts[1] / n,
        robust_accuracy=counts[1] / n,
        num_examples=n,
        attack_time_s=pgd_s,
        autoattack_robust_accuracy=counts[2] / n if aa else None,
        robust_accuracy_worst=counts[3] / n if aa else None,
        autoattack_time_s=aa_s if aa else None,
        autoattack_after={a: c / n for a, c in zip(names, counts[4:])} if aa else None,
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
