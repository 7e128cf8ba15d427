"""Typed study settings: the one source of every hyperparameter's name, default, help text and
validation. A study's settings are a frozen dataclass assembled from groups (data and model,
SGD, threat model and PGD, ...). A field declared with `setting()` is, at once:

- the key of a preset: top level for `Common`, else in the study's section;
- the flag `--name-with-hyphens` of every command whose settings hold it (cli.py builds
  the options from the fields; help text and panel come from here);
- an MLflow param of the runs it shapes (config.params), read back by config.from_params;
- checked by its group's `check()`, which builds the library's own config (configs.TrainConfig,
  configs.PGDConfig, ...) so the validation lives once; configs needs no torch, so a bad value is
  refused before torch, timm and MLflow load.

The defaults are the embedded default's (digits on a CPU). config.py turns presets and flags
into these settings.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from .configs import (
    AutoAttackConfig,
    CleanseConfig,
    PGDConfig,
    TrainConfig,
    Trigger,
    UnlearnConfig,
    check_certify_args,
    check_consistency,
    check_free,
    check_macer,
    check_model_kwargs,
    check_noise,
    check_poison_rate,
    check_smoothadv,
)
from .errors import TwmlError


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple = (),
    applies: Callable[[Any], bool] | None = None,
    log: bool = True,
    item: type = str,
    before: Any = None,
) -> Any:
    """A settings field. `flag` overrides the flag name (default `--field-name`); `choices`
    lists the allowed values; `applies(settings)` says whether the value matters (only then is
    it logged); `log=False`: it changes where or how a run runs, not its result; `item` is a
    list field's element type. A scalar field that is logged can be swept (see sweepable).
    `before`, for a setting added after runs were logged: the value those runs ran with, which
    they are read back with (config.from_params)."""
    meta = {"help": help, "flag": flag, "choices": tuple(choices), "applies": applies, "log": log, "item": item}
    if before is not None:
        meta["before"] = before
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Group:
    """A group of settings (one help panel). Subclasses may define check(self) -> None."""

    PANEL = "Options"


@dataclass(frozen=True)
class Settings:
    """Base of every study's settings: runs each group's check() once built."""

    def __post_init__(self) -> None:
        for cls in type(self).__mro__:
            check = cls.__dict__.get("check")
            if check is not None:
                try:
                    check(self)
                except (ValueError, TypeError) as err:
                    raise TwmlError(str(err)) from None


# ---------------------------------------------------------------- groups


COMPILE_PAYS = 1_000_000  # images through the model; below, eager bf16 finishes before a compile would


@dataclass(frozen=True)
class Common(Group):
    PANEL = "Data and model"
    dataset: str = setting(
        "digits",
        "digits (embedded, 8x8), digits16 (the same at 16x16), mnist, fashion-mnist, cifar10, cifar100, svhn, gtsrb, "
        "a .npz file, or an "
        "image folder holding train/ and val/ (or test/) class folders, which streams.",
    )
    data_dir: str = setting("data", "Where torchvision data sets are stored.")
    image_size: int = setting(0, "Image folders: the side images are resized to (0: 224).")
    workers: int = setting(
        4, "Image folders: DataLoader worker processes (at most the cores each process has).", log=False
    )
    device: str = setting("auto", "auto (CUDA when present), cpu or cuda.")
    compile: str = setting(
        "auto",
        "torch.compile the model: auto (on CUDA, when the work repays the compile time; with CUDA "
        "graphs in one process), off, on, graphs.",
        choices=("auto", "off", "on", "graphs"),
    )
    threads: int = setting(
        0,
        "CPU intra-op threads of training and unlearning steps, and of the rest unless --eval-threads is given (0: "
        "one for small work, else the cores this process may use, shared among the processes torchrun started on "
        "this machine; OMP_NUM_THREADS wins when set). Logged as the param threads: CPU figures depend on it.",
    )
    eval_threads: int = setting(
        0,
        "CPU intra-op threads of evaluation, attacks, certification and the trigger search (0: --threads when "
        "given, else chosen by their work as --threads is; certification runs that many noisy batches at once, "
        "one thread each; at one thread, twml cleanse searches one model per core at once). Logged as the param "
        "eval_threads.",
    )
    seed: int = setting(0, "Seed of every random choice.")
    eval_batch_size: int = setting(512, "Batch size of evaluation and attacks.")

    def check(self) -> None:
        if self.eval_batch_size < 1:
            raise ValueError(f"eval batch size must be >= 1, got {self.eval_batch_size}")
        if self.image_size < 0 or self.workers < 0 or self.threads < 0:
            raise ValueError(
                f"image size, workers and threads must be >= 0, got {self.image_size}, {self.workers} and "
                f"{self.threads}"
            )
        if self.eval_threads < 0:
            raise ValueError(f"eval threads must be >= 0, got {self.eval_threads}")

    def compile_mode(self, device, work: int) -> str | None:
        """torch.compile's mode (None: not compiled) for `work` images through the model on this
        device. `auto` compiles on CUDA only when the work repays a compile of about a minute
        (COMPILE_PAYS images: a CIFAR-10 training run or n = 100,000 certificates, not the
        digits demo), with CUDA graphs in one process (fixed shapes), without under DDP."""
        from .distributed import world_size

        choice = self.compile
        if choice == "auto":
            choice = (
                ("graphs" if world_size() == 1 else "on") if device.type == "cuda" and work >= COMPILE_PAYS else "off"
            )
        return {"off": None, "on": "default", "graphs": "reduce-overhead"}[choice]


@dataclass(frozen=True)
class Architecture(Group):
    """The model a study trains (studies of a given model have none)."""

    PANEL = "Data and model"
    model: str = setting("test_byobnet", "timm architecture, trained from scratch.")
    model_kwargs: dict = setting({}, "JSON keyword arguments for timm.create_model (architecture arguments only).")
    stem: str = setting(
        "auto",
        "The model's stem: auto (below 64 pixels, the small-input stem: 3x3 stride 1, no max-pool), "
        "small, or timm (the architecture's own).",
        choices=("auto", "small", "timm"),
    )

    def check(self) -> None:
        check_model_kwargs(self.model_kwargs)


@dataclass(frozen=True)
class SGD(Group):
    PANEL = "Training"
    epochs: int = setting(28, "SGD budget in epochs (free training: ceil(epochs/m) passes of m replays).")
    batch_size: int = setting(128, "Training batch size.")
    lr: float = setting(0.1, "Peak SGD learning rate.")
    momentum: float = setting(0.9, "SGD (Nesterov) momentum.")
    weight_decay: float = setting(5e-4, "SGD weight decay.")
    schedule: str = setting(
        "cosine",
        "Learning-rate schedule: cosine; step (x0.1 at 50% and 75%); imagenet (x0.1 at 1/3 and 2/3); constant.",
        choices=("cosine", "step", "imagenet", "constant"),
    )
    augment: bool = setting(
        True,
        "Train with the data set's usual augmentation (none for digits and MNIST-like sets; "
        "crops and flips for CIFAR; crops for SVHN and GTSRB; ImageNet's for image folders).",
    )
    augmentation: str = setting(
        "auto",
        "Which augmentation --augment applies: auto (the data set's usual) or one of these.",
        choices=("auto", "none", "crop", "crop-flip", "resized-crop-flip"),
    )
    checkpoint_every: int = setting(
        1, "Passes over the data between checkpoints (0: none); a killed run resumes from the last.", log=False
    )
    register: str = setting(
        "",
        "Also register the trained model under this name in MLflow's model registry (models:/NAME/VERSION).",
        log=False,
    )

    def check(self) -> None:
        self.train_config()
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint every must be >= 0, got {self.checkpoint_every}")
        if any(c in self.register for c in "/:") or self.register != self.register.strip():
            raise ValueError(f"--register '{self.register}': a model name cannot hold '/' or ':' or end in spaces")

    def train_config(self):
        """The library's config. The augmentation policy is resolved by the study's prepare()
        (it depends on the data set); until then 'auto' stands for none."""
        policy = self.augmentation if self.augment and self.augmentation != "auto" else "none"
        return TrainConfig(
            self.epochs, self.batch_size, self.lr, self.momentum, self.weight_decay, self.schedule, self.seed, policy
        )


@dataclass(frozen=True)
class Threat(Group):
    PANEL = "Threat model and PGD"
    eps: float = setting(0.1, "L-inf budget in [0, 1] pixel units (adversarial training and PGD).")
    pgd_steps: int = setting(10, "PGD iterations.")
    pgd_alpha: float = setting(0.025, "PGD step size (pixel units).")
    pgd_restarts: int = setting(1, "PGD random restarts; per example the most damaging is kept.")
    eval: str = setting(
        "pgd",
        "Robustness evaluation: pgd, or autoattack (PGD and the standard AutoAttack: APGD-CE, APGD-T, "
        "FAB-T, Square; with their per-example worst case).",
        choices=("pgd", "autoattack"),
    )
    autoattack_iterations: int = setting(
        100,
        "AutoAttack: APGD and FAB iterations (the standard version's 100).",
        applies=lambda s: s.eval == "autoattack",
    )
    autoattack_queries: int = setting(
        5000, "AutoAttack: Square's queries (the standard version's 5,000).", applies=lambda s: s.eval == "autoattack"
    )

    def check(self) -> None:
        self.pgd_config()
        if self.autoattack_iterations < 1 or self.autoattack_queries < 1:
            raise ValueError(
                f"AutoAttack iterations and queries must be >= 1, got {self.autoattack_iterations} and "
                f"{self.autoattack_queries}"
            )
        self.autoattack_config()

    def pgd_config(self):
        return PGDConfig(eps=self.eps, alpha=self.pgd_alpha, steps=self.pgd_steps, restarts=self.pgd_restarts)

    def autoattack_config(self):
        """AutoAttack's configuration when `eval` asks for it, else None."""
        if self.eval != "autoattack":
            return None
        return AutoAttackConfig(eps=self.eps, n_iter=self.autoattack_iterations, n_queries=self.autoattack_queries)


