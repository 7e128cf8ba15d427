"""Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineer, for every class t, the
smallest trigger (mask m, pattern p) that sends clean images to t, then flag classes whose
trigger is abnormally small.

    x' = (1 - m) * x + m * p,   m = tanh(w_m) / 2 + 1/2 (H x W),  p = tanh(w_p) / 2 + 1/2 (C x H x W)
    loss_t = CE(f(x'), t) + lambda_t * |m|_1

All classes of a model are optimized together: K masks and K patterns, one forward over
K x B stamped images per step. Adam is elementwise and the losses are separate, so this
is the class-by-class method run in parallel, not an approximation of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .backdoor import stamped_success_rate
from .configs import CleanseConfig
from .runtime import Progress, autocast, frozen, generator, no_autotune, no_progress, to_device_layout

CLEANSE_STREAM = 4
MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal's standard deviation
TANH_EPSILON = 1e-7


@dataclass
class ReversedTriggers:
    """The best trigger found for each class (CPU tensors)."""

    classes: list[int]
    masks: torch.Tensor  # (K, H, W) in [0, 1]
    patterns: torch.Tensor  # (K, C, H, W) in [0, 1]
    norms: np.ndarray  # (K,) L1 norm of each mask
    success: np.ndarray  # (K,) attack success of the stamped clean batch when the mask was kept
    reached: np.ndarray  # (K,) whether the success threshold was ever reached
    rounds: np.ndarray  # (K,) optimization rounds each class ran before it stopped (its kept start's)
    start_norms: np.ndarray | None = (
        None  # (K, restarts) the norm each start ended with (inf: never reached the threshold)
    )
    images: int = 0  # stamped images through the model, every start of every class: the search's cost


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) * x + m * p for images x (N, C, H, W), mask (H, W) and pattern (C, H, W)."""
    return (1 - mask) * x + mask * pattern


def _to_tanh_space(v: torch.Tensor) -> torch.Tensor:
    return torch.atanh((v - 0.5) * (2 - TANH_EPSILON))


