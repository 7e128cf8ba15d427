"""Runs a study as the CLI does: prepare (all bad input is caught here, before any run exists),
an MLflow run with the settings as params, compute, record, then the console lines.

Under torchrun every process prepares and computes; only rank 0 touches MLflow and the
console, so a command logs one run. Long runs checkpoint into their run (`checkpoint/`) and
certification writes its rows as it goes, so `--resume RUN_ID` continues an interrupted run
in place. The only module of studies/ that talks to the tracking layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pandas as pd

from .. import config, results, runtime, tracking, training
from ..config import RESUMABLE
from ..errors import TwmlError
from ..runtime import Progress, describe_device, no_progress
from . import attack, backdoor, cleanse, mitigate, smooth, train
from .common import Hooks

STUDIES: dict[str, ModuleType] = {m.COMMAND: m for m in (train, attack, smooth, backdoor, cleanse, mitigate)}
ROWS_EVERY_S = 20.0  # how often certification's rows are written while it runs


@dataclass
class Session:
    """Where runs go and how the console is reached (rank 0 only)."""

    experiment: str = "twml"
    preset: str = config.DEFAULT_PRESET
    echo: Callable[[str], None] = print
    progress: Progress = no_progress
    parent: str | None = None  # runs are nested under this one (twml reproduce, several sigmas)

    def __post_init__(self):
        if runtime.rank() != 0:
            self.echo, self.progress = (lambda _: None), no_progress


class NullRun:
    """What processes other than rank 0 record to: nothing."""

    id = ""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def execute(command: str, settings, session: Session, resume: str | None = None, *prepare_args, inputs=None):
    """One study, one run (or, with `resume`, the rest of an interrupted one). Returns
    (run id, outcome) on every process. `inputs`: the study's prepared inputs, if already made."""
    study = STUDIES[command]
    inputs = study.prepare(settings, *prepare_args) if inputs is None else inputs
    hooks = Hooks(progress=session.progress)
    if resume:
        hooks.resume, hooks.done_rows = _leftovers(resume)
    with _run(command, study, inputs, session, resume) as run:
        if command in RESUMABLE:
            _checkpointing(run, hooks)
        outcome = study.compute(inputs, hooks)
        study.record(run, outcome)
    run_id = runtime.broadcast_text(run.id)
    for line in study.summarize(outcome):
        session.echo(line)
    session.echo(f"Run id: {run_id}")
    return run_id, outcome


@contextlib.contextmanager
def _run(command: str, study, inputs, session: Session, resume: str | None) -> Iterator:
    if runtime.rank() != 0:
        yield NullRun()
        return
    if resume:
        with tracking.reopen_run(resume) as run:
            yield run
        return
    s = inputs.settings
    params = {**config.params(s), "preset": session.preset, "world_size": runtime.world_size(),
              **tracking.environment_params(describe_device(inputs.device))}  # fmt: skip
    if hasattr(study, "extra_params"):
        params.update(study.extra_params(inputs))
    tags = study.tags(s) if hasattr(study, "tags") else None
    with tracking.start_run(session.experiment, command, run_name=study.run_name(s), tags=tags, parent=session.parent) as run:
        run.log_params(params)
        run.log_json(config.to_dict(s), results.CONFIG_JSON)
        run.log_datasets(datasets(study, inputs))
        yield run


def datasets(study, inputs) -> list[dict]:
    """The data a run used, for MLflow's dataset inputs: the data set's two splits (a study may
    name others: backdoor's poisoned training set), each with a digest of its contents."""
    name = inputs.data.info.name
    splits = study.datasets(inputs) if hasattr(study, "datasets") else [(name, inputs.data.train, "train"), (name, inputs.data.test, "test")]
    return [{"name": n, "digest": e.digest(), "source": inputs.data.info.name, "profile": e.profile(), "context": c} for n, e, c in splits]