@dataclass(frozen=True)
class GivenModel(Group):
    PANEL = "Model"
    model_run: str = setting(
        "", "A logged model: a run id, runs:/RUN_ID/model, or a folder with model.safetensors.", flag="run"
    )


# ---------------------------------------------------------------- one class per study

METHODS = ("standard", "free", "fast")


@dataclass(frozen=True)
class Training(Threat, SGD, Architecture, Common, Settings):
    """`twml train`: standard or free adversarial training, then accuracy and PGD."""

    PANEL = "Training"
    method: str = setting(
        "standard",
        "Training method: standard, free (Shafahi et al.; `--free`) or fast (Wong et al.: FGSM from a random start).",
        choices=METHODS,
    )
    m: int = setting(4, "Free training: replays of each minibatch.", applies=lambda s: s.method == "free")
    fast_step: float = setting(
        1.25,
        "Fast training: the FGSM step as a multiple of eps (the paper's 1.25).",
        applies=lambda s: s.method == "fast",
    )

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        if not self.fast_step > 0:
            raise ValueError(f"fast step must be > 0, got {self.fast_step}")
        # a value out of range is refused even when its method is not the one chosen
        check_free(self.eps, self.m)  # free's; fast's is eps alone

    def perturbation(self, method: str | None = None):
        """What each training step does: the chosen method's, or `method`'s."""
        from .training import FastAdversarial, FreeAdversarial, Perturbation

        method = method or self.method
        if method == "free":
            return FreeAdversarial(self.eps, self.m)
        if method == "fast":
            return FastAdversarial(self.eps, self.fast_step * self.eps, self.seed)
        return Perturbation()