def reverse_engineer(
    model: nn.Module,
    x_clean: torch.Tensor,
    num_classes: int,
    config: CleanseConfig = CleanseConfig(),
    classes: list[int] | None = None,
    progress: Progress = no_progress,
    on_round: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
) -> ReversedTriggers:
    """Reverse-engineer a trigger for every class in `classes` (default: all), together.

    Dynamic lambda per class, as the authors: lambda starts at 0; once the stamped images
    reach `threshold` success for `patience` rounds it is set to init_cost; then it is
    multiplied by cost_multiplier after `patience` successful rounds in a row and divided
    by cost_multiplier ** 1.5 after `patience` failing ones. The smallest mask that reached
    the threshold is kept; a class stops once lambda has moved both ways and its best norm
    has not improved for `early_stop_patience` rounds. `on_round(round, norms, success, rounds)`,
    if given, sees after each round every row's (class x start) smallest successful norm so far
    (inf: none yet), that mask's success (none yet: the latest round's) and the rounds it has run.
    """
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    device = next(model.parameters()).device
    model.eval()
    x = to_device_layout(x_clean, device)
    (c, h, w), n, r = x.shape[1:], len(x), config.restarts
    rows = [(t, start) for t in classes for start in range(r)]  # every start of every class is one row
    k = len(rows)

    # Each row starts from its own seeded random mask and pattern: the same start whether it is
    # optimized alone or with the others (start 0 keeps the key a single search always had).
    starts = [
        generator(torch.device("cpu"), config.seed, CLEANSE_STREAM, t, *((start,) if start else ()))
        for t, start in rows
    ]
    w_mask = torch.stack([_to_tanh_space(torch.rand(1, h, w, generator=g)) for g in starts]).to(device)
    w_pattern = torch.stack([_to_tanh_space(torch.rand(c, h, w, generator=g)) for g in starts]).to(device)
    w_mask.requires_grad_(True)
    w_pattern.requires_grad_(True)
    optimizer = torch.optim.Adam([w_mask, w_pattern], lr=config.lr, betas=config.betas)
    targets = torch.tensor([t for t, _ in rows], device=device)

    state = _LambdaSchedule(k, config)
    best_mask = torch.zeros(k, h, w)
    best_pattern = torch.zeros(k, c, h, w)
    best_norm = np.full(k, np.inf)
    best_success = np.zeros(k)
    order_gen = generator(device, config.seed, CLEANSE_STREAM, -1)
    steps_per_round = math.ceil(n / config.batch_size)
    images = 0

    # The batch shrinks as classes stop early: cuDNN autotuning every new shape would cost
    # more than it saves, so it stays off here (models.prepare turns it on for CUDA).
    with frozen(model), no_autotune():
        for step in progress(
            range(config.steps),
            config.steps,
            f"cleanse ({len(classes)} classes{f', {r} starts each' if r > 1 else ''})",
        ):
            if (
                r > 1 and step == config.keep_best_after > 0
            ):  # successive halving: each class goes on from its best start
                state.done |= _all_but_best(best_norm, best_success, r)
            active = np.flatnonzero(~state.done)
            if len(active) == 0:
                break
            live = torch.as_tensor(active, device=device)
            cost = torch.as_tensor(state.cost[active], dtype=torch.float32, device=device)
            hits = torch.zeros(len(active), device=device)
            order = torch.randperm(n, generator=order_gen, device=device)
            for b in range(steps_per_round):
                xb = x[order[b * config.batch_size : (b + 1) * config.batch_size]]
                mask = torch.tanh(w_mask[live]) / 2 + 0.5  # (A, 1, H, W)
                pattern = torch.tanh(w_pattern[live]) / 2 + 0.5  # (A, C, H, W)
                stamped = stamp(xb[None], mask[:, None], pattern[:, None]).flatten(0, 1)  # (A * B, C, H, W)
                labels = targets[live].repeat_interleave(len(xb))
                with autocast(device):
                    logits = model(stamped)
                ce = F.cross_entropy(logits.float(), labels, reduction="none").view(len(active), -1).mean(1)
                loss = (ce + cost * mask.flatten(1).sum(1)).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                hits += (logits.argmax(1) == labels).view(len(active), -1).sum(1)
                images += len(stamped)
            with torch.no_grad():  # one host copy per round
                mask = (torch.tanh(w_mask[live]) / 2 + 0.5)[:, 0]
                pattern = torch.tanh(w_pattern[live]) / 2 + 0.5
                norms = mask.flatten(1).sum(1).cpu().numpy()
                mask, pattern = mask.cpu(), pattern.cpu()
            success = hits.cpu().numpy() / n
            for j, row in enumerate(active):
                if success[j] >= config.threshold and norms[j] < best_norm[row]:
                    best_norm[row], best_success[row] = norms[j], success[j]
                    best_mask[row], best_pattern[row] = mask[j], pattern[j]
                if not np.isfinite(best_norm[row]):  # nothing reached the threshold yet: keep the latest
                    best_mask[row], best_pattern[row], best_success[row] = mask[j], pattern[j], success[j]
            state.update(active, success, best_norm)
            if on_round is not None:
                on_round(step, best_norm.copy(), best_success.copy(), state.rounds.copy())

    # Per class, the start with the smallest successful mask (none succeeded: the most successful).
    reached_rows = np.isfinite(best_norm)
    latest_norms = best_mask.flatten(1).sum(1).numpy()
    score = np.where(reached_rows, best_norm, np.inf).reshape(-1, r)
    pick = np.flatnonzero(~_all_but_best(best_norm, best_success, r))
    return ReversedTriggers(
        classes=classes,
        masks=best_mask[pick],
        patterns=best_pattern[pick],
        norms=np.where(reached_rows, best_norm, latest_norms)[pick],
        success=best_success[pick],
        reached=reached_rows[pick],
        rounds=state.rounds[pick],
        start_norms=score,
        images=images,
    )


def _all_but_best(best_norm: np.ndarray, best_success: np.ndarray, r: int) -> np.ndarray:
    """Per class (r consecutive rows), every start but the one with the smallest successful mask
    so far (none successful: the most successful)."""
    norm, success = best_norm.reshape(-1, r), best_success.reshape(-1, r)
    best = np.where(np.isfinite(norm).any(1), np.where(np.isfinite(norm), norm, np.inf).argmin(1), success.argmax(1))
    drop = np.ones_like(norm, dtype=bool)
    drop[np.arange(len(norm)), best] = False
    return drop.ravel()


def reverse_engineer_all(
    model: nn.Module,
    x_clean: torch.Tensor,
    num_classes: int,
    config: CleanseConfig = CleanseConfig(),
    progress: Progress = no_progress,
) -> ReversedTriggers:
    """reverse_engineer for every class; under torchrun each process takes a contiguous share
    of the classes and every process gets all of them back. Classes are optimized
    independently, so the result is one process's (identical on a CPU, as the tests check)."""
    mine = list(range(num_classes))[distributed.shard(num_classes)]
    if distributed.world_size() == 1:
        return reverse_engineer(model, x_clean, num_classes, config, mine, progress)
    c, h, w = x_clean.shape[1:]
    if mine:
        rev = reverse_engineer(model, x_clean, num_classes, config, mine, progress)
    else:  # more processes than classes
        rev = ReversedTriggers(
            [],
            torch.zeros(0, h, w),
            torch.zeros(0, c, h, w),
            norms=np.zeros(0),
            success=np.zeros(0),
            reached=np.zeros(0, dtype=bool),
            rounds=np.zeros(0, dtype=int),
            start_norms=np.zeros((0, config.restarts)),
        )

    def gather(t: torch.Tensor) -> torch.Tensor:
        return distributed.all_gather_rows(t.to(distributed.collective_device())).cpu()

    starts = rev.start_norms if rev.start_norms is not None else np.zeros((len(rev.classes), config.restarts))
    numbers = np.column_stack([rev.norms, rev.success, rev.reached, rev.rounds, starts])
    numbers = gather(torch.tensor(numbers, dtype=torch.float64)).numpy()
    return ReversedTriggers(
        classes=list(range(num_classes)),
        masks=gather(rev.masks),
        patterns=gather(rev.patterns),
        norms=numbers[:, 0],
        success=numbers[:, 1],
        reached=numbers[:, 2].astype(bool),
        rounds=numbers[:, 3].astype(int),
        start_norms=numbers[:, 4:],
        images=int(distributed.all_reduce_sum(torch.tensor(rev.images, device=distributed.collective_device()))),
    )


