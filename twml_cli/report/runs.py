# mypy: disable-error-code="assignment"
# (the records' fields default to None only until load() fills them from a finished run)
"""The finished runs of an experiment as typed records: settings rebuilt from params by their
config class, metrics read through the results schema. A run that lacks what its section
needs stops the report with one line naming it, never a NaN in the write-up."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import config, results, tracking
from ..errors import TwmlError
from ..studies.cleanse import searched_models
from ..studies.sweep import Estimate


@dataclass
class Logged:
    id: str
    name: str
    command: str
    start_time: int  # ms since the epoch
    params: dict[str, str]
    host: str = ""  # the machine it ran on (twml.host)
    end_time: int = 0  # ms since the epoch (0: unknown)

    @property
    def where(self) -> str:
        return f"run {self.id[:8]} ({self.command})"

    def param(self, key: str, default: str = "") -> str:
        return self.params.get(key, default)


@dataclass
class TrainRun(Logged):
    settings: config.Training = None
    training: results.TrainingMetrics = None
    robustness: results.RobustnessMetrics = None
    autoattack: results.AutoAttackMetrics | None = None  # when it was evaluated with AutoAttack


@dataclass
class AttackRun(Logged):
    settings: config.Attack = None
    robustness: results.RobustnessMetrics = None
    autoattack: results.AutoAttackMetrics | None = None

    @property
    def model(self) -> str:
        return self.param("model_run") or self.param("model_path")


@dataclass
class SmoothRun(Logged):
    settings: config.Smoothing = None
    certification: results.CertificationMetrics = None
    table: pd.DataFrame = field(default=None, repr=False)  # certify.csv
    training: results.TrainingMetrics | None = None  # None when the run certified a given model

    def certified(self, radius: float) -> float:
        from ..smoothing import certified_accuracy

        return float(
            certified_accuracy(self.table["radius"].to_numpy(), self.table["correct"].to_numpy(), np.array([radius]))[0]
        )


@dataclass
class BackdoorRun(Logged):
    settings: config.Backdoor = None
    backdoor: results.BackdoorMetrics = None


@dataclass
class CleanseRun(Logged):
    settings: config.Cleanse = None
    norms: pd.DataFrame = field(default=None, repr=False)  # norms.csv
    models: dict[int, results.CleanseModelMetrics] = field(default_factory=dict)
    backdoor_success_rate: float | None = None
    ceilings: dict[int, float] = field(default_factory=dict)  # model{i}_anomaly_ceiling, where logged
    searches_run: dict[int, int] = field(default_factory=dict)  # model{i}_searches_run, where logged
    files: dict[str, Path] = field(default_factory=dict)  # figures and arrays, downloaded
    verdict: str = "none"  # the run's twml.verdict tag

    @property
    def inspected(self) -> list[str]:
        """The models it searched: run ids where they were runs."""
        return searched_models(self.params)


@dataclass
class MitigateRun(Logged):
    settings: config.Mitigate = None
    mitigation: results.MitigationMetrics = None
    real: results.RealTriggerMetrics | None = None  # when the model came from twml backdoor
    change: results.AccuracyChange | None = None  # the test images it lost and gained (where logged)
    restarts: int = 0  # unlearning's fine-tunes that lost the clean training images, each started again
    lr_used: float | None = None  # the rate of the fine-tune unlearning kept (where logged)
    train_accuracy: tuple[float, float] | None = None  # the unstamped training images', before and after (where logged)
    rejected: tuple[float, float | None] | None = None  # a filter's: of the clean test images, of the real trigger's
    tradeoff: Path | None = None  # a filter's figure: what each threshold rejects


@dataclass
class SweepRun(Logged):
    """A sweep's parent run: the command it swept, over which settings, and its tables."""

    sweep_command: str = ""
    axes: list[str] = field(default_factory=list)
    table: pd.DataFrame = field(default=None, repr=False)  # sweep.csv: one row per child
    aggregate: pd.DataFrame = field(default=None, repr=False)  # sweep-aggregate.csv: per cell over seeds

    @property
    def groups(self) -> list[str]:
        return [a for a in self.axes if a != "seed"]

    @property
    def seeds(self) -> int:
        return int(self.table["seed"].nunique()) if "seed" in self.table else 1


KIND = ("method", "m", "fast_step", "eval")  # what tells kinds of training apart, or only adds to their evaluation


