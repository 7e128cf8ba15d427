"""One training loop. Standard, free adversarial, fast adversarial, Gaussian-noise and poisoned
training differ only in what they do to a batch (a `Perturbation`); poisoning happens to the
data set before training (see backdoor.py).

Free adversarial training (Shafahi et al., NeurIPS 2019): one perturbation buffer `delta`
(the shape of a minibatch, zero at first) persists across replays, minibatches and
passes. Each minibatch is replayed m times; each replay trains on clamp(x + delta, 0, 1),
and its single backward pass gives the weights' gradient and delta's, then
delta <- clip(delta + eps * sign(grad_delta), -eps, eps). The data is passed over
ceil(epochs / m) times, so the number of SGD steps, and the time, match standard
training for `epochs` epochs.

Fast adversarial training (Wong, Rice, Kolter, ICLR 2020): per minibatch, delta starts
uniform in the eps-ball, takes one FGSM step of 1.25 eps (projected), and the weights take
one step on x + delta: two forward-backward passes per SGD step. Catastrophic overfitting is
guarded against as the authors do: PGD accuracy on a fixed training batch is measured after
every pass, and training stops (keeping the previous pass's weights) when it collapses.

Under torchrun the global batch is split over the processes (DistributedDataParallel), each
process scaling its loss so the averaged gradient is the global batch's mean: the same SGD
steps as one process. A free perturbation buffer is kept per process for its shard, as the
authors' multi-GPU version does. The loop's whole state is a `TrainState` (safetensors + JSON)
saved every few passes, from which an interrupted run resumes bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
from torch import nn

from . import distributed
from .checkpoints import TrainState, restore, snapshot
from .configs import TrainConfig
from .examples import Augment, InMemory, batch_indices
from .perturbations import Batch, FastAdversarial, FreeAdversarial, GaussianNoise, Perturbation
from .runtime import Progress, Timer, autocast, generator, no_progress

__all__ = [
    "Batch",
    "EpochStats",
    "FastAdversarial",
    "FreeAdversarial",
    "GaussianNoise",
    "Hooks",
    "Perturbation",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "lr_factor",
    "train",
]
GUARD_STREAM = 7


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): cosine decay,
    'step' (x0.1 at 50% and 75%, CIFAR's usual), 'imagenet' (x0.1 at 1/3 and 2/3: every 30 of 90
    epochs), or constant."""
    progress = step / max(total_steps, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    if schedule == "imagenet":
        return 0.1 ** ((3 * step >= total_steps) + (3 * step >= 2 * total_steps))
    return 1.0


# ---------------------------------------------------------------- the loop's state


@dataclass(frozen=True)
class EpochStats:
    """One pass over the training data: its SGD budget so far, mean loss and accuracy (and the fast-training guard)."""

    epoch: int  # epochs of SGD budget spent so far: pass * replays (aligns free and standard curves)
    loss: float
    accuracy: float  # on the inputs actually trained on (perturbed ones for adversarial training)
    robust_accuracy: float | None = None  # fast training's guard: PGD accuracy on a training batch


@dataclass
class TrainResult:
    """What training did and cost: steps, passes, time, throughput, the per-pass history."""

    steps: int  # optimizer steps
    passes: int  # passes over the training data made
    train_time_s: float  # training only, no evaluation
    images_per_s: float  # images through forward+backward per second, replays counted
    history: list[EpochStats] = field(default_factory=list)
    passes_per_step: int = 1  # forward-backward passes per SGD step (2 for fast training)
    stopped_early: bool = False  # fast training's guard fired: the weights are the previous pass's


@dataclass
class Hooks:
    """How the loop reaches its caller: progress, per-pass stats, checkpoints (all optional)."""

    progress: Progress = no_progress
    on_pass: Callable[[EpochStats], None] | None = None
    save_state: Callable[[TrainState], None] | None = None  # called on rank 0 only
    checkpoint_every: int = 1  # passes between checkpoints
    resume: TrainState | None = None


# ---------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    data,
    config: TrainConfig,
    perturbation: Perturbation | None = None,
    progress: Progress = no_progress,
    hooks: Hooks | None = None,
    compile_mode: str | None = None,
) -> TrainResult:
    """Train `model` (already on its device) on `data` (examples.InMemory or Folder; a pair
    (x, y) of tensors is taken as InMemory).

    The data is passed over ceil(epochs / replays) times; each global minibatch is replayed
    `perturbation.replays` times, each replay one SGD step, so every method makes
    ceil(epochs / replays) * replays * ceil(N / batch_size) steps, in any number of processes.
    """
    perturbation = perturbation or Perturbation()
    hooks = hooks or Hooks(progress=progress)
    device = next(model.parameters()).device
    data = (InMemory(*data) if isinstance(data, tuple) else data).to(device)
    world, rank = distributed.world_size(), distributed.rank()
    n, bs, replays = len(data), config.batch_size, perturbation.replays
    if world > 1 and (n % bs or bs) < world:
        raise ValueError(
            f"a batch of {n % bs or bs} examples cannot be split over {world} processes: change --batch-size"
        )
    batches_per_pass = math.ceil(n / bs)
    passes = math.ceil(config.epochs / replays)
    total_steps = passes * batches_per_pass * replays

    net = _wrap(model, device, world, compile_mode)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config.schedule, s, total_steps))
    shuffle = generator(device, config.seed)
    guard = _Guard(model, data, perturbation, config) if isinstance(perturbation, FastAdversarial) else None
    history: list[EpochStats] = []
    step, first_pass, spent = 0, 0, 0.0
    if hooks.resume is not None:
        step, first_pass, spent, meta = restore(hooks.resume, model, optimizer, scheduler, shuffle, perturbation)
        history = [EpochStats(**h) for h in meta["history"]]
        if guard is not None:
            guard.resume(meta["guard_previous"])

    model.train()
    stopped = False
    with Timer(device) as timer:
        ticks = _ticks(data, shuffle, config, first_pass, passes, batches_per_pass, device)
        for p, b, (xb, yb, idx) in hooks.progress(
            ticks, (passes - first_pass) * batches_per_pass, f"train ({perturbation.name})"
        ):
            if b == 0:
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), dtype=torch.long, device=device)
            global_size = min(bs, n - b * bs)
            scale = len(yb) * world / global_size  # 1.0 in one process: the global batch's mean gradient
            offset = distributed.shard(global_size, rank, world).start
            for _ in range(replays):
                loss, logits, labels = perturbation.objective(
                    net, model, Batch(xb, yb, idx, step, offset, global_size, p)
                )
                optimizer.zero_grad(set_to_none=True)
                (loss * scale if scale != 1.0 else loss).backward()
                perturbation.after_backward()
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum += loss.detach().float() * len(yb)
                correct += (logits.detach().argmax(1) == labels).sum()
            if b < batches_per_pass - 1:
                continue
            seen = n * replays  # one host sync per pass
            totals = distributed.all_reduce_sum(torch.stack([loss_sum, correct.to(loss_sum.dtype)]))
            robust = guard.check(p) if guard is not None else None
            accuracy = totals[1].item() / (seen * perturbation.copies)
            stats = EpochStats((p + 1) * replays, totals[0].item() / seen, accuracy, robust)
            history.append(stats)
            if hooks.on_pass is not None and rank == 0:
                hooks.on_pass(stats)
            if guard is not None and guard.collapsed:
                stopped = True
                break
            if hooks.save_state is not None and ((p + 1) % hooks.checkpoint_every == 0 or p + 1 == passes):
                extra = {
                    "history": [asdict(h) for h in history],
                    "guard_previous": guard.previous if guard is not None else None,
                }
                state = snapshot(
                    model, optimizer, scheduler, shuffle, perturbation, step, p + 1, spent + timer.elapsed(), extra
                )
                if rank == 0:
                    hooks.save_state(state)
    model.eval()
    made = len(history)
    return TrainResult(
        steps=step,
        passes=made,
        train_time_s=spent + timer.seconds,
        images_per_s=(made - first_pass) * n * replays / max(timer.seconds, 1e-9),
        history=history,
        passes_per_step=perturbation.passes_per_step,
        stopped_early=stopped,
    )