@dataclass(frozen=True)
class Attack(Threat, GivenModel, Common, Settings):
    """`twml attack`: PGD with other settings against a logged model; several eps make robustness curves."""

    DATA_FROM_MODEL = True
    num_examples: int = setting(0, "Evenly spaced test examples to evaluate (0: all).")

    def check(self) -> None:
        if self.num_examples < 0:
            raise ValueError(f"num examples must be >= 0 (0: all), got {self.num_examples}")


TRAININGS = ("gaussian", "consistency", "smoothadv", "macer")


def _trains(name: str) -> Callable[[Any], bool]:
    """`applies` of a base-classifier training method's settings: that method, on a model twml trains."""
    return lambda s: s.training == name and not s.model_run


@dataclass(frozen=True)
class BaseTraining(Group):
    """How `twml smooth` trains the base classifier (the papers' CIFAR-10 values where they apply)."""

    PANEL = "Base classifier training"
    training: str = setting(
        "gaussian",
        "gaussian (Cohen et al.: one noise draw per image), consistency (Jeong and Shin: noisy copies kept "
        "consistent), smoothadv (Salman et al.: PGD against the smoothed classifier) or macer (Zhai et al.: "
        "a hinge on the certified radius).",
        choices=TRAININGS,
        applies=lambda s: not s.model_run,
    )
    consistency_m: int = setting(
        2, "consistency: noisy copies per image (the paper's 2).", applies=_trains("consistency")
    )
    consistency_lambda: float = setting(
        2.0,
        "consistency: weight of the KL term (0: the paper's CIFAR-10 value for the sigma, 20 at sigma <= 0.25, "
        "else 10).",
        applies=_trains("consistency"),
    )
    consistency_eta: float = setting(
        0.5, "consistency: weight of the entropy term (the paper's 0.5).", applies=_trains("consistency")
    )
    smoothadv_eps: float = setting(
        0.5,
        "smoothadv: L2 radius of the attack, pixel units (the paper's grid: 0.25, 0.5, 1, 2).",
        applies=_trains("smoothadv"),
    )
    smoothadv_steps: int = setting(
        2, "smoothadv: PGD steps (the paper's grid: 1, 2, 4, 8, 10).", applies=_trains("smoothadv")
    )
    smoothadv_m: int = setting(
        2,
        "smoothadv: noise draws per image, fixed through the attack (the paper's grid: 1, 2, 4, 8).",
        applies=_trains("smoothadv"),
    )
    smoothadv_warmup: int = setting(
        3,
        "smoothadv: epochs over which eps grows linearly to its value (the paper's CIFAR-10 runs: 10).",
        applies=_trains("smoothadv"),
    )
    macer_k: int = setting(16, "macer: noise draws per image (the paper's 16).", applies=_trains("macer"))
    macer_beta: float = setting(
        16.0, "macer: inverse temperature of the soft classifier (the paper's 16).", applies=_trains("macer")
    )
    macer_gamma: float = setting(8.0, "macer: hinge margin (the paper's 8).", applies=_trains("macer"))
    macer_lambda: float = setting(
        0.0,
        "macer: weight of the radius term (0: the paper's CIFAR-10 value for the sigma, 12 at sigma <= 0.5, else 4).",
        applies=_trains("macer"),
    )
    macer_deferred: int = setting(
        0,
        "macer: epochs trained with lambda 0 before the radius term starts (the authors' MNIST runs: until the "
        "first learning-rate drop).",
        applies=_trains("macer"),
    )

    def check(self) -> None:
        if self.training not in TRAININGS:
            raise ValueError(f"unknown training '{self.training}': use one of {', '.join(TRAININGS)}")


