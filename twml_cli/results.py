"""The names twml logs under and reads back: one schema for the studies that record runs and
the report that reads them.

Metrics are grouped in frozen dataclasses; a study records `asdict(...)` of one, the report
reads it back with `read(run_metrics, Cls, where)`, which names what is missing instead of
returning NaN. Params are the settings' fields (config.py). Artifacts are named here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import TwmlError

COMMAND_TAG = "twml.command"
VERDICT_TAG = "twml.verdict"

# ---------------------------------------------------------------- artifacts

MODEL_DIR = "model"  # model.safetensors + spec.json
CONFIG_JSON = "config.json"  # the effective settings
CERTIFY_CSV = "certify.csv"  # one row per certified example
EXAMPLES_CSV = "attack-examples.csv"  # one row per attacked example (attacks.EXAMPLE_COLUMNS, AutoAttack's stages)
CURVE_CSV = "certified-accuracy-vs-radius.csv"
CURVE_FIGURE = "randomized-smoothing-acc-vs-radius"  # .png and .pdf
BACKDOOR_EXAMPLES = ("example.png", "example-clean.png", "example-triggered.png")
NORMS_CSV = "norms.csv"  # one row per (model, class)
NORMS_FIGURE = "norms.png"
FILTER_FILE = "input-filter.safetensors"  # a mitigate --mitigation filter run's filter (mitigation.save_filter)
FILTER_FIGURE = "filter-tradeoff.png"  # ... and what each threshold of it rejects
MASK_GRID_FIGURE = "mask-grid.png"
TRIGGER_PNG, MASK_PNG = "trigger.png", "mask.png"  # of the most anomalous flagged class
REVERSED_NPZ = "reversed-triggers.npz"  # plain float arrays, loads with allow_pickle=False
SWEEP_CSV = "sweep.csv"  # a sweep parent's: one row per child, its swept values and metrics
SWEEP_AGGREGATE_CSV = "sweep-aggregate.csv"  # per cell over seeds: <metric>_mean, _std, _n
SWEEP_FIGURE = "sweep"  # .png and .pdf: the swept values against the key metrics
SIGMA_FIGURE = "certified-accuracy-by-sigma"  # .png and .pdf: a smoothing sweep's curves and their envelope
SIGMA_CSV = "certified-accuracy-by-sigma.csv"
ROBUSTNESS_FIGURE = "robustness-curves"  # .png and .pdf: robust accuracy against eps per model
ROBUSTNESS_CSV = "robustness-curves.csv"

# per-epoch curves, logged with step = epochs of SGD budget
TRAIN_LOSS, TRAIN_ACCURACY = "train_loss", "train_accuracy"
GUARD_ROBUST_ACCURACY = "guard_robust_accuracy"  # fast training's check against catastrophic overfitting
CHECKPOINT_DIR = "checkpoint"  # TrainState (safetensors + JSON) of an unfinished run

# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class TrainingMetrics:
    """What training itself costs (train, and the training inside smooth and backdoor)."""

    train_time_s: float  # training only, evaluation excluded
    images_per_s: float  # images through forward+backward, replays counted
    sgd_steps: int
    passes_per_step: int  # forward-backward passes per SGD step: 1, or 2 for fast training
    stopped_early: int  # 1 when fast training's guard kept an earlier pass's weights


@dataclass(frozen=True)
class RobustnessMetrics:
    """Clean accuracy and untargeted white-box PGD (train, attack)."""

    accuracy: float
    pgd_success_rate: float  # misclassified under attack, already-wrong inputs included
    robust_accuracy: float  # 1 - pgd_success_rate
    attack_time_s: float


@dataclass(frozen=True)
class AutoAttackMetrics:
    """The standard AutoAttack (train --eval autoattack, attack --autoattack). The robust
    accuracy after each of its attacks is logged as autoattack_after_<attack> beside these."""

    autoattack_robust_accuracy: float  # surviving APGD-CE, APGD-T, FAB-T and Square
    robust_accuracy_worst: float  # surviving PGD and AutoAttack, per example
    autoattack_time_s: float


def autoattack_after_key(attack: str) -> str:
    return "autoattack_after_" + attack.replace("-", "_")


@dataclass(frozen=True)
class CertificationMetrics:
    """Randomized smoothing's figures (smooth). Certified accuracy at each table radius r is
    logged as certified_accuracy_r{r:g} beside these."""

    accuracy: float  # the base classifier on clean test images
    certified_accuracy: float  # at radius 0
    abstain_rate: float
    average_certified_radius: float
    max_certified_radius: float
    certify_time_s: float
    samples_per_s: float
    samples_per_image: float  # noise samples per certified image (n0 + n with fixed-n CERTIFY; fewer when adaptive)


def certified_accuracy_key(radius: float) -> str:
    return f"certified_accuracy_r{radius:g}"


@dataclass(frozen=True)
class BackdoorMetrics:
    accuracy: float  # clean test images
    attack_success_rate: float  # triggered test images of other classes sent to the target


@dataclass(frozen=True)
class CleanseModelMetrics:
    """One inspected model of a cleanse run, logged as model{i}_<name>."""

    accuracy: float
    anomaly_index: float  # the largest index below the median norm
    cleanse_time_s: float


@dataclass(frozen=True)
class MitigationMetrics:
    """A repaired model (mitigate), before and after, with the trigger Neural Cleanse reversed."""

    accuracy_before: float
    accuracy: float
    reversed_success_before: float  # the reversed trigger on clean test images of other classes
    reversed_success: float


@dataclass(frozen=True)
class AccuracyChange:
    """The clean test images a repair changed, image by image: classified right before and wrong
    after (lost), and the reverse (gained). Runs logged by earlier twml versions lack them."""

    test_images_lost: int
    test_images_gained: int

    def p_value(self) -> float:
        """McNemar's exact test, two-sided: how likely a split of the changed images at least this
        uneven would be if the repair were as likely to gain an image as to lose one."""
        from scipy.stats import binomtest  # here, not at import: the CLI's start stays light

        changed = self.test_images_lost + self.test_images_gained
        return 1.0 if changed == 0 else float(binomtest(self.test_images_lost, changed, 0.5).pvalue)

    def in_words(self) -> str:
        """'5 test images lost, 1 gained; McNemar's exact test p = 0.22', as the CLI and the report say it."""
        if self.test_images_lost + self.test_images_gained == 0:
            return "no test image changed"
        lost = f"{self.test_images_lost} test image{'s' * (self.test_images_lost != 1)} lost"
        return f"{lost}, {self.test_images_gained} gained; McNemar's exact test p = {self.p_value():.2g}"


