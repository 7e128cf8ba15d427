"""The seed write-up's findings on the embedded default, as checks with their thresholds:
defined once, for the tests (which assert them on logged runs) and benchmarks/study.py
(which checks them on any device, without MLflow).

Each check takes the results-schema records a study logs (results.py), so it reads the same
numbers whether they come from compute() or back from MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

from .results import BackdoorMetrics, CertificationMetrics, RobustnessMetrics, TrainingMetrics

STANDARD_ACCURACY = 0.95  # standard training on digits
FREE_ACCURACY = 0.90  # free adversarial training keeps most of it...
FREE_PGD_RATIO = 0.6  # ...and PGD succeeds at most 0.6 times as often
FREE_TIME_RATIO = 1.5  # free training at equal SGD steps costs about what standard does
CERTIFIED_SMALL_SIGMA = 0.9  # certified accuracy at r = 0, sigma = 0.05
RADIUS_GROWTH = 2.0  # sigma 0.20 certifies radii more than twice sigma 0.05's
BACKDOOR_SUCCESS = 0.95  # BadNets' trigger works...
BACKDOOR_ACCURACY_DROP = 0.03  # ...at a cost of at most 3 points of clean accuracy
REVERSED_SUCCESS = 0.9  # the reversed trigger of the flagged class works too
ANOMALY_THRESHOLD = 2.0  # Neural Cleanse's


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str

    def __str__(self) -> str:
        return f"[{'ok' if self.ok else 'MISS'}] {self.what}"


def free_training(
    standard: tuple[TrainingMetrics, RobustnessMetrics], free: tuple[TrainingMetrics, RobustnessMetrics]
) -> list[Check]:
    """Study 1: free training (m = 4) against standard training at equal SGD steps."""
    (st, sr), (ft, fr) = standard, free
    return [
        Check(sr.accuracy >= STANDARD_ACCURACY, f"standard accuracy {sr.accuracy:.4f} >= {STANDARD_ACCURACY}"),
        Check(fr.accuracy >= FREE_ACCURACY, f"free accuracy {fr.accuracy:.4f} >= {FREE_ACCURACY}"),
        Check(
            fr.pgd_success_rate <= FREE_PGD_RATIO * sr.pgd_success_rate,
            f"free PGD success {fr.pgd_success_rate:.4f} <= {FREE_PGD_RATIO} x standard's {sr.pgd_success_rate:.4f}",
        ),
        Check(ft.sgd_steps == st.sgd_steps, f"equal SGD steps ({ft.sgd_steps} and {st.sgd_steps})"),
        Check(
            ft.train_time_s <= FREE_TIME_RATIO * st.train_time_s,
            f"free/standard time {ft.train_time_s / st.train_time_s:.2f} <= {FREE_TIME_RATIO}",
        ),
    ]


def smoothing(
    small: CertificationMetrics, large: CertificationMetrics, small_at_025: float, large_at_025: float
) -> list[Check]:
    """Study 2: sigma 0.05 against 0.20 (certified accuracy at r = 0.25 given separately)."""
    return [
        Check(
            small.certified_accuracy >= CERTIFIED_SMALL_SIGMA,
            f"sigma 0.05 certified accuracy at r=0 {small.certified_accuracy:.4f} >= {CERTIFIED_SMALL_SIGMA}",
        ),
        Check(
            large.max_certified_radius > RADIUS_GROWTH * small.max_certified_radius,
            f"largest radius {large.max_certified_radius:.4f} > {RADIUS_GROWTH} x {small.max_certified_radius:.4f}",
        ),
        Check(
            large.average_certified_radius > RADIUS_GROWTH * small.average_certified_radius,
            f"average certified radius {large.average_certified_radius:.4f} > {RADIUS_GROWTH} x "
            f"{small.average_certified_radius:.4f}",
        ),
        Check(
            small_at_025 == 0.0 and large_at_025 > 0.5,
            f"at r=0.25, beyond sigma 0.05's reach ({small_at_025:.4f}), sigma 0.20 still certifies "
            f"{large_at_025:.4f} > 0.5",
        ),
    ]


def neural_cleanse(
    clean_accuracy: float, backdoor: BackdoorMetrics, verdict: str, target: int, reversed_success: float | None
) -> list[Check]:
    """Study 3: a working backdoor that keeps accuracy, found by Neural Cleanse (model 1 is the
    backdoored one, model 0 the clean one)."""
    return [
        Check(
            backdoor.attack_success_rate >= BACKDOOR_SUCCESS,
            f"backdoor success {backdoor.attack_success_rate:.4f} >= {BACKDOOR_SUCCESS}",
        ),
        Check(
            backdoor.accuracy >= clean_accuracy - BACKDOOR_ACCURACY_DROP,
            f"backdoored accuracy {backdoor.accuracy:.4f} within {BACKDOOR_ACCURACY_DROP} "
            f"of clean {clean_accuracy:.4f}",
        ),
        Check(verdict == f"model 1 class {target}", f"verdict '{verdict}' is 'model 1 class {target}'"),
        Check(
            reversed_success is not None and reversed_success >= REVERSED_SUCCESS,
            f"reversed trigger success {reversed_success or 0:.4f} >= {REVERSED_SUCCESS}",
        ),
    ]
