"""The robustness evaluation: clean accuracy, PGD and (optionally) AutoAttack over a data set,
sharded over processes, counted on the device."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..examples import Folder, InMemory
from ..runtime import Progress, Timer, autocast, no_progress
from .autoattack import AutoAttackConfig
from .autoattack import autoattack as run_autoattack
from .pgd import PGDConfig, pgd


@dataclass(frozen=True)
class RobustnessResult:
    """What evaluate_robustness measured: clean accuracy, PGD (and AutoAttack) figures, times and
    the per-example table."""

    accuracy: float  # clean test accuracy
    pgd_success_rate: float  # fraction misclassified under attack; already-wrong inputs count as successes
    robust_accuracy: float  # fraction classified correctly under attack (= 1 - success rate)
    num_examples: int
    attack_time_s: float  # PGD's
    autoattack_robust_accuracy: float | None = None  # surviving all four AutoAttack attacks
    robust_accuracy_worst: float | None = None  # surviving PGD and AutoAttack, per example
    autoattack_time_s: float | None = None
    autoattack_after: dict[str, float] | None = None  # robust accuracy after each AutoAttack attack
    examples: dict[str, np.ndarray] | None = field(
        default=None, compare=False
    )  # per example, in index order: see EXAMPLE_COLUMNS


# The per-example table of an evaluation: what lets two evaluations be compared point by point.
# Margins are the true class's logit minus the largest other one (negative: misclassified);
# *_reused: broken at a smaller eps of the same robustness curve, so not attacked again.
EXAMPLE_COLUMNS = ("idx", "label", "clean_pred", "clean_margin", "pgd_reused", "pgd_robust", "pgd_margin")


def evaluate_robustness(
    model: nn.Module,
    data,
    config: PGDConfig,
    batch_size: int = 512,
    seed: int = 0,
    progress: Progress = no_progress,
    autoattack: AutoAttackConfig | None = None,
    indices: np.ndarray | None = None,
    broken: np.ndarray | None = None,
    aa_broken: np.ndarray | None = None,
) -> RobustnessResult:
    """Clean accuracy and PGD (and, if asked, AutoAttack with the per-example worst case of the
    two) on the examples `indices` of `data` (default: all; examples.InMemory or Folder, or a
    pair of tensors), counted per example. `broken` (`aa_broken`): a bool per example of
    `indices` that PGD (AutoAttack) already broke at a smaller eps of a robustness curve: an
    adversarial example inside a smaller ball lies inside this one, so those are not attacked
    again and count as broken, and each figure is the worst case over its attack's eps so far.
    Under torchrun every process attacks its share and the rows are gathered; random starts are
    keyed by example, so the figures equal one process's."""
    device = next(model.parameters()).device
    data = _examples(data)
    model.eval()
    chosen = torch.arange(len(data)) if indices is None else torch.as_tensor(indices, dtype=torch.long)

    def mask(given) -> torch.Tensor:
        return torch.zeros(len(chosen), dtype=torch.bool) if given is None else torch.as_tensor(given, dtype=torch.bool)

    names = autoattack.attacks if autoattack else ()
    keys = EXAMPLE_COLUMNS + ((*(f"aa_{_key(a)}" for a in names), "aa_reused") if autoattack else ())
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    share = distributed.shard(len(chosen))
    mine = list(zip(*(t[share].split(batch_size) for t in (chosen, mask(broken), mask(aa_broken)))))
    pgd_s = aa_s = 0.0
    batches = data.batches([idx for idx, _, _ in mine], device)
    for (xb, yb, idx), (_, reused, aa_reused) in progress(
        zip(batches, mine), len(mine), "PGD" + (" and AutoAttack" if autoattack else "")
    ):
        reused, aa_reused = reused.to(device), aa_reused.to(device)
        with torch.inference_mode(), autocast(device):
            logits = model(xb).float()
        adv_logits = logits.clone()
        todo = (~reused).nonzero()[:, 0]
        with Timer(device) as t:
            if len(todo):
                x_adv = pgd(model, xb[todo], yb[todo], config, indices=idx[todo], seed=seed)
                with torch.inference_mode(), autocast(device):
                    adv_logits[todo] = model(x_adv).float()
        pgd_s += t.seconds
        adv_margin = torch.where(
            reused, float("nan"), _margin(adv_logits, yb)
        )  # not attacked again: no margin at this eps
        row = {
            "idx": idx,
            "label": yb,
            "clean_pred": logits.argmax(1),
            "clean_margin": _margin(logits, yb),
            "pgd_reused": reused,
            "pgd_robust": ~reused & (adv_logits.argmax(1) == yb),
            "pgd_margin": adv_margin,
        }
        if autoattack is not None:
            todo = (~aa_reused).nonzero()[:, 0]
            with Timer(device) as t:
                stages = {a: torch.zeros(len(xb), dtype=torch.bool, device=device) for a in names}
                if len(todo):
                    _, _, _, after = run_autoattack(model, xb[todo], yb[todo], autoattack, indices=idx[todo], seed=seed)
                    for a in names:
                        stages[a][todo] = after[a]
            aa_s += t.seconds
            row.update({f"aa_{_key(a)}": stages[a] for a in names}, aa_reused=aa_reused)
        for k in keys:
            columns[k].append(row[k].cpu())

    def column(
        k: str, parts: list[torch.Tensor]
    ) -> torch.Tensor:  # a process with no examples (more processes than examples) has none
        empty = (
            torch.long if k in ("idx", "label", "clean_pred") else torch.float32 if k.endswith("margin") else torch.bool
        )
        return torch.cat(parts) if parts else torch.zeros(0, dtype=empty)

    def gather(t: torch.Tensor) -> np.ndarray:  # flags travel as bytes (not every backend gathers bools)
        rows = distributed.all_gather_rows(
            (t.to(torch.uint8) if t.dtype == torch.bool else t).to(distributed.collective_device())
        ).cpu()
        return rows.bool().numpy() if t.dtype == torch.bool else rows.numpy()

    gathered = {k: gather(column(k, c)) for k, c in columns.items()}
    order = np.argsort(gathered["idx"], kind="stable")
    examples = {k: v[order] for k, v in gathered.items()}
    n = len(chosen)

    def share_of(flags) -> float:
        return float(np.mean(flags)) if n else 0.0

    pgd_robust = examples["pgd_robust"].astype(bool)
    aa = autoattack is not None
    survived = examples[f"aa_{_key(names[-1])}"].astype(bool) if aa else pgd_robust
    return RobustnessResult(
        accuracy=share_of(examples["clean_pred"] == examples["label"]),
        pgd_success_rate=1.0 - share_of(pgd_robust),
        robust_accuracy=share_of(pgd_robust),
        num_examples=n,
        attack_time_s=pgd_s,
        autoattack_robust_accuracy=share_of(survived) if aa else None,
        robust_accuracy_worst=share_of(survived & pgd_robust) if aa else None,
        autoattack_time_s=aa_s if aa else None,
        autoattack_after={a: share_of(examples[f"aa_{_key(a)}"]) for a in names} if aa else None,
        examples=examples,
    )


