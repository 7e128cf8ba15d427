"""Runs a study as the CLI does: prepare (all bad input is caught here, before any run exists),
an MLflow run with the settings as params, compute, record, then the console lines.

The only module of studies/ that talks to the tracking layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .. import config, tracking
from ..errors import TwmlError
from ..runtime import Progress, describe_device, no_progress
from . import attack, backdoor, cleanse, smooth, train
from .common import Hooks

STUDIES: dict[str, ModuleType] = {m.COMMAND: m for m in (train, attack, smooth, backdoor, cleanse)}


@dataclass
class Session:
    """Where runs go and how the console is reached."""

    experiment: str = "twml"
    preset: str = config.DEFAULT_PRESET
    echo: Callable[[str], None] = print
    progress: Progress = no_progress


def execute(command: str, settings, session: Session):
    """One study, one run. Returns (run id, outcome)."""
    study = STUDIES[command]
    inputs = study.prepare(settings)
    s = inputs.settings
    params = {**config.params(s), "preset": session.preset, **tracking.environment_params(describe_device(inputs.device))}
    if hasattr(study, "extra_params"):
        params.update(study.extra_params(inputs))
    tags = study.tags(s) if hasattr(study, "tags") else None
    with tracking.start_run(session.experiment, command, run_name=study.run_name(s), tags=tags) as run:
        run.log_params(params)
        run.log_json(config.to_dict(s), "config.json")
        outcome = study.compute(inputs, Hooks(progress=session.progress))
        study.record(run, outcome)
    for line in study.summarize(outcome):
        session.echo(line)
    session.echo(f"Run id: {run.id}")
    return run.id, outcome


def execute_all(command: str, settings_list: list, session: Session) -> list[str]:
    """A command that makes one run per value of an `each` setting (several sigmas)."""
    done = [execute(command, s, session) for s in settings_list]
    if command == "smooth" and len(done) > 1:
        smooth.record_together([tracking.Run(run_id) for run_id, _ in done], [o for _, o in done])
    return [run_id for run_id, _ in done]


def default_cleanse_runs(experiment: str) -> list[str]:
    """Model 0: the newest finished standard train run; model 1: the newest backdoor run."""
    clean = [r for r in tracking.find_runs(experiment, "train") if r.data.params.get("method") == "standard"]
    poisoned = tracking.find_runs(experiment, "backdoor")
    missing = [cmd for cmd, runs in (("twml train", clean), ("twml backdoor", poisoned)) if not runs]
    if missing:
        raise TwmlError(f"no finished run of {' and '.join(missing)} in experiment '{experiment}': run it first, or name models with --run")
    return [clean[0].info.run_id, poisoned[0].info.run_id]


# ---------------------------------------------------------------- twml reproduce

REPRODUCE_SIGMAS = (0.05, 0.20)


def reproduce(preset: config.Preset, overrides: dict, session: Session, out: Path):
    """The whole write-up: standard, free m=4 and m=7 training; smoothing at sigma 0.05 and
    0.20; a BadNets model; Neural Cleanse on the standard and the backdoored model; the
    report. Every setting is checked before the first run starts."""
    import dataclasses

    from .. import report

    base = config.resolve_one("train", preset, overrides)
    trainings = [dataclasses.replace(base, method="standard"), *(dataclasses.replace(base, method="free", m=m) for m in (4, 7))]
    smoothings = [dataclasses.replace(s, sigma=sigma) for s in config.resolve("smooth", preset, overrides)[:1] for sigma in REPRODUCE_SIGMAS]
    poisoning = config.resolve_one("backdoor", preset, overrides)
    cleansing = config.resolve_one("cleanse", preset, overrides)
    tracking.experiment_id(session.experiment)  # the store and experiment exist before any step runs
    ids: dict[str, str] = {}
    steps = [
        ("standard training", lambda: ids.update(standard=execute("train", trainings[0], session)[0])),
        ("free adversarial training, m = 4", lambda: execute("train", trainings[1], session)),
        ("free adversarial training, m = 7", lambda: execute("train", trainings[2], session)),
        ("randomized smoothing, sigma = 0.05 and 0.20", lambda: execute_all("smooth", smoothings, session)),
        ("BadNets backdoor", lambda: ids.update(backdoor=execute("backdoor", poisoning, session)[0])),
        ("Neural Cleanse on the standard and the backdoored model",
         lambda: execute("cleanse", dataclasses.replace(cleansing, model_runs=[ids["standard"], ids["backdoor"]]), session)),
    ]  # fmt: skip
    began = time.perf_counter()
    total = len(steps) + 1
    for k, (title, step) in enumerate(steps, 1):
        session.echo(f"\n[{k}/{total}] {title}  ({time.perf_counter() - began:.0f} s elapsed)")
        step()
    session.echo(f"\n[{total}/{total}] report  ({time.perf_counter() - began:.0f} s elapsed)")
    files = report.build(session.experiment, out, tracking.tracking_uri())
    session.echo(f"\nDone in {time.perf_counter() - began:.0f} s.")
    session.echo(f"Report: {files.markdown} and {files.pdf} (figures in {files.figures}/)")
    session.echo("Browse every run, metric and image: mlflow ui   (then open http://127.0.0.1:5000)")
    return files
