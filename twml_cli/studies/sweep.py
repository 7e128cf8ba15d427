"""Sweeps: one run per cell (each value of the swept settings x each seed) under a parent run,
and what only the whole sweep shows: a table of the cells' metrics, their aggregate over
seeds (mean, standard deviation, n) and the figure. Pure: no MLflow, no console.

Evidence for a claim is an aggregate over seeds; `compare` words a difference of two means from
its 95% confidence interval (Welch's t), and calls it within seed noise where that holds 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import config

SEED = "seed"

# What a sweep's figure and summary show for each command (metrics a child logged; a metric no
# child has is left out). The parent's tables hold every metric.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "train": ("accuracy", "robust_accuracy", "autoattack_robust_accuracy", "train_time_s", "images_per_s"),
    "attack": ("accuracy", "robust_accuracy", "autoattack_robust_accuracy"),
    "smooth": (
        "accuracy",
        "certified_accuracy",
        "average_certified_radius",
        "certified_accuracy_r0.25",
        "train_time_s",
    ),
    "backdoor": ("accuracy", "attack_success_rate", "train_time_s"),
    "cleanse": ("model0_anomaly_index", "model1_anomaly_index", "backdoor_success_rate", "model0_cleanse_time_s"),
    "mitigate": ("accuracy", "attack_success_rate", "reversed_success"),
}
LABELS = {
    "accuracy": "clean accuracy",
    "robust_accuracy": "PGD robust accuracy",
    "autoattack_robust_accuracy": "AutoAttack robust accuracy",
    "train_time_s": "training time (s)",
    "images_per_s": "training images/s",
    "certified_accuracy": "certified accuracy (r = 0)",
    "average_certified_radius": "average certified radius",
    "certified_accuracy_r0.25": "certified accuracy (r = 0.25)",
    "attack_success_rate": "attack success rate",
    "reversed_success": "reversed trigger's success",
    "backdoor_success_rate": "reversed trigger's success",
}


def label(metric: str) -> str:
    """A metric's name for a reader (the figure's panel titles, the summary)."""
    return LABELS.get(metric, metric.replace("_", " "))


def cell_values(settings, axes: list[str]) -> dict:
    """A cell's value of each swept setting that applies to it: in `--method standard,free --m
    4,7` the standard cell has no m (its table row leaves it empty)."""
    applied = config.params(settings)
    return {k: applied[k] for k in axes if k in applied}


def child_name(base: str, values: dict) -> str:
    """A child run's name: its study's name and the swept values it does not already say, e.g.
    'free-m4 seed=1' (not 'free-m4 method=free m=4 seed=1')."""

    def shown(k, v) -> str:
        text = f"{v:g}" if isinstance(v, float) else f"{v}"
        named = (
            f"{k}{text}" in base or f"{k}={text}" in base or (isinstance(v, str) and text in re.split(r"[-\s]+", base))
        )
        return "" if named else f"{k}={text}"

    return " ".join([base, *filter(None, (shown(k, v) for k, v in values.items()))])


def parent_name(command: str, settings_list: list, axes: list[str]) -> str:
    """The parent run's name, e.g. 'train: m 4, 7 x seed 0, 1'."""

    def values(k):
        seen = list(dict.fromkeys(getattr(s, k) for s in settings_list))
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in seen)

    return f"{command}: " + " x ".join(f"{k} {values(k)}" for k in axes)


def parent_params(command: str, settings_list: list, axes: list[str]) -> dict:
    """The parent's params: what every cell shares, each swept setting as its list of values,
    the command and the number of cells."""
    shared = {k: v for k, v in config.params(settings_list[0]).items() if k not in axes}
    swept = {k: list(dict.fromkeys(getattr(s, k) for s in settings_list)) for k in axes}
    return {**shared, **swept, "sweep_command": command, "swept": ",".join(axes), "cells": len(settings_list)}


def table(settings_list: list, axes: list[str], run_ids: list[str], metrics: list[dict[str, float]]) -> pd.DataFrame:
    """One row per child: its swept values, run id, then every metric it logged."""
    rows = [{**cell_values(s, axes), "run_id": rid, **m} for s, rid, m in zip(settings_list, run_ids, metrics)]
    frame = pd.DataFrame(rows)
    return frame[[*axes, *(c for c in frame.columns if c not in axes)]]  # a setting no first cell has stays in place


def aggregate(frame: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Per cell (the swept values other than the seed): for every metric its mean, standard
    deviation over seeds (ddof 1; 0 with one seed) and n, as columns <metric>_mean, _std, _n."""
    groups = [a for a in axes if a != SEED]
    metrics = [c for c in frame.columns if c not in (*axes, "run_id") and pd.api.types.is_numeric_dtype(frame[c])]
    keyed = frame.assign(_cell=0) if not groups else frame
    out = []
    for key, part in keyed.groupby(groups or ["_cell"], sort=False, dropna=False):
        row = dict(zip(groups, key if isinstance(key, tuple) else (key,))) if groups else {}
        for m in metrics:
            values = part[m].dropna().to_numpy(dtype=float)
            row[f"{m}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            row[f"{m}_n"] = len(values)
        out.append(row)
    return pd.DataFrame(out)


def shown_metrics(command: str, agg: pd.DataFrame) -> list[str]:
    """The command's key metrics that the aggregate holds (what the figure and summary show)."""
    return [m for m in KEY_METRICS.get(command, ()) if f"{m}_mean" in agg.columns and agg[f"{m}_mean"].notna().any()]


def fmt(value: float, metric: str) -> str:
    """A metric's value as the summary prints it: seconds and rates to 0.1, the rest to 4 places."""
    return f"{value:.1f}" if metric.endswith("_s") or metric.endswith("_per_s") else f"{value:.4f}"


def summary_lines(command: str, agg: pd.DataFrame, axes: list[str]) -> list[str]:
    """The console's table: one line per cell, mean ± standard deviation (n seeds)."""
    groups = [a for a in axes if a != SEED]
    metrics = shown_metrics(command, agg)
    lines = []
    for _, row in agg.iterrows():
        where = (
            ", ".join(
                f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in groups if pd.notna(row[k])
            )
            or "all cells"
        )
        n = int(row[f"{metrics[0]}_n"]) if metrics else 0
        values = "; ".join(
            f"{label(m)} {fmt(row[f'{m}_mean'], m)}" + (f" ± {fmt(row[f'{m}_std'], m)}" if n > 1 else "")
            for m in metrics
        )
        lines.append(f"  {where}: {values} ({n} seed{'s' if n != 1 else ''})")
    return lines


@dataclass(frozen=True)
class Estimate:
    """A metric over seeds: mean, sample standard deviation and the number of seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values) -> Estimate:
        """The estimate from one value per seed (sd 0 with one seed)."""
        values = np.asarray(values, dtype=float)
        return cls(float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values))

    def text(self, digits: int = 4) -> str:
        """'mean ± sd', or the value alone from one seed (whose spread is unknown, not 0)."""
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" if self.n > 1 else f"{self.mean:.{digits}f}"


@dataclass(frozen=True)
class Difference:
    """b - a, the difference of two means over seeds, with its 95% confidence interval."""

    value: float
    low: float
    high: float

    @property
    def way(self) -> str | None:
        """'rose' or 'fell' where the interval excludes 0; None where it holds 0."""
        return "rose" if self.low > 0 else "fell" if self.high < 0 else None


def difference(a: Estimate, b: Estimate, level: float = 0.95) -> Difference | None:
    """The difference of the means b - a with the confidence interval of Welch's two-sample t test
    (spreads not assumed equal); None with a single seed on either side, whose spread is unknown.
    Unlike mean ± sd intervals, it narrows as seeds are added."""
    if min(a.n, b.n) < 2:
        return None
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    d = b.mean - a.mean
    if va + vb == 0:
        return Difference(d, d, d)
    from scipy.stats import t  # here, not at import: `twml runs` and the CLI's start stay light

    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    half = float(t.ppf(0.5 + level / 2, df)) * math.sqrt(va + vb)
    return Difference(d, d - half, d + half)


def direction(a: Estimate, b: Estimate) -> str | None:
    """'rose' or 'fell' from a to b where the 95% interval of the difference excludes 0; None
    where it holds 0 (within seed noise) or either side has one seed (no direction can be told)."""
    d = difference(a, b)
    return None if d is None else d.way


def compare(a: Estimate, b: Estimate, what: str, digits: int = 4) -> str:
    """A sentence on how `what` changes from a to b: both means ± sd, and the difference with its
    95% interval (Welch); a direction only where the interval excludes 0, else 'within seed noise'."""
    d = difference(a, b)
    if d is None:
        return (
            f"{what} went from {a.text(digits)} to {b.text(digits)}, from one seed: no claim about its direction "
            "can be made"
        )
    n = f"{min(a.n, b.n)} seeds" if a.n == b.n else f"{a.n} and {b.n} seeds"
    interval = f"difference {d.value:+.{digits}f}, 95% interval {d.low:+.{digits}f} to {d.high:+.{digits}f}"
    verdict = d.way
    if verdict is None:
        return (
            f"{what} went from {a.text(digits)} to {b.text(digits)} (mean ± sd over {n}; {interval}): within seed noise"
        )
    return f"{what} {verdict} from {a.text(digits)} to {b.text(digits)} (mean ± sd over {n}; {interval})"
