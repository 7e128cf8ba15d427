"""`twml train`: standard or free adversarial training, then clean accuracy and PGD."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from .. import attacks, config, models, results, runtime, training
from .common import Data, Hooks, Run, artifacts, device, load_data, new_model, with_augmentation

COMMAND = "train"


@dataclass
class Inputs:
    settings: config.Training
    device: torch.device
    data: Data
    model: models.Classifier  # freshly initialized


@dataclass
class Outcome:
    settings: config.Training
    model: models.Classifier  # trained, in eval mode
    training: training.TrainResult
    robustness: attacks.RobustnessResult


def run_name(s: config.Training) -> str:
    return f"free-m{s.m}" if s.method == "free" else s.method


def prepare(s: config.Training) -> Inputs:
    dev = device(s)
    data = load_data(s.dataset, s)
    s = with_augmentation(s, data)
    return Inputs(s, dev, data, new_model(s, data.info, dev))


def compute(inputs: Inputs, hooks: Hooks = Hooks()) -> Outcome:
    s, data, model = inputs.settings, inputs.data, inputs.model
    work = s.epochs * len(data.train), len(data.test) * (s.pgd_steps + 2) * s.pgd_restarts
    with runtime.phase("train"):
        result = training.train(
            model,
            data.train,
            s.train_config(),
            s.perturbation(),
            hooks=hooks.training(s),
            compile_mode=s.compile_mode(inputs.device, work[0]),
        )
    attacked = models.compiled(model, s.compile_mode(inputs.device, work[1]))
    with runtime.phase("evaluate"):
        robust = attacks.evaluate_robustness(
            attacked, data.test, s.pgd_config(), s.eval_batch_size, s.seed, hooks.progress, s.autoattack_config()
        )
    return Outcome(s, model, result, robust)


def metrics(outcome: Outcome) -> tuple[results.TrainingMetrics, results.RobustnessMetrics]:
    """The outcome as the schema's records: what record() logs and the findings check."""
    return training_metrics(outcome.training), robustness_metrics(outcome.robustness)


def record(run: Run, outcome: Outcome) -> None:
    run.log_model(outcome.model, outcome.settings.register)  # first: the metrics below are linked to it
    record_training(run, outcome.training)
    record_robustness(run, outcome.robustness)


def summarize(outcome: Outcome) -> list[str]:
    s = outcome.settings
    label = f"free adversarial training (m={s.m})" if s.method == "free" else f"{s.method} training"
    return [
        f"Time (in seconds) to complete {label}: {outcome.training.train_time_s:.4f}",
        *robustness_lines(outcome.robustness, s.pgd_config()),
    ]


# ---------------------------------------------------------------- shared with attack, smooth, backdoor


def record_training(run: Run, result: training.TrainResult) -> None:
    """The per-epoch curves (step = epochs of SGD budget; the runner logs them live, and a Run
    logs a step once) and what training cost."""
    for stats in result.history:
        record_pass(run, stats)
    run.log_metrics(results.metrics(training_metrics(result)))


def record_pass(run: Run, stats: training.EpochStats) -> None:
    """One pass's curves, at step = epochs of SGD budget."""
    run.log_series(results.TRAIN_LOSS, [stats.epoch], [stats.loss])
    run.log_series(results.TRAIN_ACCURACY, [stats.epoch], [stats.accuracy])
    if stats.robust_accuracy is not None:
        run.log_series(results.GUARD_ROBUST_ACCURACY, [stats.epoch], [stats.robust_accuracy])


def training_metrics(result: training.TrainResult) -> results.TrainingMetrics:
    return results.TrainingMetrics(
        result.train_time_s, result.images_per_s, result.steps, result.passes_per_step, int(result.stopped_early)
    )


def robustness_metrics(r: attacks.RobustnessResult) -> results.RobustnessMetrics:
    return results.RobustnessMetrics(r.accuracy, r.pgd_success_rate, r.robust_accuracy, r.attack_time_s)


def autoattack_metrics(r: attacks.RobustnessResult) -> results.AutoAttackMetrics | None:
    if r.autoattack_robust_accuracy is None:
        return None
    assert r.robust_accuracy_worst is not None and r.autoattack_time_s is not None  # set together with it
    return results.AutoAttackMetrics(r.autoattack_robust_accuracy, r.robust_accuracy_worst, r.autoattack_time_s)


def record_robustness(run: Run, r: attacks.RobustnessResult) -> None:
    """PGD's figures, and AutoAttack's when it ran (also robust accuracy after each of its
    attacks), and the per-example table."""
    run.log_metrics(results.metrics(robustness_metrics(r)))
    aa = autoattack_metrics(r)
    if aa is not None:
        run.log_metrics(
            {
                **results.metrics(aa),
                **{results.autoattack_after_key(a): v for a, v in (r.autoattack_after or {}).items()},
            }
        )
    if r.examples is not None:
        with artifacts(run) as folder:
            pd.DataFrame(r.examples).to_csv(folder / results.EXAMPLES_CSV, index=False, float_format="%.6g")


def robustness_lines(r: attacks.RobustnessResult, pgd: attacks.PGDConfig) -> list[str]:
    restarts = f"{pgd.restarts} restart{'s' if pgd.restarts > 1 else ''}"
    lines = [
        f"Model accuracy: {r.accuracy:.4f}",
        f"Success rate of untargeted white-box PGD (eps={pgd.eps:g}, {pgd.steps} steps, {restarts}): "
        f"{r.pgd_success_rate:.4f}",
        f"Robust accuracy: {r.robust_accuracy:.4f}",
    ]
    if r.autoattack_robust_accuracy is not None:
        stages = ", ".join(f"{a} {v:.4f}" for a, v in (r.autoattack_after or {}).items())
        lines += [
            f"AutoAttack robust accuracy (standard, eps={pgd.eps:g}): {r.autoattack_robust_accuracy:.4f} (after "
            f"{stages}; {r.autoattack_time_s:.1f} s)",
            f"Robust accuracy, per-example worst case of PGD and AutoAttack: {r.robust_accuracy_worst:.4f}",
        ]
    return lines