def _checkpointing(run, hooks: Hooks) -> None:
    """Per-pass curves as they come, the training state every few passes, and certification's
    rows every ROWS_EVERY_S seconds: all into the run, so an interruption loses little."""
    hooks.on_pass = lambda stats: (train.record_pass(run, stats), run.heartbeat())

    def save_state(state: training.TrainState) -> None:
        with tempfile.TemporaryDirectory(prefix="twml-checkpoint-") as tmp:
            run.log_dir(state.save(tmp), results.CHECKPOINT_DIR)
        run.heartbeat()

    last = [0.0]

    def save_rows(rows: dict) -> None:
        if time.monotonic() - last[0] < ROWS_EVERY_S:
            return
        last[0] = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="twml-rows-") as tmp:
            pd.DataFrame(rows).to_csv(Path(tmp) / results.CERTIFY_CSV, index=False)
            run.log_dir(tmp)
        run.heartbeat()

    hooks.save_state, hooks.save_rows = save_state, save_rows


def _leftovers(run_id: str):
    """What an interrupted run left: its last training state and its certified rows."""
    state = rows = None
    folder = tracking.download_artifact(run_id, results.CHECKPOINT_DIR)
    if folder and (Path(folder) / training.TrainState.WEIGHTS).is_file():
        state = training.TrainState.load(folder)
    table = tracking.download_artifact(run_id, results.CERTIFY_CSV)
    if table:
        frame = pd.read_csv(table)
        rows = {k: frame[k].to_numpy() for k in frame.columns}
    return state, rows


def resume_settings(command: str, run_id: str, overrides: dict):
    """The settings an interrupted run was started with, from its params; only where and how
    to run (device, compile, workers, data_dir) may change."""
    if command not in RESUMABLE:
        raise TwmlError(f"twml {command} has nothing to resume: {', '.join(RESUMABLE)} do")
    run = tracking.get_run(run_id)
    logged = run.data.tags.get(results.COMMAND_TAG)
    if logged != command:
        raise TwmlError(f"run '{run_id}' is a '{logged}' run, not '{command}': resume it with twml {logged} --resume {run_id}")
    runtime_only = {"device", "compile", "workers", "data_dir"}
    changed = sorted(k for k, v in overrides.items() if v is not None and k not in runtime_only)
    if changed:
        raise TwmlError(f"a resumed run keeps its settings; only {', '.join(sorted(runtime_only))} may be given (not {', '.join(changed)})")
    if run.info.status == "FINISHED":
        raise TwmlError(f"run '{run_id}' already finished; there is nothing to resume")
    params = {k: v for k, v in run.data.params.items() if k not in runtime_only}
    settings = config.from_params(config.COMMANDS[command][0], params)
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def execute_all(command: str, settings_list: list, session: Session) -> list[str]:
    """A command that makes one run per value of an `each` setting (several sigmas): one run,
    or a parent run (tagged twml.command=sweep) with a nested run for each."""
    if len(settings_list) == 1:
        return [execute(command, settings_list[0], session)[0]]
    first = STUDIES[command].prepare(settings_list[0])  # bad input ends here, before a parent run exists
    with _parent(session, "sweep", f"{command}: {len(settings_list)} runs") as nested:
        done = [execute(command, s, nested, inputs=first if i == 0 else None) for i, s in enumerate(settings_list)]
        if command == "smooth" and runtime.rank() == 0:
            runs = [tracking.Run(run_id) for run_id, _ in done] + ([tracking.Run(nested.parent)] if nested.parent else [])
            smooth.record_together(runs, [o for _, o in done])
    return [run_id for run_id, _ in done]


@contextlib.contextmanager
def _parent(session: Session, command: str, name: str) -> Iterator[Session]:
    """A session whose runs nest under a new parent run (unless it already has a parent)."""
    if session.parent is not None or runtime.rank() != 0:
        yield session
        return
    with tracking.start_run(session.experiment, command, run_name=name) as parent:
        yield dataclasses.replace(session, parent=parent.id)