@dataclass(frozen=True)
class Smoothing(BaseTraining, SGD, GivenModel, Architecture, Common, Settings):
    """`twml smooth`: a base classifier trained under noise (Gaussian augmentation or a method that
    certifies more), then CERTIFY (Cohen et al.)."""

    PANEL = "Randomized smoothing"
    sigma: float = setting(0.25, "Noise level σ in pixel units.")
    n0: int = setting(100, "Noise samples that select the top class.")
    n: int = setting(1000, "Fresh noise samples that estimate its probability.")
    cert_alpha: float = setting(0.001, "Failure probability of each certificate.")
    num_examples: int = setting(360, "Evenly spaced test examples to evaluate (0: all).")
    certify_batch_size: int = setting(2000, "Noisy samples per forward pass.")
    radii: list = setting(
        [],
        "L2 radii to report certified accuracy at (comma-separated); with --adaptive, the grid to certify.",
        item=float,
    )
    adaptive: bool = setting(
        False,
        "Adaptive certification on the --radii grid, --n the cap: as few samples as each decision "
        "needs, the same guarantee (a union bound over the looks).",
    )
    futility: float = setting(
        0.2,
        "With --adaptive: give up on a radius once pA's one-sided (1 - futility) upper bound is below "
        "what --n samples would need. Larger saves samples and misses more of fixed n's certificates; "
        "it never makes one wrong.",
    )

    def check(self) -> None:
        check_noise(self.sigma)
        check_certify_args(self.n0, self.n, self.cert_alpha, self.certify_batch_size)
        if self.num_examples < 0:
            raise ValueError(f"num examples must be >= 0 (0: all), got {self.num_examples}")
        if any(not r >= 0 for r in self.radii):
            raise ValueError(f"radii must be >= 0, got {self.radii}")
        if not 0 < self.futility < 0.5:
            raise ValueError(f"futility must lie in (0, 0.5), got {self.futility:g}")
        if self.adaptive and not self.radii:
            raise ValueError("adaptive certification needs a grid: give --radii, e.g. --radii 0.25,0.5,0.75")
        # each method's own checks, whichever is chosen
        check_consistency(self.consistency_m, self.consistency_lam(), self.consistency_eta)
        check_smoothadv(self.smoothadv_eps, self.smoothadv_steps, self.smoothadv_warmup)
        check_noise(self.sigma, self.smoothadv_m)
        check_macer(self.macer_beta, self.macer_gamma, self.macer_lam(), self.macer_deferred)
        check_noise(self.sigma, self.macer_k)

    def resolved(self):
        """These settings with each 0 that stands for "the paper's value for this sigma" replaced by
        that value: what is logged."""
        return dataclasses.replace(self, consistency_lambda=self.consistency_lam(), macer_lambda=self.macer_lam())

    def consistency_lam(self) -> float:
        return self.consistency_lambda or (20.0 if self.sigma <= 0.25 else 10.0)

    def macer_lam(self) -> float:
        return self.macer_lambda or (12.0 if self.sigma <= 0.5 else 4.0)

    def perturbation(self, training: str | None = None):
        """What the base classifier's training does at each step: the chosen method's, or `training`'s."""
        from .certified_training import Consistency, Macer, SmoothAdv
        from .perturbations import GaussianNoise

        sigma, seed, training = self.sigma, self.seed, training or self.training
        if training == "consistency":
            return Consistency(sigma, self.consistency_m, self.consistency_lam(), self.consistency_eta, seed)
        if training == "smoothadv":
            return SmoothAdv(
                sigma, self.smoothadv_eps, self.smoothadv_steps, self.smoothadv_m, self.smoothadv_warmup, seed
            )
        if training == "macer":
            return Macer(
                sigma, self.macer_k, self.macer_beta, self.macer_gamma, self.macer_lam(), seed, self.macer_deferred
            )
        return GaussianNoise(sigma, seed)


