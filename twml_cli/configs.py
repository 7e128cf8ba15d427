"""The algorithms' own settings: plain dataclasses and range checks, with no torch, timm or MLflow,
so that `twml` refuses a bad value in a fraction of a second, before those libraries load.

Each algorithm module uses and re-exports its own (training.TrainConfig, attacks.PGDConfig,
cleanse.CleanseConfig, ...); the training perturbations' constructors call the check functions
below, and so do the CLI's settings, so every range is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TwmlError

if TYPE_CHECKING:
    import torch

POLICIES = ("none", "crop", "crop-flip", "resized-crop-flip")  # the data augmentations (examples.Augment)
SCHEDULES = ("cosine", "step", "imagenet", "constant")  # the learning-rate schedules (training.lr_factor)
ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")  # the standard AutoAttack, in order
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "centre")  # where a BadNets trigger sits


def check_eps(eps: float) -> None:
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must lie in [0, 1] (pixel units), got {eps}")


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """SGD with (Nesterov) momentum, weight decay and a per-step learning-rate schedule."""

    epochs: int = 10
    batch_size: int = 128  # the global batch, split over processes under torchrun
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    augment: str = "none"  # POLICIES

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{self.schedule}': use one of {', '.join(SCHEDULES)}")
        if self.augment not in POLICIES:
            raise ValueError(f"unknown augmentation '{self.augment}': use one of {', '.join(POLICIES)}")


def check_free(eps: float, m: int) -> None:
    """Free adversarial training: m replays per minibatch within the eps-ball."""
    if m < 1:
        raise ValueError(f"m (replays per minibatch) must be >= 1, got {m}")
    check_eps(eps)


def check_noise(sigma: float, copies: int = 1) -> None:
    """Gaussian noise of level sigma, `copies` draws per image."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma:g}")
    if copies < 1:
        raise ValueError(f"the number of noise draws per image must be >= 1, got {copies}")


def check_consistency(m: int, lam: float, eta: float) -> None:
    if m < 2:
        raise ValueError(f"consistency regularization needs m >= 2 noisy copies, got {m}")
    if lam < 0 or eta < 0:
        raise ValueError(f"consistency lambda and eta must be >= 0, got {lam:g} and {eta:g}")


def check_smoothadv(eps: float, steps: int, warmup: int) -> None:
    if eps < 0:
        raise ValueError(f"SmoothAdv eps must be >= 0, got {eps:g}")
    if steps < 1 or warmup < 1:
        raise ValueError(f"SmoothAdv steps and warmup must be >= 1, got {steps} and {warmup}")


def check_macer(beta: float, gamma: float, lam: float, deferred: int) -> None:
    if not beta > 0 or not gamma > 0 or lam < 0:
        raise ValueError(f"MACER needs beta > 0, gamma > 0 and lambda >= 0, got {beta:g}, {gamma:g} and {lam:g}")
    if deferred < 0:
        raise ValueError(f"MACER's deferred epochs must be >= 0, got {deferred}")


# ---------------------------------------------------------------- attacks and certification


@dataclass(frozen=True)
class PGDConfig:
    """L-inf PGD: budget eps and step alpha in [0, 1] pixel units, steps per restart, random restarts."""

    eps: float
    alpha: float
    steps: int = 10
    restarts: int = 1

    def __post_init__(self):
        check_eps(self.eps)
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"pgd alpha must lie in (0, 1], got {self.alpha}")
        if self.steps < 1:
            raise ValueError(f"pgd steps must be >= 1, got {self.steps}")
        if self.restarts < 1:
            raise ValueError(f"pgd restarts must be >= 1, got {self.restarts}")