def mitigate_all(settings, session: Session) -> list[str]:
    """A run for each (model, class) the cleanse run flagged (newest cleanse run by default)."""
    if not settings.cleanse_run:
        newest = tracking.find_runs(session.experiment, "cleanse")
        if not newest:
            raise TwmlError(f"no finished cleanse run in experiment '{session.experiment}': run twml cleanse first, or give --cleanse-run")
        settings = dataclasses.replace(settings, cleanse_run=newest[0].info.run_id)
    found = mitigate.findings(settings.cleanse_run)
    if len(found) == 1:
        return [execute("mitigate", settings, session, None, found[0])[0]]
    first = mitigate.prepare(settings, found[0])  # bad input ends here, before a parent run exists
    with _parent(session, "sweep", f"mitigate: {len(found)} models") as nested:
        return [execute("mitigate", settings, nested, None, f, inputs=first if i == 0 else None)[0] for i, f in enumerate(found)]


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
    0.20; a BadNets model; Neural Cleanse on the standard and the backdoored model; its
    mitigation (unlearning and pruning); the report. Every setting is checked before the
    first run starts."""
    from .. import report

    base = config.resolve_one("train", preset, overrides)
    trainings = [dataclasses.replace(base, method="standard"), *(dataclasses.replace(base, method="free", m=m) for m in (4, 7))]
    smoothings = [dataclasses.replace(config.resolve("smooth", preset, overrides)[0], sigma=sigma) for sigma in REPRODUCE_SIGMAS]
    poisoning = config.resolve_one("backdoor", preset, overrides)
    cleansing = config.resolve_one("cleanse", preset, overrides)
    mitigating = config.resolve_one("mitigate", preset, overrides)
    backdoor.prepare(poisoning)  # its data-dependent checks (target class, trigger size) too
    if runtime.rank() == 0:
        tracking.experiment_id(session.experiment)  # the store and experiment exist before any step runs
    ids: dict = {}  # run ids (and the cleanse run's outcome) the later steps need
    began = time.perf_counter()
    with _parent(session, "reproduce", "reproduce") as nested:
        steps = [
            ("standard training", lambda: ids.update(standard=execute("train", trainings[0], nested)[0])),
            ("free adversarial training, m = 4", lambda: execute("train", trainings[1], nested)),
            ("free adversarial training, m = 7", lambda: execute("train", trainings[2], nested)),
            ("randomized smoothing, sigma = 0.05 and 0.20", lambda: execute_all("smooth", smoothings, nested)),
            ("BadNets backdoor", lambda: ids.update(backdoor=execute("backdoor", poisoning, nested)[0])),
            ("Neural Cleanse on the standard and the backdoored model",
             lambda: ids.update(cleanse=execute("cleanse", dataclasses.replace(cleansing, model_runs=[ids["standard"], ids["backdoor"]]), nested))),
            ("mitigation of what Neural Cleanse flagged: unlearning, then pruning", lambda: repair(ids["cleanse"])),
        ]  # fmt: skip

        def repair(cleansed) -> None:
            run_id, outcome = cleansed
            if not outcome.findings:
                session.echo("Neural Cleanse flagged no model, so there is nothing to mitigate.")
                return
            for method in ("unlearn", "prune"):
                mitigate_all(dataclasses.replace(mitigating, cleanse_run=run_id, mitigation=method), nested)

        total = len(steps) + 1
        for k, (title, step) in enumerate(steps, 1):
            session.echo(f"\n[{k}/{total}] {title}  ({time.perf_counter() - began:.0f} s elapsed)")
            step()
        if runtime.rank() != 0:
            return None
        session.echo(f"\n[{total}/{total}] report  ({time.perf_counter() - began:.0f} s elapsed)")
        files = report.build(session.experiment, out, tracking.tracking_uri(), parent=nested.parent)
    session.echo(f"\nDone in {time.perf_counter() - began:.0f} s.")
    session.echo(f"Report: {files.markdown} and {files.pdf} (figures in {files.figures}/)")
    session.echo("Browse every run, metric and image: mlflow ui   (then open http://127.0.0.1:5000)")
    return files
