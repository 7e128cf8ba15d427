"""Runs a study as the CLI does: prepare (all bad input is caught here, before any run exists),
an MLflow run with the settings as params, compute, record, then the console lines.

Under torchrun every process prepares and computes; only rank 0 touches MLflow and the
console, so a command logs one run. Long runs checkpoint into their run and certification
writes its rows as it goes, so `--resume RUN_ID` continues an interrupted run in place (see
resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .. import config, distributed, figures, results, runtime, tracking
from ..config import RESUMABLE
from ..errors import TwmlError
from ..runtime import Progress, describe_device, no_progress
from ..tracking_server import unreachable
from . import attack, backdoor, cleanse, mitigate, smooth, sweep, train
from . import resume as resume_from
from .common import Hooks, artifacts, source_run

STUDIES: dict[str, ModuleType] = {m.COMMAND: m for m in (train, attack, smooth, backdoor, cleanse, mitigate)}
MAX_THREADS_PER_CORE = 4  # more intra-op threads than this only contend (and thousands hang OpenMP)


@dataclass
class Session:
    """Where runs go and how the console is reached (rank 0 only)."""

    experiment: str = "twml"
    preset: str = config.DEFAULT_PRESET
    echo: Callable[[str], None] = print
    progress: Progress = no_progress
    parent: str | None = None  # runs are nested under this one (twml reproduce, several sigmas)

    def __post_init__(self):
        if distributed.rank() != 0:
            self.echo, self.progress = (lambda _: None), no_progress


class NullRun:
    """What processes other than rank 0 record to: nothing."""

    id = ""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def execute(
    command: str,
    settings,
    session: Session,
    resume: str | None = None,
    *prepare_args,
    inputs=None,
    name: str | None = None,
    earlier: list | None = None,
):
    """One study, one run (or, with `resume`, the rest of an interrupted one). Returns
    (run id, outcome) on every process. `inputs`: the study's prepared inputs, if already made;
    `name`: the run's name (default: the study's); `earlier`: what the sweep's earlier cells kept."""
    study = STUDIES[command]
    inputs = study.prepare(settings, *prepare_args) if inputs is None else inputs
    threads = thread_plan(command, inputs)  # logged with the run
    hooks = Hooks(progress=session.progress, earlier=earlier or [])
    if resume:
        hooks.resume, hooks.done_rows = resume_from.leftovers(resume)
        session.echo(resume_from.going_on(resume, hooks.resume, hooks.done_rows))
    started = ""
    try:
        with runtime.planned_threads(*threads), _run(command, study, inputs, session, resume, name, threads) as run:
            started = run.id
            if command in RESUMABLE:
                resume_from.checkpointing(run, hooks)
            outcome = study.compute(inputs, hooks)
            study.record(run, outcome)
    except Exception as err:
        if started and unreachable(err, tracking.tracking_uri()):
            raise TwmlError(resume_from.went_away(command, started, err)) from None
        raise
    resume_from.forget(run.id)
    run_id = distributed.broadcast_text(run.id)
    for line in study.summarize(outcome):
        session.echo(line)
    session.echo(f"Run id: {run_id}")
    return run_id, outcome


def work(command: str, inputs) -> tuple[int | None, int]:
    """Values through the model in one forward pass (batch x channels x height x width) of the
    study's training steps (None: it trains nothing) and of its evaluation, which set their CPU
    threads (runtime.choose_threads): training and unlearning batches; evaluation batches,
    attacks, certification's noisy batches, the trigger search's batch of every class and start."""
    s, info = inputs.settings, inputs.data.info
    trains = {
        "train": lambda: s.batch_size,
        "backdoor": lambda: s.batch_size,
        "smooth": lambda: None if inputs.given else s.batch_size,
        "mitigate": lambda: s.unlearn_config().batch_size if s.mitigation == "unlearn" else None,
    }
    evaluates = {
        "smooth": lambda: s.certify_batch_size,
        "cleanse": lambda: s.search_batch_size * s.search_restarts * info.num_classes,
    }
    image = info.in_chans * info.input_size[0] * info.input_size[1]
    batch = trains.get(command, lambda: None)()
    return None if batch is None else batch * image, evaluates.get(command, lambda: s.eval_batch_size)() * image


def check_threads(s) -> None:
    """Raises TwmlError for more threads than this machine can run (a limit of the machine, not of
    the settings: a run logged elsewhere with more may still be read)."""
    cores = os.cpu_count() or 1
    for name, given in (("threads", s.threads), ("eval threads", s.eval_threads)):
        if given > MAX_THREADS_PER_CORE * cores:
            raise TwmlError(
                f"{name} must be at most {MAX_THREADS_PER_CORE} per core ({MAX_THREADS_PER_CORE * cores} on this "
                f"machine's {cores}), got {given}"
            )


