"""`twml attack`: PGD (and AutoAttack) with other settings against any logged model, as a run of
its own; with several eps (and models), robustness curves.

A curve's cells run from the smallest eps up and share their work: an adversarial example
found inside a smaller ball lies inside every larger one, so an example broken at one eps is
not attacked again at the next and counts as broken there (each attack's figure at eps is
its worst case over the eps so far, and the curve never rises). Every run logs its
per-example table."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import attacks, config, figures, models, results
from ..errors import TwmlError
from .common import Data, Hooks, Run, check_fits, data_name, device, evenly_spaced, load_data, load_model, model_source

COMMAND = "attack"
SWEEP_FIGURES = (results.ROBUSTNESS_FIGURE,)  # a sweep's own figure, beside the sweep's metrics figure


@dataclass
class Inputs:
    settings: config.Attack
    device: torch.device
    data: Data
    model: models.Classifier
    indices: np.ndarray  # the test examples attacked


@dataclass
class Outcome:
    settings: config.Attack
    robustness: attacks.RobustnessResult
    reused: int  # examples counted broken from a smaller eps of the same curve, not attacked again


@dataclass(frozen=True)
class Point:
    """One cell of a robustness curve, as later cells and the sweep's figure need it."""

    curve: str  # every setting but eps: cells of one curve share it
    eps: float
    idx: np.ndarray
    pgd_broken: np.ndarray
    aa_broken: np.ndarray | None
    accuracy: float
    robust_accuracy: float
    autoattack_robust_accuracy: float | None


def run_name(s: config.Attack) -> str:
    return "attack"


def tags(s: config.Attack) -> dict[str, str]:
    return {f"twml.{k}": v for k, v in model_source(s.model_run).items()}


def prepare(s: config.Attack) -> Inputs:
    if not s.model_run:
        raise TwmlError("name the model to attack with --run (a run id, runs:/RUN_ID/model or a folder)")
    dev = device(s)
    model = load_model(s.model_run, dev)
    data = load_data(data_name(s.dataset, model, "digits"), s, model)
    check_fits(model, data.info, f"model {s.model_run}")
    indices = evenly_spaced(len(data.test), s.num_examples)
    return Inputs(dataclasses.replace(s, dataset=data.info.name, num_examples=len(indices)), dev, data, model, indices)


def curve_key(s: config.Attack) -> str:
    """What the cells of one robustness curve share: every logged setting but eps."""
    return json.dumps({k: v for k, v in config.params(s).items() if k != "eps"}, sort_keys=True, default=str)


def compute(inputs: Inputs, hooks: Hooks = Hooks()) -> Outcome:
    s = inputs.settings
    key = curve_key(s)
    smaller = [
        p
        for p in hooks.earlier
        if isinstance(p, Point) and p.curve == key and p.eps < s.eps and np.array_equal(p.idx, inputs.indices)
    ]
    broken = np.logical_or.reduce([p.pgd_broken for p in smaller]) if smaller else None
    aa_earlier = [p.aa_broken for p in smaller if p.aa_broken is not None]
    aa_broken = np.logical_or.reduce(aa_earlier) if aa_earlier and s.eval == "autoattack" else None
    work = len(inputs.indices) * (s.pgd_steps + 2) * s.pgd_restarts
    model = models.compiled(inputs.model, s.compile_mode(inputs.device, work))
    robust = attacks.evaluate_robustness(
        model,
        inputs.data.test,
        s.pgd_config(),
        s.eval_batch_size,
        s.seed,
        hooks.progress,
        s.autoattack_config(),
        indices=inputs.indices,
        broken=broken,
        aa_broken=aa_broken,
    )
    return Outcome(s, robust, int(broken.sum()) if broken is not None else 0)


def sweep_keep(o: Outcome) -> Point:
    ex, r = o.robustness.examples, o.robustness
    assert ex is not None  # evaluate_robustness always returns the table
    aa = (
        None
        if r.autoattack_robust_accuracy is None
        else ~ex[[k for k in ex if k.startswith("aa_") and k != "aa_reused"][-1]].astype(bool)
    )
    return Point(
        curve_key(o.settings),
        o.settings.eps,
        ex["idx"],
        ~ex["pgd_robust"].astype(bool),
        aa,
        r.accuracy,
        r.robust_accuracy,
        r.autoattack_robust_accuracy,
    )