def _ticks(data, shuffle, config: TrainConfig, first_pass: int, passes: int, batches_per_pass: int, device):
    """(pass, batch, this process's share of the batch) for every global batch still to train on.
    The shuffling stream advances once per pass, so a resumed run draws the same orders."""
    world, rank = distributed.world_size(), distributed.rank()
    for p in range(first_pass, passes):
        order = torch.randperm(len(data), generator=shuffle, device=device)
        augment = Augment(config.augment, config.seed, p) if config.augment != "none" else None
        for b, batch in enumerate(data.batches(batch_indices(order, config.batch_size, rank, world), device, augment)):
            yield p, b, batch


def _wrap(model: nn.Module, device: torch.device, world: int, compile_mode: str | None) -> nn.Module:
    """The module the loop calls: DistributedDataParallel across processes, compiled if asked."""
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_mode:
        net = cast(nn.Module, torch.compile(net, mode=None if compile_mode == "default" else compile_mode))
    return net


class _Guard:
    """Fast training's catastrophic-overfitting check (Wong et al.): PGD-5 accuracy on a fixed
    training batch after every pass; a drop of more than 0.2 restores the previous weights."""

    DROP = 0.2

    def __init__(self, model: nn.Module, data, perturbation: FastAdversarial, config: TrainConfig):
        from .attacks import PGDConfig

        picked = torch.randperm(len(data), generator=generator(torch.device("cpu"), config.seed, GUARD_STREAM))[
            : config.batch_size
        ]
        self.model, self.indices = model, picked
        self.x, self.y = data.take(picked)
        self.pgd = PGDConfig(eps=perturbation.eps, alpha=max(perturbation.eps / 4, 1e-6), steps=5)
        self.previous: float | None = None
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.collapsed = False

    def resume(self, previous: float | None) -> None:
        """After a restart: the last check's accuracy, and the restored weights as the fallback."""
        self.previous = previous
        self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def check(self, pass_index: int) -> float:
        from .attacks import pgd

        device = next(self.model.parameters()).device
        x, y = self.x.to(device), self.y.to(device)
        self.model.eval()
        x_adv = pgd(self.model, x, y, self.pgd, indices=self.indices.to(device), seed=pass_index)
        with torch.inference_mode(), autocast(device):
            robust = (self.model(x_adv).argmax(1) == y).float().mean().item()
        self.model.train()
        self.observe(robust)
        return robust

    def observe(self, robust: float) -> bool:
        """After a pass: a collapse restores the weights of the last pass that held; otherwise
        this pass's weights become the fallback. Returns whether training must stop."""
        if self.previous is not None and robust < self.previous - self.DROP:
            self.model.load_state_dict(self.weights)
            self.collapsed = True
        else:
            self.previous = robust
            self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self.collapsed