def reversed_trigger_success(
    model: nn.Module, rev: ReversedTriggers, c: int, x: torch.Tensor, y: torch.Tensor
) -> float:
    """Fraction of images x of classes other than c that class c's reversed trigger sends to c."""
    j = rev.classes.index(c)
    mask, pattern = rev.masks[j], rev.patterns[j]
    return stamped_success_rate(model, x[y != c], c, lambda z: stamp(z, mask.to(z.device), pattern.to(z.device)))


class _LambdaSchedule:
    """The authors' per-class lambda ("cost") schedule and early stop, vectorized over classes."""

    def __init__(self, k: int, config: CleanseConfig):
        self.config = config
        self.cost = np.zeros(k)
        self.set_counter = np.zeros(k, dtype=int)
        self.up_counter = np.zeros(k, dtype=int)
        self.down_counter = np.zeros(k, dtype=int)
        self.up_flag = np.zeros(k, dtype=bool)
        self.down_flag = np.zeros(k, dtype=bool)
        self.early_counter = np.zeros(k, dtype=int)
        self.early_best = np.full(k, np.inf)
        self.done = np.zeros(k, dtype=bool)
        self.rounds = np.zeros(k, dtype=int)

    def update(self, active: np.ndarray, success: np.ndarray, best_norm: np.ndarray) -> None:
        cfg = self.config
        for j, i in enumerate(active):
            self.rounds[i] += 1
            ok = success[j] >= cfg.threshold
            # early stop: only once a successful mask exists and lambda has moved both ways
            if np.isfinite(best_norm[i]):
                self.early_counter[i] = (
                    self.early_counter[i] + 1 if best_norm[i] >= cfg.early_stop_threshold * self.early_best[i] else 0
                )
            self.early_best[i] = min(best_norm[i], self.early_best[i])
            if self.up_flag[i] and self.down_flag[i] and self.early_counter[i] >= cfg.early_stop_patience:
                self.done[i] = True
                continue
            # lambda starts at 0 and is set once the attack keeps succeeding
            if self.cost[i] == 0 and ok:
                self.set_counter[i] += 1
                if self.set_counter[i] >= cfg.patience:
                    self.cost[i] = cfg.init_cost
                    self.up_counter[i] = self.down_counter[i] = 0
                    self.up_flag[i] = self.down_flag[i] = False
            else:
                self.set_counter[i] = 0
            if ok:
                self.up_counter[i] += 1
                self.down_counter[i] = 0
            else:
                self.up_counter[i] = 0
                self.down_counter[i] += 1
            if self.up_counter[i] >= cfg.patience:
                self.up_counter[i] = 0
                self.cost[i] *= cfg.cost_multiplier
                self.up_flag[i] = True
            elif self.down_counter[i] >= cfg.patience:
                self.down_counter[i] = 0
                self.cost[i] /= cfg.cost_multiplier**1.5
                self.down_flag[i] = True


@dataclass(frozen=True)
class OutlierTest:
    """The MAD outlier test on one model's trigger norms (see mad_outlier_test)."""

    median: float
    mad: float  # 1.4826 * median(|l - median|)
    anomaly_index: np.ndarray  # |l - median| / mad
    below: np.ndarray  # l < median: only these can be flagged
    flagged: np.ndarray  # below the median and anomaly index > threshold

    @property
    def ceiling(self) -> float:
        """The largest index a class below the median can reach under this median and MAD: that
        of a norm of 0. When it is at most the threshold, no trigger, however small, is flagged."""
        return self.median / self.mad if self.mad > 0 else math.inf


def mad_outlier_test(norms, threshold: float = 2.0) -> OutlierTest:
    """Median absolute deviation test on trigger norms. Only classes whose norm is BELOW the
    median can be flagged: a backdoor makes its target's trigger abnormally small."""
    norms = np.asarray(norms, dtype=np.float64)
    median = float(np.median(norms))
    deviation = np.abs(norms - median)
    mad = MAD_CONSISTENCY * float(np.median(deviation))
    if mad > 0:
        index = deviation / mad
    else:  # more than half the norms are equal: any other value is infinitely far out
        index = np.where(deviation > 0, np.inf, 0.0)
    below = norms < median
    return OutlierTest(median=median, mad=mad, anomaly_index=index, below=below, flagged=below & (index > threshold))