def thread_plan(command: str, inputs) -> tuple[int, int]:
    """The CPU intra-op threads of the study's training steps and of its evaluation, each chosen
    for its own work (--threads, then --eval-threads, win); a study that trains nothing runs
    everything with its evaluation's count. Raises TwmlError beyond what this machine can run."""
    s = inputs.settings
    check_threads(s)
    trains, evaluates = work(command, inputs)
    evaluate = runtime.choose_threads(s.eval_threads or s.threads, evaluates)[0]
    return (evaluate if trains is None else runtime.choose_threads(s.threads, trains)[0]), evaluate


@contextlib.contextmanager
def _run(
    command: str, study, inputs, session: Session, resume: str | None, name: str | None, threads: tuple[int, int]
) -> Iterator:
    if distributed.rank() != 0:
        yield NullRun()
        return
    if resume:
        with tracking.reopen_run(resume) as run:
            yield run
        return
    s = inputs.settings
    params = {
        **config.params(s),
        "preset": session.preset,
        "world_size": distributed.world_size(),
        **tracking.environment_params(describe_device(inputs.device), *threads),
    }
    if hasattr(study, "extra_params"):
        params.update(study.extra_params(inputs))
    tags = study.tags(s) if hasattr(study, "tags") else None
    with tracking.start_run(
        session.experiment, command, run_name=name or study.run_name(s), tags=tags, parent=session.parent
    ) as run:
        run.log_params(params)
        run.log_json(config.to_dict(s), results.CONFIG_JSON)
        run.log_datasets(datasets(study, inputs))
        yield run


def datasets(study, inputs) -> list[dict]:
    """The data a run used, for MLflow's dataset inputs: the data set's two splits (a study may
    name others: backdoor's poisoned training set), each with a digest of its contents."""
    name = inputs.data.info.name
    splits = (
        study.datasets(inputs)
        if hasattr(study, "datasets")
        else [(name, inputs.data.train, "train"), (name, inputs.data.test, "test")]
    )
    return [
        {"name": n, "digest": e.digest(), "source": inputs.data.info.name, "profile": e.profile(), "context": c}
        for n, e, c in splits
    ]


def execute_all(command: str, settings_list: list, session: Session) -> list[str]:
    """A command's run, or its sweep: a parent run (tagged twml.command=sweep) with one nested run
    per cell, one after another, each as the command would run alone; the parent then holds the
    cells' metrics (sweep.csv), their aggregate over seeds (sweep-aggregate.csv) and the figure."""
    if len(settings_list) == 1:
        return [execute(command, settings_list[0], session)[0]]
    study = STUDIES[command]
    axes = config.swept(settings_list)
    first = study.prepare(settings_list[0])  # bad input ends here, before a parent run exists
    check_threads(first.settings)
    keep = getattr(study, "sweep_keep", lambda outcome: None)
    began = time.perf_counter()
    with _parent(session, "sweep", sweep.parent_name(command, settings_list, axes)) as (nested, parent):
        parent.log_params(sweep.parent_params(command, settings_list, axes))
        ids: list[str] = []
        kept: list = []
        for i, s in enumerate(settings_list):
            name = sweep.child_name(study.run_name(s), sweep.cell_values(s, axes))
            session.echo(f"\n[{i + 1}/{len(settings_list)}] {name}  ({time.perf_counter() - began:.0f} s elapsed)")
            run_id, outcome = execute(command, s, nested, inputs=first if i == 0 else None, name=name, earlier=kept)
            ids.append(run_id)
            kept.append(keep(outcome))
            del outcome
        agg = _record_sweep(parent, command, settings_list, axes, ids, kept)
    if agg is not None:
        seeds = len(dict.fromkeys(s.seed for s in settings_list))
        session.echo(
            f"\nSweep of {len(ids)} runs over {', '.join(axes)} "
            + (f"(mean ± sd over {seeds} seeds):" if seeds > 1 else "(one seed):")
        )
        for line in sweep.summary_lines(command, agg, axes):
            session.echo(line)
        shown = ", ".join(f"{name}.png" for name in (*getattr(study, "SWEEP_FIGURES", ()), results.SWEEP_FIGURE))
        session.echo(
            f"Sweep run id: {parent.id} (figures {shown}, tables {results.SWEEP_CSV} and "
            f"{results.SWEEP_AGGREGATE_CSV} in {tracking.artifact_uri(parent.id)})"
        )
    return ids