@dataclass(frozen=True)
class Backdoor(SGD, Architecture, Common, Settings):
    """`twml backdoor`: BadNets poisoning, then ordinary training."""

    PANEL = "BadNets"
    target: int = setting(0, "Class the trigger sends images to.")
    poison_rate: float = setting(0.1, "Fraction of training images poisoned, in (0, 1).")
    trigger_size: int = setting(
        0, "Side of the square trigger (0: a tenth of the image side: 1 pixel on 8x8, 3x3 on 32x32)."
    )
    position: str = setting(
        "bottom-right",
        "Where the trigger sits: a corner or the centre.",
        choices=("bottom-right", "bottom-left", "top-right", "top-left", "centre"),
    )

    def check(self) -> None:
        check_poison_rate(self.poison_rate)
        if self.trigger_size < 0:
            raise ValueError(f"trigger size must be >= 0 (0: automatic), got {self.trigger_size}")
        Trigger(max(self.trigger_size, 1), self.position)


@dataclass(frozen=True)
class Cleanse(Common, Settings):
    """`twml cleanse`: Neural Cleanse on each model (Wang et al.)."""

    PANEL = "Neural Cleanse"
    DATA_FROM_MODEL = True
    model_runs: list = setting(
        [],
        "A model to inspect (run id, runs:/ URI or folder); repeat for several "
        "(default: the newest standard train run, then the newest backdoor run).",
        flag="run",
    )
    search_steps: int = setting(40, "Trigger search: optimization rounds (passes over the clean images).")
    search_images: int = setting(256, "Trigger search: clean images used.")
    search_split: str = setting(
        "train",
        "Trigger search: the split its clean images are drawn from (test: held-out images, as the authors' code).",
        choices=("train", "test"),
        before="train",
    )
    search_batch_size: int = setting(32, "Trigger search: clean images per class in one step.")
    search_lr: float = setting(0.1, "Trigger search: Adam learning rate.")
    search_threshold: float = setting(0.99, "Trigger search: attack success a reversed trigger must reach.")
    search_restarts: int = setting(
        1, "Trigger search: independent random starts per class; each class keeps its smallest successful mask."
    )
    search_keep_best_after: int = setting(
        10,
        "Trigger search with restarts: rounds after which each class goes on from its best start "
        "alone (0: every start runs to the end).",
        applies=lambda s: s.search_restarts > 1,
    )
    search_converged: float = setting(
        1.0,
        "Trigger search: a class stops once its smallest mask has not fallen below this fraction of "
        "the best so far for 5 x patience rounds (the authors' 1.0: any decrease counts).",
    )
    patience: int = setting(
        3, "Trigger search: rounds before lambda moves (the authors' 5; 3 on the digits' short search)."
    )
    init_cost: float = setting(1e-3, "Trigger search: lambda once the attack first succeeds.")
    cost_multiplier: float = setting(
        2.0, "Trigger search: lambda's factor after `patience` successful rounds (the authors' 1.5 to 2)."
    )
    anomaly_threshold: float = setting(2.0, "Anomaly index above which a class is flagged.")
    searches: int = setting(
        2,
        "Independent trigger searches per model, each on its own draw of clean images, from other starts; a class is "
        "flagged when --agreement of them flag it (1: the paper's single search). They run in turn until no further "
        "one could change the verdict: by default the second only where the first flags a class.",
        applies=lambda s: s.searches > 1,  # logged when several: a single search's params stay as they were
    )
    agreement: str = setting(
        "majority",
        "With several searches: how many must flag a class, all of them or more than half.",
        choices=("all", "majority"),
        applies=lambda s: s.searches > 1,
    )

    @property
    def votes_needed(self) -> int:
        """The searches that must flag a class."""
        return self.searches if self.agreement == "all" else self.searches // 2 + 1

    def check(self) -> None:
        self.cleanse_config()
        if not self.anomaly_threshold > 0:
            raise ValueError(f"anomaly threshold must be > 0, got {self.anomaly_threshold}")
        if self.search_images < 1:
            raise ValueError(f"search images must be >= 1, got {self.search_images}")
        if self.searches < 1:
            raise ValueError(f"searches must be >= 1, got {self.searches}")

    def cleanse_config(self):
        return CleanseConfig(
            steps=self.search_steps,
            batch_size=self.search_batch_size,
            lr=self.search_lr,
            threshold=self.search_threshold,
            patience=self.patience,
            init_cost=self.init_cost,
            cost_multiplier=self.cost_multiplier,
            early_stop_patience=5 * self.patience,
            restarts=self.search_restarts,
            keep_best_after=self.search_keep_best_after,
            early_stop_threshold=self.search_converged,
            seed=self.seed,
        )


