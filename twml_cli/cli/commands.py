"""The commands: one thin function each, over studies/runner.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import config
from ..errors import TwmlError
from ..version import __version__
from .app import app, echo
from .options import (
    LAUNCH,
    OUT,
    SHARED,
    ConfigOption,
    ExperimentOption,
    PresetOption,
    ServerWaitOption,
    TrackingUriOption,
    _option,
    _parse,
    _session,
    _signature,
    study_command,
)

# ---------------------------------------------------------------- commands

FREE = (
    Annotated[
        bool,
        typer.Option(
            "--free",
            help="Free adversarial training (Shafahi et al., 2019): `--method free`.",
            rich_help_panel="Training",
        ),
    ],
    False,
)


@study_command("train", extra={"free": FREE}, overrides=lambda free: {"method": "free"} if free else {})
def train(settings_list, session) -> None:
    """Train a model: standard, free adversarial (--free) or fast adversarial (--method fast); attack it with PGD.

    Measures clean accuracy and the success rate of untargeted white-box L-inf PGD on the
    whole test split (and the standard AutoAttack with --eval autoattack)."""
    from ..studies import runner

    runner.execute_all("train", settings_list, session)


AUTOATTACK = (
    Annotated[
        bool,
        typer.Option(
            "--autoattack",
            help="Also the standard AutoAttack (`--eval autoattack`).",
            rich_help_panel="Threat model and PGD",
        ),
    ],
    False,
)


@study_command(
    "attack",
    extra={"autoattack": AUTOATTACK},
    overrides=lambda autoattack: {"eval": "autoattack"} if autoattack else {},
)
def attack(settings_list, session) -> None:
    """Re-evaluate a logged model: a stronger PGD (--pgd-steps 50 --pgd-restarts 5), or the
    standard AutoAttack (--autoattack).

    Logged as a run of its own that names the model's run. The data set is the model's own
    unless --dataset says otherwise."""
    from ..studies import runner

    runner.execute_all("attack", settings_list, session)


@study_command("smooth")
def smooth(settings_list, session) -> None:
    """Randomized smoothing (Cohen et al., 2019): certified L2 radii for each sigma.

    Trains a base classifier with Gaussian noise at each sigma (or takes the model --run
    names), certifies evenly spaced test images, and plots certified accuracy against radius."""
    from ..studies import runner

    runner.execute_all("smooth", settings_list, session)


@study_command("backdoor")
def backdoor(settings_list, session) -> None:
    """BadNets (Gu et al., 2017): train a backdoored model to inspect with cleanse.

    A white square stamped on a fraction of the training images sends them to the target
    class; logs clean accuracy and attack success rate."""
    from ..studies import runner

    runner.execute_all("backdoor", settings_list, session)


@study_command("cleanse")
def cleanse(settings_list, session) -> None:
    """Neural Cleanse (Wang et al., 2019): which model is backdoored, toward which class?

    Reverse-engineers a trigger for every class of each model, all classes at once, and
    flags classes whose trigger is abnormally small (MAD anomaly index > 2)."""
    import dataclasses

    from ..studies import runner

    if not settings_list[0].model_runs:
        models = runner.default_cleanse_runs(session.experiment)
        settings_list = [dataclasses.replace(s, model_runs=models) for s in settings_list]
    runner.execute_all("cleanse", settings_list, session)


@study_command("mitigate")
def mitigate(settings_list, session) -> None:
    """Neural Cleanse's mitigation: repair the models a cleanse run flagged.

    Unlearning (the default) fine-tunes on clean data, some of it stamped with the reversed
    trigger under true labels (--unlearn-fraction), the other images' features held where they
    were (--unlearn-distill); --mitigation prune removes the penultimate neurons the reversed
    trigger excites; --mitigation filter leaves the model as it is and rejects the images whose
    activation on those neurons is high (the paper's input filter). Logs accuracy and attack
    success (the real trigger, when the model came from twml backdoor) before and after, and the
    repaired model, or the filter."""
    from ..studies import runner

    if len(settings_list) > 1:
        flags = ", ".join(
            config.flag_of(config.field_of(type(settings_list[0]), k)) for k in config.swept(settings_list)
        )
        raise TwmlError(
            f"twml mitigate repairs with one value of each setting; {flags} got several (run it once per value)"
        )
    from ..results import FILTER_FILE

    repaired = runner.mitigate_all(settings_list[0], session)
    if settings_list[0].mitigation == "filter":  # a filtered model is the one already searched: where the filter is
        where = ", ".join(repaired)
        session.echo(
            f"\nThe filter is {FILTER_FILE} in run{'s' * (len(repaired) > 1)} {where}: "
            "twml_cli.mitigation.load_filter reads it, and Filtered(model, filter) serves the model behind it"
        )
    else:
        session.echo("\n" + recheck_line(repaired))


def recheck_line(repaired: list[str]) -> str:
    """The twml cleanse command that searches the repaired models (their mitigate runs) again."""
    which = "the repair by searching it" if len(repaired) == 1 else "the repairs by searching them"
    return f"Check {which} again: twml cleanse {' '.join(f'--run {r}' for r in repaired)}"


def _report(out: Path = OUT[1], **shared) -> None:
    """Build the write-up (Markdown and PDF) from the experiment's finished runs.

    Writes OUT/EXPERIMENT.md and .pdf (--out, --experiment) with their figures, and logs them as a run."""
    from .. import report as report_module
    from .. import tracking

    report_module.check_out(out)
    uri = tracking.configure(shared["tracking_uri"], create=False, server_wait=shared["server_wait"])
    files = report_module.build(shared["experiment"], out, uri)
    echo(f"Report: {files.markdown} and {files.pdf} (figures in {files.figures}/)")
    echo(f"Run id: {files.run_id}")


_REPORT_PARAMS = {"out": OUT, **{k: SHARED[k] for k in ("experiment", "tracking_uri", "server_wait")}}
_report.__signature__ = _signature(_REPORT_PARAMS)  # type: ignore[attr-defined]
_report.__annotations__ = {k: a for k, (a, _) in _REPORT_PARAMS.items()}
app.command(name="report")(_report)


def _reproduce(out: Path = OUT[1], curves: bool = False, curve_seeds: int = 3, **kwargs) -> None:
    """Run the whole write-up: all three studies, then the report.

    Standard and free (m = 4 and 7) training, smoothing at sigma 0.05 and 0.20, a BadNets
    model, Neural Cleanse on the standard and the backdoored model, its mitigation, the report.
    One to four minutes on a 2-core CPU with the embedded default; `--preset cifar10` is for a GPU.
    With --curves, also the report's curves over seeds: free training at m = 1, 2, 4, 7,
    standard and fast training, robustness curves, smoothing at three sigmas
    (9 to 12 minutes on 2 cores with 3 seeds)."""
    from ..studies import reproduce

    shared = {k: kwargs.pop(k) for k in SHARED}
    for k in LAUNCH:
        kwargs.pop(k)
    if curve_seeds < 1:
        raise TwmlError(f"--curve-seeds must be >= 1, got {curve_seeds}")
    from ..report import check_out

    check_out(out)
    preset = config.load_preset(shared["preset"], shared["config_file"])
    overrides = _parse(config.Common, kwargs)
    if isinstance(overrides.get("seed"), list):
        raise TwmlError(
            f"twml reproduce runs one --seed, got {','.join(map(str, overrides['seed']))}: --curves --curve-seeds N "
            "adds N seeds from --seed on, and any study takes several (twml train --seed 0,1,2)"
        )
    reproduce.reproduce(preset, overrides, _session(shared, preset), out, curve_seeds if curves else 0)


_COMMON = {f.name: f for f in config.settings_fields(config.Common)}
CURVES = (
    Annotated[
        bool,
        typer.Option(
            "--curves",
            help="Also the curves over seeds: m, eps and sigma sweeps (9 to 12 minutes on 2 cores, 3 seeds).",
        ),
    ],
    False,
)
CURVE_SEEDS = (Annotated[int, typer.Option(help="With --curves: seeds per cell, from --seed on.")], 3)
_REPRODUCE_PARAMS = {
    "out": OUT,
    "curves": CURVES,
    "curve_seeds": CURVE_SEEDS,
    **{k: _option(config.Common, _COMMON[k], None, sweep=False) for k in ("data_dir", "device", "seed")},
    **SHARED,
    **LAUNCH,
}
_reproduce.__signature__ = _signature(_REPRODUCE_PARAMS)  # type: ignore[attr-defined]
_reproduce.__annotations__ = {k: a for k, (a, _) in _REPRODUCE_PARAMS.items()}
app.command(name="reproduce")(_reproduce)


@app.command(name="runs")
def runs(
    experiment: ExperimentOption = "twml",
    tracking_uri: TrackingUriOption = None,
    server_wait: ServerWaitOption = 30.0,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON array for scripts, an object per run: run_id, run_name, command, status, started "
            "(ISO 8601, UTC), resume (the command, or null) and ended_killed (ended here, as in the table).",
        ),
    ] = False,
) -> None:
    """List the experiment's runs, newest first: which finished, which are running, which were
    interrupted (killed, crashed) and the command that resumes them. A run whose process is gone
    and that cannot be resumed (a report, a cleanse, a run killed before it logged its settings)
    is ended KILLED here, since nothing else ever will."""
    import json
    from datetime import datetime, timezone

    from .. import results, tracking

    tracking.configure(tracking_uri, server_wait=server_wait)
    listed = tracking.list_runs(experiment)
    if not listed:
        raise TwmlError(f"experiment '{experiment}' has no runs in {tracking.tracking_uri()}")
    rows = []
    for r in listed:
        status = tracking.status_of(r)
        command = r.data.tags.get(results.COMMAND_TAG, "")
        resume = None
        if status in ("interrupted", "stale", "KILLED", "FAILED") and config.resumable(r):
            resume = f"twml {command} --resume {r.info.run_id}"
        elif status == "interrupted":
            tracking.client().set_terminated(r.info.run_id, "KILLED")
        started = datetime.fromtimestamp(r.info.start_time / 1000, timezone.utc)
        rows.append(
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name or "",
                "command": command,
                "status": status,
                "started": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
                "resume": resume,
                "ended_killed": status == "interrupted" and resume is None,
            }
        )
    if as_json:
        echo(json.dumps(rows, indent=1))
        return

    def name(row) -> str:  # whole, so that the seeds of a sweep's runs tell them apart; a sweep's own cut at 40
        text = row["run_name"]
        return text if len(text) <= 40 else text[:39] + "…"

    width = max(len("run name"), *(len(name(row)) for row in rows))
    echo(f"{'status':<11}  {'command':<9}  {'run name':<{width}}  {'started (UTC)':<19}  run id")  # columns 2 apart
    for row in rows:
        started = row["started"].replace("T", " ").removesuffix("Z")
        line = f"{row['status']:<11}  {row['command']:<9}  {name(row):<{width}}  {started:<19}  {row['run_id']}"
        if row["resume"]:
            line += f"   resume: {row['resume']}"
        elif row["ended_killed"]:
            line += "   ended KILLED: its process is gone and it cannot be resumed; run the command again"
        echo(line)


@app.command(name="config")
def show_config(
    command: Annotated[
        str, typer.Argument(help=f"{', '.join(list(config.COMMANDS)[:-1])} or {list(config.COMMANDS)[-1]}.")
    ],
    preset: PresetOption = None,
    config_file: ConfigOption = None,
) -> None:
    """Print the effective settings of a command (defaults, then the preset) as a TOML file that
    --config takes back."""
    if command not in config.COMMANDS:
        raise TwmlError(f"unknown command '{command}': use one of {', '.join(config.COMMANDS)}")
    chosen = config.load_preset(preset, config_file)
    echo(
        config.to_toml(
            command, config.resolve(command, chosen), chosen.name if config_file else f"preset {chosen.name}"
        )
    )


def _version(value: bool) -> None:
    if value:
        print(f"twml {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    pass
