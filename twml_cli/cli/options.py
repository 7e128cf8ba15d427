"""Options: the ones every command shares, declared once, and each study command's own, built
from its settings class (one field, one flag)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import config, data_names
from ..errors import TwmlError
from .app import app, echo, progress

# ---------------------------------------------------------------- options every command shares

TRACK, PRESET = "Tracking", "Preset"
PresetOption = Annotated[
    str | None,
    typer.Option(
        help="Preset: digits (the default), cifar10 or imagenet (for a GPU), or NAME.toml in ./experiments.",
        rich_help_panel=PRESET,
    ),
]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="TOML file read over the default preset.", rich_help_panel=PRESET)
]


def _experiment_name(name: str) -> str:
    if not name.strip():
        raise typer.BadParameter("an MLflow experiment needs a name")
    return name


ExperimentOption = Annotated[
    str, typer.Option(help="MLflow experiment.", rich_help_panel=TRACK, callback=_experiment_name)
]
TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).", rich_help_panel=TRACK
    ),
]
ServerWaitOption = Annotated[
    float,
    typer.Option(
        help="Seconds a tracking server that does not answer is waited for, at the start and on each request "
        "(one that accepts connections and never answers: longer, see the team-server docs).",
        rich_help_panel=TRACK,
        metavar="<float>",
    ),
]
SystemMetricsOption = Annotated[
    bool,
    typer.Option(help="Log CPU, memory and GPU use with every run (needs twml_cli[system]).", rich_help_panel=TRACK),
]
SHARED: dict[str, tuple[Any, Any]] = {  # name: (annotation, default)
    "preset": (PresetOption, None),
    "config_file": (ConfigOption, None),
    "experiment": (ExperimentOption, "twml"),
    "tracking_uri": (TrackingUriOption, None),
    "server_wait": (ServerWaitOption, 30.0),
    "system_metrics": (SystemMetricsOption, False),
}
PROCS = "Processes (torch.distributed.run)"
LAUNCH: dict[str, tuple[Any, Any]] = {  # consumed by launch.py before the command runs; declared here for --help
    "nproc_per_node": (
        Annotated[
            int | None,
            typer.Option(
                help="Run on this many processes per machine (DDP; NCCL on CUDA, gloo on CPU).", rich_help_panel=PROCS
            ),
        ],
        None,
    ),
    "nnodes": (
        Annotated[int | None, typer.Option(help="Machines taking part (default 1).", rich_help_panel=PROCS)],
        None,
    ),
    "node_rank": (
        Annotated[int | None, typer.Option(help="This machine's index, 0 to nnodes-1.", rich_help_panel=PROCS)],
        None,
    ),
    "rdzv_endpoint": (
        Annotated[
            str | None,
            typer.Option(help="HOST:PORT of machine 0, the same on every machine.", rich_help_panel=PROCS),
        ],
        None,
    ),
}
RESUME = (
    Annotated[
        str | None,
        typer.Option(
            help="Continue this interrupted run (its id) from its last checkpoint, in place.", rich_help_panel=TRACK
        ),
    ],
    None,
)
OUT = (
    Annotated[Path, typer.Option(help="Folder for EXPERIMENT.md, EXPERIMENT.pdf and the figures.")],
    Path("reports"),
)


def _option(cls: type, f, default: Any, sweep: bool = True) -> tuple[Any, Any]:
    """The Typer option of a settings field: (annotation, None). A setting that can be swept
    takes several values (repeat the flag; numbers and choices also comma-separated), and its help
    says so unless `sweep` is False (a command that makes no sweep and refuses them); lists and
    JSON go in as text."""
    kind = config.field_type(cls, f)
    text = f.metadata["help"]
    if f.metadata["choices"]:
        text += f" One of: {', '.join(f.metadata['choices'])}."
    if f.name == "dataset" and getattr(cls, "DATA_FROM_MODEL", False):
        text += "  [default: the one the model was trained on]"
    elif default not in ("", [], {}, None):
        shown = (
            ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
            if isinstance(default, list)
            else default
        )
        text += f"  [default: {shown}]"
    cli_type = {int: int, float: float, bool: bool, str: str, dict: str, list: list[str]}[kind]
    shown = f.metadata["item"] if kind is list else kind
    metavar = "" if kind is bool else f"<{shown.__name__ if shown in (int, float) else 'str'}>"
    if kind is not bool and config.sweepable(cls, f):
        cli_type = list[str]  # several values: a sweep (where a command makes none, it refuses them)
        if sweep:
            metavar = metavar[:-1] + (",...>" if kind in (int, float) or f.metadata["choices"] else ">...")
    flag = config.flag_of(f)
    names = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    option = typer.Option(
        *names, help=text, rich_help_panel=config.panel_of(cls, f.name), show_default=False, metavar=metavar
    )
    return Annotated[cli_type | None, option], None


def _split(cls: type, f, values: list[str]) -> list[str]:
    """Numbers and choices split at commas; free text (paths, names, run ids) only by repeating the flag."""
    kind = config.field_type(cls, f)
    if kind in (int, float) or f.metadata["choices"] or (kind is list and f.metadata["item"] is not str):
        words = [v.strip() for item in values for v in item.split(",")]
        if "" in words and not (kind is list and words == [""]):  # --radii '' clears a list
            raise TwmlError(f"{config.flag_of(f)} has an empty value in '{','.join(values)}'")
        return [w for w in words if w]
    return list(values)


def _parse(cls: type, flags: dict[str, Any]) -> dict[str, Any]:
    """Flag values as settings values: JSON objects, lists, and several values for a sweep."""
    by_name = {f.name: f for f in config.settings_fields(cls)}
    out = {}
    for name, value in flags.items():
        if value is None:
            continue
        f = by_name[name]
        kind = config.field_type(cls, f)
        if kind is dict:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise TwmlError(
                    f"{config.flag_of(f)} must be a JSON object, e.g. '{{\"drop_rate\": 0.1}}' ({err})"
                ) from None
            if not isinstance(value, dict):
                raise TwmlError(f"{config.flag_of(f)} must be a JSON object, e.g. '{{\"drop_rate\": 0.1}}'")
        elif isinstance(value, list):
            item_type = f.metadata["item"] if kind is list else kind
            words = _split(cls, f, value)
            try:
                value = [item_type(v) for v in words]
            except ValueError:
                what = {int: "whole numbers", float: "numbers"}.get(item_type, "values")
                raise TwmlError(f"{config.flag_of(f)} takes {what}, got {', '.join(words)}") from None
            if kind is not list:
                if not value:
                    raise TwmlError(f"{config.flag_of(f)} needs a value")
                value = value[0] if len(value) == 1 else value
        out[name] = value
    return out


def _signature(params: dict[str, tuple[Any, Any]]) -> inspect.Signature:
    return inspect.Signature(
        [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d) for k, (a, d) in params.items()]
    )


def study_command(
    command: str, extra: dict[str, tuple[Any, Any]] | None = None, overrides: Callable[..., dict] | None = None
):
    """Register `fn(settings_list, session)` as `twml COMMAND`: one option per settings field,
    the extra options (turned into settings by `overrides(**extra)`), then the shared ones.
    Resumable commands take --resume RUN_ID."""
    cls = config.COMMANDS[command][0]
    defaults = config.defaults(command)
    resumable = command in config.RESUMABLE

    def register(fn: Callable) -> Callable:
        options = {f.name: _option(cls, f, defaults.get(f.name)) for f in config.settings_fields(cls)}
        params = {**(extra or {}), **options, **SHARED, **({"resume": RESUME} if resumable else {}), **LAUNCH}

        def body(**kwargs):
            shared = {k: kwargs.pop(k) for k in SHARED}
            extras = {k: kwargs.pop(k) for k in (extra or {})}
            resume = kwargs.pop("resume", None)
            for k in LAUNCH:
                kwargs.pop(k)
            preset = config.load_preset(shared["preset"], shared["config_file"])
            given = _parse(cls, kwargs)
            for key, value in (overrides(**extras) if overrides else {}).items():
                if key in given and given[key] != value:
                    raise TwmlError(
                        f"{' '.join(f'--{k}' for k in extras)} and {config.flag_of(config.field_of(cls, key))} disagree"
                    )
                given[key] = value
            if resume:
                from ..studies import runner
                from ..studies.resume import resume_settings

                session = _session(shared, preset)
                runner.execute(command, resume_settings(command, resume, given), session, resume=resume)
                return
            settings_list = config.resolve(command, preset, given)  # bad values end here, before MLflow loads
            for s in settings_list:
                if getattr(s, "dataset", ""):  # "": the data the model was trained on
                    data_names.check(s.dataset)  # and a data set named wrong, before torch loads
            fn(settings_list, _session(shared, preset))

        body.__signature__ = _signature(params)  # type: ignore[attr-defined]  # how Typer reads the options
        body.__annotations__ = {k: a for k, (a, _) in params.items()}
        body.__doc__ = fn.__doc__
        body.__name__ = command
        app.command(name=command)(body)
        return fn

    return register


def _session(shared: dict, preset: config.Preset):
    from .. import tracking
    from ..studies.runner import Session

    tracking.configure(shared["tracking_uri"], shared["system_metrics"], server_wait=shared["server_wait"])
    return Session(experiment=shared["experiment"], preset=preset.name, echo=echo, progress=progress)