def extra_params(inputs: Inputs) -> dict[str, str]:
    return {**model_source(inputs.settings.model_run), "model": inputs.model.spec.arch}


def record(run: Run, outcome: Outcome) -> None:
    from .train import record_robustness

    record_robustness(run, outcome.robustness)
    run.log_metrics({"reused_broken": outcome.reused})


def summarize(outcome: Outcome) -> list[str]:
    from .train import robustness_lines

    lines = robustness_lines(outcome.robustness, outcome.settings.pgd_config())
    if outcome.reused:
        lines.append(
            "Examples already broken at a smaller eps of this curve (counted broken, not attacked again): "
            f"{outcome.reused}"
        )
    return lines


def record_sweep(folder, settings_list: list, axes: list[str], kept: list[Point]) -> None:
    """Robustness curves: robust accuracy against eps for each model (and any other swept
    setting), from eps 0 (clean accuracy), mean over seeds; the area under each curve."""
    if "eps" not in axes:
        return
    others = [a for a in axes if a not in ("eps", "seed", "model_run")]
    points = [
        {
            "curve": " ".join([_short(s.model_run), *(f"{a}={getattr(s, a)}" for a in others)]),
            "replicate": s.seed,
            "eps": s.eps,
            "accuracy": p.accuracy,
            "robust_accuracy": p.robust_accuracy,
            "autoattack_robust_accuracy": p.autoattack_robust_accuracy,
        }
        for s, p in zip(settings_list, kept)
    ]
    table = curves(points)
    table.to_csv(folder / results.ROBUSTNESS_CSV, index=False)
    figures.save_both(figures.robustness_curves_figure(table), folder / results.ROBUSTNESS_FIGURE)


def curves(points: list[dict]) -> pd.DataFrame:
    """Robustness curves from measured points, each a dict of curve, replicate (a seed, or a
    model trained with another seed), eps, accuracy, robust_accuracy and
    autoattack_robust_accuracy (None if not run). One row per (curve, attack, eps) from eps 0
    (clean accuracy): robust accuracy mean and sd over replicates, their number, and the
    curve's normalized area (mean robust accuracy over [0, largest eps]) with its sd over replicates."""
    rows = []
    for p in points:
        for attack, value in (("pgd", p["robust_accuracy"]), ("autoattack", p.get("autoattack_robust_accuracy"))):
            if value is None or (isinstance(value, float) and np.isnan(value)):
                continue
            rows.append(
                {
                    "curve": p["curve"],
                    "replicate": p["replicate"],
                    "attack": attack,
                    "eps": 0.0,
                    "robust_accuracy": p["accuracy"],
                }
            )
            rows.append(
                {
                    "curve": p["curve"],
                    "replicate": p["replicate"],
                    "attack": attack,
                    "eps": float(p["eps"]),
                    "robust_accuracy": value,
                }
            )
    frame = pd.DataFrame(rows).drop_duplicates(["curve", "replicate", "attack", "eps"])
    keys = ["curve", "attack"]
    auc = (
        frame.sort_values("eps")
        .groupby([*keys, "replicate"], sort=False)
        .apply(lambda part: area(part["eps"].to_numpy(), part["robust_accuracy"].to_numpy()), include_groups=False)
        .rename("auc")
        .reset_index()
    )
    out = frame.groupby([*keys, "eps"], sort=False)["robust_accuracy"].agg(["mean", "std", "count"]).reset_index()
    out = out.rename(
        columns={"mean": "robust_accuracy_mean", "std": "robust_accuracy_sd", "count": "replicates"}
    ).fillna({"robust_accuracy_sd": 0.0})
    summary = (
        auc.groupby(keys)["auc"]
        .agg(["mean", "std"])
        .rename(columns={"mean": "auc", "std": "auc_sd"})
        .fillna(0.0)
        .reset_index()
    )
    return out.merge(summary, on=keys).sort_values([*keys, "eps"], kind="stable").reset_index(drop=True)


def area(eps: np.ndarray, robust: np.ndarray) -> float:
    """The area under a robustness curve over [0, largest eps], divided by the largest eps: the
    mean robust accuracy over the range (trapezoids between the measured eps)."""
    if len(eps) < 2 or eps.max() <= 0:
        return float(robust[0]) if len(robust) else 0.0
    return float(np.trapezoid(robust, eps) / eps.max())


def _short(run: str) -> str:
    return run if "/" in run else run[:8]