def _key(attack: str) -> str:
    return attack.replace("-", "_")


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The true class's logit minus the largest other one."""
    true = logits.gather(1, y[:, None])[:, 0]
    return true - logits.scatter(1, y[:, None], float("-inf")).max(1).values


def accuracy(model: nn.Module, data, batch_size: int = 1024) -> float:
    """Clean accuracy in eval mode on `data` (examples, or a pair of tensors), counted on the
    device; each process takes its share."""
    data = _examples(data)
    right = _right(model, data, _my_batches(len(data), batch_size))
    return distributed.all_reduce_sum(right.sum()).item() / len(data)


def classified_right(model: nn.Module, data, batch_size: int = 1024) -> torch.Tensor:
    """Which examples of `data` the model classifies right in eval mode, in order, on the CPU:
    every example, in this process alone (a paired comparison of two models reads the same ones)."""
    data = _examples(data)
    return _right(model, data, list(torch.arange(len(data)).split(batch_size))).cpu()


def _right(model: nn.Module, data: InMemory | Folder, batches: list[torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode(), autocast(device):
        found = [model(xb).argmax(1) == yb for xb, yb, _ in data.batches(batches, device)]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.bool, device=device)


def _examples(data):
    return InMemory(*data) if isinstance(data, tuple) else data


def _my_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    """This process's share of range(n), in batches."""
    mine = torch.arange(n)[distributed.shard(n)]
    return list(mine.split(batch_size))