@dataclass(frozen=True)
class RealTriggerMetrics:
    """The real trigger's attack success before and after (when the model came from twml backdoor)."""

    attack_success_rate_before: float
    attack_success_rate: float


def model_key(i: int, name: str) -> str:
    return f"model{i}_{name}"


def reversed_keys(i: int, search: int = 0) -> tuple[str, str]:
    """The names of model i's reversed masks and patterns in REVERSED_NPZ, one row per class:
    model{i}_masks for the first search, model{i}_search{k}_masks for the k-th of the others."""
    prefix = model_key(i, f"search{search}_" if search else "")
    return prefix + "masks", prefix + "patterns"


BACKDOOR_SUCCESS = "backdoor_success_rate"  # reversed trigger of the most anomalous flagged class
# per model, as model{i}_anomaly_ceiling: the largest anomaly index any class of it could have
# reached (median / MAD, the index of a norm of 0; with several searches, the one `needed` of them
# reach). At most the threshold: no class could have been flagged. Read as optional, since runs
# logged by earlier twml versions lack it.
ANOMALY_CEILING = "anomaly_ceiling"
SEARCHES_RUN = "searches_run"  # with several searches: those run before the verdict was decided
# param: how many models were searched at the same time (on a CPU, one per core); their
# model{i}_cleanse_time_s then overlap. Runs logged by earlier twml versions lack it (one at a time).
MODELS_AT_ONCE = "models_searched_at_once"


def run_id_of(uri: str) -> str:
    """The run id in a run id or a runs:/<id>/... URI."""
    return uri.removeprefix("runs:/").split("/")[0] if uri.startswith("runs:/") else uri


def run_in(source: str) -> str | None:
    """The run id a model source names (a whole run id, or a runs:/<id>/... URI); None for a folder
    or a models:/ URI. How a study's console and the write-up tell a logged model from a folder."""
    run = run_id_of(source)
    return run if len(run) == 32 and all(c in "0123456789abcdef" for c in run) else None


# ---------------------------------------------------------------- reading back


def metrics(record: Any, prefix: str = "") -> dict[str, float]:
    """A metrics dataclass as {name: value}, names prefixed."""
    return {f"{prefix}{k}": float(v) for k, v in asdict(record).items()}


def read(logged: dict[str, float], cls: type, where: str, prefix: str = ""):
    """The metrics dataclass `cls` from a run's metrics; a one-line TwmlError names the first
    missing metric (a renamed metric never becomes a silent NaN)."""
    values = {}
    for f in fields(cls):
        key = prefix + f.name
        if key not in logged:
            raise TwmlError(f"{where} has no metric '{key}': it was logged by another twml version, or did not finish")
        values[f.name] = int(logged[key]) if f.type in ("int", int) else float(logged[key])
    return cls(**values)