def _record_sweep(parent, command: str, settings_list: list, axes: list[str], ids: list[str], kept: list):
    """The parent's tables and figures (rank 0); returns the aggregate, None on other ranks."""
    if distributed.rank() != 0:
        return None
    metrics = [tracking.final_metrics(run_id) for run_id in ids]
    frame = sweep.table(settings_list, axes, ids, metrics)
    agg = sweep.aggregate(frame, axes)
    groups = [a for a in axes if a != sweep.SEED]
    shown = sweep.shown_metrics(command, agg)
    with artifacts(parent) as folder:
        frame.to_csv(folder / results.SWEEP_CSV, index=False)
        agg.to_csv(folder / results.SWEEP_AGGREGATE_CSV, index=False)
        if shown:
            title = f"twml {command}: " + (", ".join(groups) if groups else "seeds")
            figures.save_both(
                figures.sweep_figure(agg, groups, shown, sweep.LABELS, title), folder / results.SWEEP_FIGURE
            )
        extra = getattr(STUDIES[command], "record_sweep", None)
        if extra is not None:
            extra(folder, settings_list, axes, kept)
    if not groups:  # seeds alone: the parent's metrics are the aggregate (mean and sd)
        row = agg.iloc[0]
        parent.log_metrics(
            {k: float(row[k]) for k in agg.columns if k.endswith(("_mean", "_std")) and np.isfinite(row[k])}
        )
    return agg


@contextlib.contextmanager
def _parent(session: Session, command: str, name: str) -> Iterator[tuple[Session, Any]]:
    """A new parent run (nested under the session's own parent, if any) and a session whose
    runs nest under it. Other ranks get their session and a run that records nothing."""
    if distributed.rank() != 0:
        yield session, NullRun()
        return
    with tracking.start_run(session.experiment, command, run_name=name, parent=session.parent) as parent:
        yield dataclasses.replace(session, parent=parent.id), parent


def mitigate_all(settings, session: Session) -> list[str]:
    """A run for each (model, class) the cleanse run flagged (newest cleanse run by default)."""
    if not settings.cleanse_run:
        newest = tracking.find_runs(session.experiment, "cleanse")
        if not newest:
            raise TwmlError(
                f"no finished cleanse run in experiment '{session.experiment}': run twml cleanse first, or give "
                "--cleanse-run"
            )
        settings = dataclasses.replace(settings, cleanse_run=newest[0].info.run_id)
        acted = _repairs_searched(newest[0])
        if acted and newest[0].data.tags.get(results.VERDICT_TAG, "none") == "none":
            raise TwmlError(
                f"the newest cleanse run ({newest[0].info.run_id[:8]}) searched models twml mitigate repaired and "
                "flagged none: there is nothing to mitigate; to repair the models as they were again (say, with "
                f"another --mitigation), give --cleanse-run {' or '.join(acted)}"
            )
    found = mitigate.findings(settings.cleanse_run)
    if len(found) == 1:
        return [execute("mitigate", settings, session, None, found[0])[0]]
    first = mitigate.prepare(settings, found[0])  # bad input ends here, before a parent run exists
    with _parent(session, "sweep", f"mitigate: {len(found)} models") as (nested, _):
        return [
            execute("mitigate", settings, nested, None, f, inputs=first if i == 0 else None)[0]
            for i, f in enumerate(found)
        ]


def _repairs_searched(run) -> list[str]:
    """When every model a cleanse run searched is a `twml mitigate` run's (a check of repairs), the
    cleanse runs whose findings those repairs acted on; else none."""
    acted = []
    for model in cleanse.searched_models(run.data.params):
        try:
            repair = source_run(model)
        except TwmlError:  # a run deleted since
            return []
        if repair is None or repair.data.tags.get(results.COMMAND_TAG) != "mitigate":
            return []
        acted.append(repair.data.params.get("cleanse_run", ""))
    return [a for a in dict.fromkeys(acted) if a]


def default_cleanse_runs(experiment: str) -> list[str]:
    """Model 0: the newest finished standard train run; model 1: the newest backdoor run."""
    clean = [r for r in tracking.find_runs(experiment, "train") if r.data.params.get("method") == "standard"]
    poisoned = tracking.find_runs(experiment, "backdoor")
    missing = [cmd for cmd, runs in (("twml train", clean), ("twml backdoor", poisoned)) if not runs]
    if missing:
        raise TwmlError(
            f"no finished run of {' and '.join(missing)} in experiment '{experiment}': run it first, or name models "
            "with --run"
        )
    return [clean[0].info.run_id, poisoned[0].info.run_id]