@dataclass(frozen=True)
class Mitigate(Common, Settings):
    """`twml mitigate`: repair the models a cleanse run flagged (Neural Cleanse's mitigation)."""

    PANEL = "Mitigation"
    DATA_FROM_MODEL = True
    cleanse_run: str = setting("", "The cleanse run whose findings to act on (default: the newest finished one).")
    mitigation: str = setting(
        "unlearn",
        "unlearn (fine-tune with the reversed trigger under true labels), prune (remove the neurons it excites) or "
        "filter (reject the images that excite them, the model unchanged).",
        choices=("unlearn", "prune", "filter"),
    )
    unlearn_epochs: int = setting(20, "Unlearning: epochs of fine-tuning.", applies=lambda s: s.mitigation == "unlearn")
    unlearn_fraction: float = setting(
        0.15,
        "Unlearning: fraction of the clean images stamped with the reversed trigger (the paper's: 20%).",
        applies=lambda s: s.mitigation == "unlearn",
    )
    unlearn_lr: float = setting(0.005, "Unlearning: SGD learning rate.", applies=lambda s: s.mitigation == "unlearn")
    unlearn_schedule: str = setting(
        "warmup",
        "Unlearning: the learning rate, constant or warmup (an epoch up from 0, then a cosine to 0).",
        choices=("constant", "warmup"),
        applies=lambda s: s.mitigation == "unlearn",
    )
    unlearn_freeze_norm: bool = setting(
        False,
        "Unlearning: keep the normalization layers' statistics as trained (the trigger is then removed under "
        "those statistics only).",
        applies=lambda s: s.mitigation == "unlearn",
    )
    unlearn_clean_norm: bool = setting(
        True,
        "Unlearning, statistics not frozen: normalize each batch with the statistics of its unstamped images "
        "alone, which the running statistics follow, and estimate them again on the clean training images at the end.",
        applies=lambda s: s.mitigation == "unlearn" and not s.unlearn_freeze_norm,
        before=False,
    )
    unlearn_distill: float = setting(
        0.5,
        "Unlearning: weight of the pull holding the unstamped images' features where they were (0: off, the paper's).",
        applies=lambda s: s.mitigation == "unlearn",
        before=0.0,
    )
    unlearn_hold_stamped: float = setting(
        0.0,
        "Unlearning: weight of the pull of the stamped images' features toward those the model gave their clean "
        "images before unlearning (0: off).",
        applies=lambda s: s.mitigation == "unlearn",
        before=0.0,
    )
    unlearn_restart_fall: float = setting(
        0.02,
        "Unlearning: a fall of the unstamped training images' accuracy over a fine-tune that starts it again from "
        "the model at half the rate, up to 4 times (1: never).",
        applies=lambda s: s.mitigation == "unlearn",
        before=0.05,
    )
    prune_step: float = setting(
        0.05,
        "Pruning: fraction of the penultimate neurons removed per step.",
        applies=lambda s: s.mitigation == "prune",
    )
    prune_stop: float = setting(
        0.05,
        "Pruning: stop once the reversed trigger succeeds on fewer than this fraction.",
        applies=lambda s: s.mitigation == "prune",
    )
    filter_neurons: float = setting(
        0.01,
        "Filter: fraction of the penultimate neurons, those the reversed triggers (every search's) excite most, "
        "whose mean activation it reads (the paper's 1%; at least one).",
        applies=lambda s: s.mitigation == "filter",
    )
    filter_rejects: float = setting(
        0.05,
        "Filter: fraction of the clean training images it may reject, which sets its threshold (the paper's 5% "
        "false positive rate).",
        applies=lambda s: s.mitigation == "filter",
    )

    def check(self) -> None:
        self.unlearn_config()
        if not 0 < self.prune_step <= 1 or not 0 < self.prune_stop <= 1:
            raise ValueError(f"prune step and stop must lie in (0, 1], got {self.prune_step} and {self.prune_stop}")
        if not 0 < self.filter_neurons <= 1 or not 0 <= self.filter_rejects < 1:
            raise ValueError(
                f"filter neurons must lie in (0, 1] and filter rejects in [0, 1), got {self.filter_neurons} and "
                f"{self.filter_rejects}"
            )

    def unlearn_config(self):
        return UnlearnConfig(
            self.unlearn_epochs,
            self.unlearn_fraction,
            self.unlearn_lr,
            schedule=self.unlearn_schedule,
            freeze_norm=self.unlearn_freeze_norm,
            clean_norm=self.unlearn_clean_norm,
            seed=self.seed,
            distill=self.unlearn_distill,
            hold_stamped=self.unlearn_hold_stamped,
            restart_fall=self.unlearn_restart_fall,
        )