@dataclass(frozen=True)
class AutoAttackConfig:
    """The standard AutoAttack at budget eps: its attacks in order, APGD and FAB iterations, target
    classes, Square's queries."""

    eps: float
    n_iter: int = 100  # APGD and FAB iterations
    n_targets: int = 9  # target classes of APGD-T and FAB-T
    n_queries: int = 5000  # Square's budget
    attacks: tuple[str, ...] = ATTACKS

    def __post_init__(self):
        check_eps(self.eps)
        unknown = set(self.attacks) - set(ATTACKS)
        if unknown:
            raise ValueError(f"unknown AutoAttack attacks {sorted(unknown)}: use {', '.join(ATTACKS)}")


def check_certify_args(n0: int, n: int, alpha: float, batch_size: int) -> None:
    """Raise ValueError naming the first of CERTIFY's arguments out of range."""
    if n0 < 1:
        raise ValueError(f"n0 must be >= 1, got {n0}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")


# ---------------------------------------------------------------- backdoors


@dataclass(frozen=True)
class Trigger:
    """A size x size square of `value` (1.0: white) in a corner or at the centre of the image
    (rounded up and left when the sides differ in parity), all channels."""

    size: int
    position: str = "bottom-right"
    value: float = 1.0

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"unknown trigger position '{self.position}': use one of {', '.join(POSITIONS)}")
        if self.size < 1:
            raise ValueError(f"trigger size must be >= 1, got {self.size}")
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"trigger value must lie in [0, 1], got {self.value}")

    def check_fits(self, height: int, width: int) -> None:
        if self.size > min(height, width):
            raise ValueError(f"trigger size {self.size} is larger than the {height}x{width} image")

    def region(self, height: int, width: int) -> tuple[slice, slice]:
        def span(side: int, far: bool, middle: bool) -> slice:
            start = (side - self.size) // 2 if middle else side - self.size if far else 0
            return slice(start, start + self.size)

        centre = self.position == "centre"
        return span(height, self.position.startswith("bottom"), centre), span(
            width, self.position.endswith("right"), centre
        )

    def weight_share(self, mask) -> float:
        """The share of a mask's (H, W) L1 weight that lies on this trigger's pixels: 1 for a
        reversed trigger that is this one, near 0 for one elsewhere."""
        rows, cols = self.region(*mask.shape)
        return float(mask[rows, cols].sum() / max(float(mask.sum()), 1e-12))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A stamped copy of images x (N, C, H, W)."""
        rows, cols = self.region(*x.shape[-2:])
        out = x.clone()
        out[..., rows, cols] = self.value
        return out


def check_poison_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ValueError(f"poison rate must lie in (0, 1), got {rate}")


@dataclass(frozen=True)
class CleanseConfig:
    """Neural Cleanse's trigger search. Defaults are the authors' (bolunwang/backdoor, visualizer.py)."""

    steps: int = 100  # optimization rounds; each is a pass over the clean images, then a check
    batch_size: int = 32  # clean images per class in one optimizer step
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3  # lambda once the attack first succeeds
    cost_multiplier: float = 1.5  # lambda *= 1.5 after `patience` successes; /= 1.5 ** 1.5 after failures
    patience: int = 5
    early_stop_patience: int = 25  # rounds without a smaller successful mask (5 * patience)
    early_stop_threshold: float = (
        1.0  # "smaller" means below this fraction of the best so far (the authors' 1.0: any decrease)
    )
    threshold: float = 0.99  # attack success a mask must reach to count
    restarts: int = 1  # independent random starts per class; the smallest successful mask is kept
    keep_best_after: int = (
        20  # with restarts: rounds after which each class goes on from its best start alone (0: never)
    )
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"cleanse steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"cleanse batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"cleanse lr must be > 0, got {self.lr}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"success threshold must lie in (0, 1], got {self.threshold}")
        if self.patience < 1 or self.early_stop_patience < 1:
            raise ValueError("patience and early-stop patience must be >= 1")
        if not 0 < self.early_stop_threshold <= 1:
            raise ValueError(f"early-stop threshold must lie in (0, 1], got {self.early_stop_threshold}")
        if not self.init_cost > 0:
            raise ValueError(f"init cost must be > 0, got {self.init_cost}")
        if not self.cost_multiplier > 1:
            raise ValueError(f"cost multiplier must be > 1, got {self.cost_multiplier}")
        if self.restarts < 1 or self.keep_best_after < 0:
            raise ValueError(
                f"restarts must be >= 1 and keep-best-after >= 0, got {self.restarts} and {self.keep_best_after}"
            )


@dataclass(frozen=True)
class UnlearnConfig:
    """Unlearning: fine-tuning epochs, the stamped fraction, SGD learning rate, schedule and batch,
    whether normalization statistics stay as trained or follow the unstamped images, and how
    strongly the unstamped images' features are held where they were."""

    epochs: int = 20
    fraction: float = 0.15  # of the clean images that carry the reversed trigger (the paper: 0.2)
    lr: float = 0.005
    batch_size: int = 128
    schedule: str = (
        "warmup"  # the learning rate: constant (the paper's), or warmup (one epoch up from 0, then a cosine down to 0)
    )
    freeze_norm: bool = False  # keep the normalization layers' statistics as trained (eval-mode BatchNorm)
    clean_norm: bool = True  # not frozen: BatchNorm on the statistics of each batch's unstamped images alone
    seed: int = 0
    distill: float = 0.5  # weight of the pull of the unstamped images' features toward the model's before (0: off)
    hold_stamped: float = 0.0  # weight of the pull of the stamped images' features toward their clean images' before
    restart_fall: float = 0.02  # a fall of the unstamped images' accuracy that starts a fine-tune again (1: never)

    @property
    def clean_statistics(self) -> bool:
        """Whether BatchNorm normalizes with the unstamped images' statistics (clean_norm applies unfrozen)."""
        return self.clean_norm and not self.freeze_norm

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"unlearning epochs and batch size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"unlearning fraction must lie in (0, 1), got {self.fraction}")
        if not self.lr > 0:
            raise ValueError(f"unlearning lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "warmup"):
            raise ValueError(f"unknown unlearning schedule '{self.schedule}': use constant or warmup")
        if not self.distill >= 0:
            raise ValueError(f"unlearning distillation weight must be >= 0, got {self.distill}")
        if not self.hold_stamped >= 0:
            raise ValueError(f"unlearning stamped-image pull weight must be >= 0, got {self.hold_stamped}")
        if not 0 < self.restart_fall <= 1:
            raise ValueError(f"unlearning restart fall must lie in (0, 1], got {self.restart_fall}")


# ---------------------------------------------------------------- models


REFUSED_KWARGS = (
    "checkpoint_path",
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "pretrained_strict",
    "cache_dir",
)


def check_model_kwargs(kwargs: dict) -> None:
    """Architecture arguments only: a spec (typed on the command line, or read from a logged
    spec.json shared through a tracking server) must never make timm read a file or fetch
    weights. Refuses checkpoint paths, anything pretrained*, and any string that names a file,
    a folder or a URL, at any depth."""

    def refuse(key: str, why: str) -> None:
        raise TwmlError(
            f"model_kwargs '{key}' is refused ({why}): twml models take architecture arguments only, trained from "
            "scratch"
        )

    def visit(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    refuse(str(k), "keys must be names")
                if k in REFUSED_KWARGS or k.startswith("pretrained"):
                    refuse(k, "it loads weights or files")
                visit(v, k)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, key)
        elif isinstance(value, str):
            if "://" in value or "/" in value or "\\" in value or value.startswith("~") or Path(value).exists():
                refuse(key, f"'{value}' names a file or URL")
        elif value is not None and not isinstance(value, (bool, int, float)):
            refuse(key, f"a {type(value).__name__} is not an architecture argument")

    if not isinstance(kwargs, dict):
        raise TwmlError("model_kwargs must be a JSON object of architecture arguments")
    visit(kwargs, "model_kwargs")