def setup(run: Any, *also: str) -> str:
    """A run record's settings but its seed, where it ran (config.RUNTIME_ONLY) and the settings
    named in `also`: runs with one setup differ only by their seed."""
    skip = {"seed", *config.RUNTIME_ONLY, *also}
    kept = {k: v for k, v in config.params(run.settings).items() if k not in skip}
    return json.dumps(kept, sort_keys=True, default=str)


def seed_text(seeds) -> str:
    """'seed 0', 'seeds 0, 2' or 'seeds 0-9'."""
    seeds = sorted(set(seeds))
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}"


@dataclass
class Replicates:
    """Runs of one setup, the newest of each seed, newest first: a metric over them is a mean and
    a spread over seeds."""

    runs: list

    @classmethod
    def of(cls, runs: list) -> Replicates:
        newest: dict[int, Any] = {}
        for r in runs:  # newest first
            newest.setdefault(r.settings.seed, r)
        return cls(list(newest.values()))

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def newest(self):
        return self.runs[0]

    @property
    def seeds(self) -> str:
        return seed_text(r.settings.seed for r in self.runs)

    def estimate(self, value: Callable[[Logged], float]) -> Estimate:
        return Estimate.of([value(r) for r in self.runs])


@dataclass
class Runs:
    train: list[TrainRun]
    attack: list[AttackRun]
    smooth: list[SmoothRun]
    backdoor: list[BackdoorRun]
    cleanse: list[CleanseRun]  # the newest is read in full; the others' verdicts only
    mitigate: list[MitigateRun] = field(default_factory=list)
    sweeps: list[SweepRun] = field(default_factory=list)
    # cleanse runs of repaired models alone (twml cleanse --run <mitigate run>), read in full but for their figures;
    # `cleanse` holds the others, or, where there are none, these too
    searched_again: list[CleanseRun] = field(default_factory=list)

    def sweep(self, command: str, axis: str) -> SweepRun | None:
        """The newest sweep of `command` over `axis` (a setting, or 'seed'), if any."""
        return next((s for s in self.sweeps if s.sweep_command == command and axis in s.axes), None)

    @property
    def all(self) -> list[Logged]:
        every = [*self.train, *self.attack, *self.smooth, *self.backdoor, *self.cleanse, *self.mitigate, *self.sweeps]
        read = {r.id for r in self.cleanse}
        every += [r for r in self.searched_again if r.id not in read]
        return sorted(every, key=lambda r: r.start_time, reverse=True)