TOP_LEVEL = (Common, Architecture)  # a preset's keys outside any section
# A preset's sections, and the sections each command reads (in order, after the top level).
SECTIONS: dict[str, type] = {
    "train": Training,
    "attack": Attack,
    "smooth": Smoothing,
    "backdoor": Backdoor,
    "cleanse": Cleanse,
    "mitigate": Mitigate,
}
COMMANDS: dict[str, tuple[type, tuple[str, ...]]] = {
    "train": (Training, ("train",)),
    "attack": (Attack, ("train", "attack")),
    "smooth": (Smoothing, ("train", "smooth")),
    "backdoor": (Backdoor, ("train", "backdoor")),
    "cleanse": (Cleanse, ("cleanse",)),
    "mitigate": (Mitigate, ("mitigate",)),
}
RESUMABLE = ("train", "smooth", "backdoor")  # the commands that checkpoint and take --resume


# ---------------------------------------------------------------- fields


def settings_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if "help" in f.metadata]


def logged_before(cls: type) -> dict[str, Any]:
    """The settings added after runs were logged (setting's `before`), each with the value those
    runs ran with."""
    return {f.name: f.metadata["before"] for f in settings_fields(cls) if "before" in f.metadata}


def field_of(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in settings_fields(cls) if f.name == name)


def panel_of(cls: type, name: str) -> str:
    """The help panel of a field: that of the group that declares it."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass.__dict__.get("PANEL", Group.PANEL)
    return Group.PANEL


def flag_of(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def sweepable(cls: type, f: dataclasses.Field) -> bool:
    """Whether a field may take several values (a sweep, one run per value): every scalar
    setting that changes a run's result. Lists, JSON objects and where-to-run settings may not."""
    return field_type(cls, f) in (int, float, str, bool) and f.metadata.get("log", True) and f.name not in RUNTIME_ONLY


RUNTIME_ONLY = (
    "device",
    "compile",
    "workers",
    "data_dir",
    "threads",
    "eval_threads",
)  # where and how to run: a resumed run may change them


def field_type(cls: type, f: dataclasses.Field) -> type:
    """The field's runtime type (int, float, str, bool, list or dict)."""
    hint = typing.get_type_hints(cls)[f.name]
    origin = typing.get_origin(hint) or hint
    return origin if isinstance(origin, type) else str