def load(experiment: str) -> Runs:
    def base(r, cls, settings_cls):
        return cls(
            r.info.run_id,
            r.info.run_name or "",
            r.data.tags.get(results.COMMAND_TAG, ""),
            r.info.start_time,
            dict(r.data.params),
            r.data.tags.get(tracking.HOST_TAG, ""),
            r.info.end_time or 0,
            settings=config.from_params(settings_cls, r.data.params),
        )

    def read(r, cls, where, prefix=""):
        return results.read(r.data.metrics, cls, where, prefix)

    def autoattack(r, logged):
        return read(r, results.AutoAttackMetrics, logged.where) if logged.settings.eval == "autoattack" else None

    train = []
    for r in tracking.find_runs(experiment, "train"):
        t = base(r, TrainRun, config.Training)
        t.training, t.robustness = (
            read(r, results.TrainingMetrics, t.where),
            read(r, results.RobustnessMetrics, t.where),
        )
        t.autoattack = autoattack(r, t)
        train.append(t)
    attack = []
    for r in tracking.find_runs(experiment, "attack"):
        a = base(r, AttackRun, config.Attack)
        a.robustness, a.autoattack = read(r, results.RobustnessMetrics, a.where), autoattack(r, a)
        attack.append(a)
    smooth = []
    for r in tracking.find_runs(experiment, "smooth"):
        s = base(r, SmoothRun, config.Smoothing)
        s.certification = read(r, results.CertificationMetrics, s.where)
        s.training = None if s.settings.model_run else read(r, results.TrainingMetrics, s.where)
        s.table = pd.read_csv(_artifact(s, results.CERTIFY_CSV))
        smooth.append(s)
    backdoor = []
    for r in tracking.find_runs(experiment, "backdoor"):
        b = base(r, BackdoorRun, config.Backdoor)
        b.backdoor = read(r, results.BackdoorMetrics, b.where)
        backdoor.append(b)
    mitigate = []
    for r in tracking.find_runs(experiment, "mitigate"):
        m = base(r, MitigateRun, config.Mitigate)
        m.mitigation = read(r, results.MitigationMetrics, m.where)
        m.real = read(r, results.RealTriggerMetrics, m.where) if "attack_success_rate" in r.data.metrics else None
        if "test_images_lost" in r.data.metrics:
            m.change = read(r, results.AccuracyChange, m.where)
        m.restarts = int(r.data.metrics.get("unlearn_restarts", 0))
        m.lr_used = r.data.metrics.get("unlearn_lr_used")
        if "unlearn_train_accuracy" in (logged := r.data.metrics):
            m.train_accuracy = (logged["unlearn_train_accuracy_before"], logged["unlearn_train_accuracy"])
        if "filter_clean_rejected" in logged:
            m.rejected = (logged["filter_clean_rejected"], logged.get("filter_real_rejected"))
            figure = tracking.download_artifact(m.id, results.FILTER_FIGURE)
            m.tradeoff = Path(figure) if figure else None
        mitigate.append(m)
    cleansed = tracking.find_runs(experiment, "cleanse")
    cleanse = [base(r, CleanseRun, config.Cleanse) for r in cleansed]
    for c, r in zip(cleanse, cleansed):
        c.verdict = r.data.tags.get(results.VERDICT_TAG, "none")
    repaired = {m.id for m in mitigate}
    # searches of repaired models alone (twml cleanse --run <mitigate run>)
    again = [k for k, c in enumerate(cleanse) if c.inspected and set(c.inspected) <= repaired]
    studied = [k for k in range(len(cleanse)) if k not in again] or again  # those alone: the newest is read
    for k in {*again, *studied[:1]}:
        _read_cleanse(cleanse[k], cleansed[k], files=k in studied[:1])
    sweeps = []
    for r in tracking.find_runs(experiment, "sweep"):
        params = r.data.params
        if "sweep_command" not in params:  # a parent of several mitigations: nothing to aggregate
            continue
        w = SweepRun(
            r.info.run_id,
            r.info.run_name or "",
            "sweep",
            r.info.start_time,
            dict(params),
            sweep_command=params["sweep_command"],
            axes=[a for a in params.get("swept", "").split(",") if a],
        )
        w.table = pd.read_csv(_artifact(w, results.SWEEP_CSV))
        w.aggregate = pd.read_csv(_artifact(w, results.SWEEP_AGGREGATE_CSV))
        sweeps.append(w)
    return Runs(
        train, attack, smooth, backdoor, [cleanse[k] for k in studied], mitigate, sweeps, [cleanse[k] for k in again]
    )


def _read_cleanse(c: CleanseRun, r, files: bool) -> None:
    """Fill a cleanse run's record from its logged norms and metrics; `files`: also download its
    figures and reversed triggers (the run section 3 reads)."""
    c.norms = pd.read_csv(_artifact(c, results.NORMS_CSV))
    c.models = {
        int(i): results.read(r.data.metrics, results.CleanseModelMetrics, c.where, f"model{int(i)}_")
        for i in sorted(c.norms["model"].unique())
    }
    c.backdoor_success_rate = r.data.metrics.get(results.BACKDOOR_SUCCESS)
    c.ceilings = {
        i: r.data.metrics[f"model{i}_{results.ANOMALY_CEILING}"]
        for i in c.models
        if f"model{i}_{results.ANOMALY_CEILING}" in r.data.metrics
    }
    c.searches_run = {
        i: int(r.data.metrics[f"model{i}_{results.SEARCHES_RUN}"])
        for i in c.models
        if f"model{i}_{results.SEARCHES_RUN}" in r.data.metrics
    }
    if not files:
        return
    for name in (
        results.TRIGGER_PNG,
        results.MASK_PNG,
        results.MASK_GRID_FIGURE,
        results.NORMS_FIGURE,
        results.REVERSED_NPZ,
    ):
        path = tracking.download_artifact(c.id, name)
        if path:
            c.files[name] = Path(path)


def _artifact(run: Logged, name: str) -> Path:
    path = tracking.download_artifact(run.id, name)
    if not path:
        raise TwmlError(f"{run.where} has no artifact '{name}': run `twml {run.command}` again")
    return Path(path)
