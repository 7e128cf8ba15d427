"""The `twml` command line: parse, resolve typed settings, run a study.

Every study command's options are built from its settings class (config.py): one field is
one flag, with its help text, panel and default. The options every command shares
(preset, tracking) are declared once below. Bad input ends with one line on stderr and
exit code 2; Ctrl-C (or SIGTERM) ends the MLflow run KILLED and exits 130.
"""

from __future__ import annotations

import inspect
import json
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import config
from .errors import TwmlError
from .version import __version__

try:  # typer >= 0.24 vendors click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import UsageError

app = typer.Typer(
    name="twml",
    help="Trustworthy-ML studies on timm models, tracked in MLflow: free adversarial training, "
    "randomized smoothing, Neural Cleanse.\n\nEvery command runs on the embedded digits data set "
    "by default; `--preset cifar10` gives the papers' setting, and any flag overrides the preset "
    "(`twml config COMMAND` prints the effective settings). `twml reproduce` runs everything; "
    "`mlflow ui` browses the runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# ---------------------------------------------------------------- options every command shares

TRACK, PRESET = "Tracking", "Preset"
PresetOption = Annotated[Optional[str], typer.Option(help="Preset: digits (the default) or cifar10, or NAME.toml in ./experiments.", rich_help_panel=PRESET)]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="TOML file read over the default preset.", rich_help_panel=PRESET)]
ExperimentOption = Annotated[str, typer.Option(help="MLflow experiment.", rich_help_panel=TRACK)]
TrackingUriOption = Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).", rich_help_panel=TRACK)]
SHARED: dict[str, tuple[Any, Any]] = {  # name: (annotation, default)
    "preset": (PresetOption, None),
    "config_file": (ConfigOption, None),
    "experiment": (ExperimentOption, "twml"),
    "tracking_uri": (TrackingUriOption, None),
}
PROCS = "Processes (torch.distributed.run)"
LAUNCH: dict[str, tuple[Any, Any]] = {  # consumed by launch.py before the command runs; declared here for --help
    "nproc_per_node": (Annotated[Optional[int], typer.Option(help="Run on this many processes per machine (DDP; NCCL on CUDA, gloo on CPU).", rich_help_panel=PROCS)], None),
    "nnodes": (Annotated[Optional[int], typer.Option(help="Machines taking part (default 1).", rich_help_panel=PROCS)], None),
    "node_rank": (Annotated[Optional[int], typer.Option(help="This machine's index, 0 to nnodes-1.", rich_help_panel=PROCS)], None),
    "rdzv_endpoint": (Annotated[Optional[str], typer.Option(help="HOST:PORT of machine 0, the same on every machine.", rich_help_panel=PROCS)], None),
}  # fmt: skip
RESUME = (Annotated[Optional[str], typer.Option(help="Continue this interrupted run (its id) from its last checkpoint, in place.", rich_help_panel=TRACK)], None)
OUT = (Annotated[Path, typer.Option(help="Folder for <experiment>.md, <experiment>.pdf and the figures.")], Path("reports"))


def _option(cls: type, f, default: Any) -> tuple[Any, Any]:
    """The Typer option of a settings field: (annotation, None). Lists and JSON go in as text."""
    kind = config.field_type(cls, f)
    text = f.metadata["help"]
    if f.metadata["choices"]:
        text += f" One of: {', '.join(f.metadata['choices'])}."
    if f.name == "dataset" and getattr(cls, "DATA_FROM_MODEL", False):
        text += "  [default: the one the model was trained on]"
    elif default not in ("", [], {}, None):
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) if isinstance(default, list) else default
        text += f"  [default: {shown}]"
    cli_type = {int: int, float: float, bool: bool, str: str, dict: str, list: list[str]}[kind]
    if f.metadata["each"]:
        cli_type = list[str]  # repeat the flag, or give a comma-separated list
    metavar = "" if kind is bool else f"<{kind.__name__ if kind in (int, float) else 'str'}>"  # one value a flag; lists repeat it
    flag = config.flag_of(f)
    names = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    option = typer.Option(*names, help=text, rich_help_panel=config.panel_of(cls, f.name), show_default=False, metavar=metavar)
    return Annotated[Optional[cli_type], option], None


def _parse(cls: type, flags: dict[str, Any]) -> dict[str, Any]:
    """Flag values as settings values: JSON objects, comma-separated lists."""
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
                raise TwmlError(f"{config.flag_of(f)} must be a JSON object, e.g. '{{\"drop_rate\": 0.1}}' ({err})") from None
            if not isinstance(value, dict):
                raise TwmlError(f"{config.flag_of(f)} must be a JSON object, e.g. '{{\"drop_rate\": 0.1}}'")
        elif f.metadata["each"]:
            try:
                value = [kind(v) for item in value for v in item.split(",") if v.strip()]
            except ValueError:
                raise TwmlError(f"{config.flag_of(f)} takes numbers, got {', '.join(value)}") from None
        out[name] = value
    return out


def _signature(params: dict[str, tuple[Any, Any]]) -> inspect.Signature:
    return inspect.Signature([inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d) for k, (a, d) in params.items()])


def study_command(command: str, extra: dict[str, tuple[Any, Any]] | None = None, overrides: Callable[..., dict] | None = None):
    """Register `fn(settings_list, session)` as `twml COMMAND`: one option per settings field,
    the extra options (turned into settings by `overrides(**extra)`), then the shared ones.
    Resumable commands take --resume RUN_ID."""
    from .studies.runner import RESUMABLE

    cls = config.COMMANDS[command][0]
    defaults = config.defaults(command)
    resumable = command in RESUMABLE

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
                    raise TwmlError(f"{' '.join(f'--{k}' for k in extras)} and {config.flag_of(config.field_of(cls, key))} disagree")
                given[key] = value
            session = _session(shared, preset)
            if resume:
                from .studies import runner

                runner.execute(command, runner.resume_settings(command, resume, given), session, resume=resume)
                return
            fn(config.resolve(command, preset, given), session)

        body.__signature__ = _signature(params)
        body.__annotations__ = {k: a for k, (a, _) in params.items()}
        body.__doc__ = fn.__doc__
        body.__name__ = command
        app.command(name=command)(body)
        return fn

    return register


def _session(shared: dict, preset: config.Preset):
    from . import tracking
    from .studies.runner import Session

    tracking.configure(shared["tracking_uri"])
    return Session(experiment=shared["experiment"], preset=preset.name, echo=echo, progress=progress)


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise), without importing torch."""
    import os

    return int(os.environ.get("RANK", 0))


# ---------------------------------------------------------------- console


def echo(text: str) -> None:
    print(text, flush=True)


def progress(items: Iterable, total: int, desc: str) -> Iterable:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(desc, total=total)
        for item in items:
            yield item
            bar.advance(task)


# ---------------------------------------------------------------- commands

FREE = (Annotated[bool, typer.Option("--free", help="Free adversarial training (Shafahi et al., 2019): `--method free`.", rich_help_panel="Training")], False)


@study_command("train", extra={"free": FREE}, overrides=lambda free: {"method": "free"} if free else {})
def train(settings_list, session) -> None:
    """Train a model, standard or free adversarial (--free), and attack it with PGD.

    Measures clean accuracy and the success rate of untargeted white-box L-inf PGD on the
    whole test split."""
    from .studies import runner

    runner.execute_all("train", settings_list, session)


@study_command("attack")
def attack(settings_list, session) -> None:
    """Re-evaluate a logged model with a stronger PGD (e.g. --pgd-steps 50 --pgd-restarts 5).

    Logged as a run of its own that names the model's run. The data set is the model's own
    unless --dataset says otherwise."""
    from .studies import runner

    runner.execute_all("attack", settings_list, session)


@study_command("smooth")
def smooth(settings_list, session) -> None:
    """Randomized smoothing (Cohen et al., 2019): certified L2 radii for each sigma.

    Trains a base classifier with Gaussian noise at each sigma (or takes the model --run
    names), certifies evenly spaced test images, and plots certified accuracy against radius."""
    from .studies import runner

    runner.execute_all("smooth", settings_list, session)


@study_command("backdoor")
def backdoor(settings_list, session) -> None:
    """BadNets (Gu et al., 2017): train a backdoored model to inspect with cleanse.

    A white square stamped on a fraction of the training images sends them to the target
    class; logs clean accuracy and attack success rate."""
    from .studies import runner

    runner.execute_all("backdoor", settings_list, session)


@study_command("cleanse")
def cleanse(settings_list, session) -> None:
    """Neural Cleanse (Wang et al., 2019): which model is backdoored, toward which class?

    Reverse-engineers a trigger for every class of each model, all classes at once, and
    flags classes whose trigger is abnormally small (MAD anomaly index > 2)."""
    import dataclasses

    from .studies import runner

    (settings,) = settings_list
    if not settings.model_runs:
        settings = dataclasses.replace(settings, model_runs=runner.default_cleanse_runs(session.experiment))
    runner.execute("cleanse", settings, session)


def _report(out: Path = OUT[1], **shared) -> None:
    """Build the write-up (Markdown and PDF) from the experiment's finished runs.

    Writes <out>/<experiment>.md and .pdf with their figures, and logs them as a run."""
    from . import report as report_module
    from . import tracking

    uri = tracking.configure(shared["tracking_uri"])
    files = report_module.build(shared["experiment"], out, uri)
    echo(f"Report: {files.markdown} and {files.pdf} (figures in {files.figures}/)")
    echo(f"Run id: {files.run_id}")


_REPORT_PARAMS = {"out": OUT, **{k: SHARED[k] for k in ("experiment", "tracking_uri")}}
_report.__signature__ = _signature(_REPORT_PARAMS)
_report.__annotations__ = {k: a for k, (a, _) in _REPORT_PARAMS.items()}
app.command(name="report")(_report)


def _reproduce(out: Path = OUT[1], **kwargs) -> None:
    """Run the whole write-up: all three studies, then the report.

    Standard and free (m = 4 and 7) training, smoothing at sigma 0.05 and 0.20, a BadNets
    model, Neural Cleanse on the standard and the backdoored model, the report. A few minutes
    on a 2-core CPU with the embedded default; `--preset cifar10` is for a GPU."""
    from .studies import runner

    shared = {k: kwargs.pop(k) for k in SHARED}
    for k in LAUNCH:
        kwargs.pop(k)
    preset = config.load_preset(shared["preset"], shared["config_file"])
    overrides = _parse(config.Common, kwargs)
    runner.reproduce(preset, overrides, _session(shared, preset), out)


_COMMON = {f.name: f for f in config.settings_fields(config.Common)}
_REPRODUCE_PARAMS = {"out": OUT, **{k: _option(config.Common, _COMMON[k], None) for k in ("data_dir", "device", "seed")}, **SHARED, **LAUNCH}
_reproduce.__signature__ = _signature(_REPRODUCE_PARAMS)
_reproduce.__annotations__ = {k: a for k, (a, _) in _REPRODUCE_PARAMS.items()}
app.command(name="reproduce")(_reproduce)


@app.command(name="runs")
def runs(experiment: ExperimentOption = "twml", tracking_uri: TrackingUriOption = None) -> None:
    """List the experiment's runs, newest first: which finished, which are running, which were
    interrupted (killed, crashed) and the command that resumes them."""
    from . import results, tracking

    tracking.configure(tracking_uri)
    listed = tracking.list_runs(experiment)
    if not listed:
        raise TwmlError(f"experiment '{experiment}' has no runs in {tracking.tracking_uri()}")
    echo(f"{'status':<12} {'command':<9} {'run name':<22} {'started (UTC)':<20} run id")
    from datetime import datetime, timezone

    for r in listed:
        status = tracking.status_of(r)
        command = r.data.tags.get(results.COMMAND_TAG, "")
        started = datetime.fromtimestamp(r.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{status:<12} {command:<9} {(r.info.run_name or '')[:22]:<22} {started:<20} {r.info.run_id}"
        if status in ("interrupted", "stale") and command in ("train", "smooth", "backdoor"):
            line += f"   resume: twml {command} --resume {r.info.run_id}"
        echo(line)


@app.command(name="config")
def show_config(
    command: Annotated[str, typer.Argument(help="train, attack, smooth, backdoor or cleanse.")],
    preset: PresetOption = None,
    config_file: ConfigOption = None,
) -> None:
    """Print the effective settings of a command (defaults, then the preset) as TOML."""
    if command not in config.COMMANDS:
        raise TwmlError(f"unknown command '{command}': use one of {', '.join(config.COMMANDS)}")
    chosen = config.load_preset(preset, config_file)
    for i, settings in enumerate(config.resolve(command, chosen)):
        echo(f"{'' if i == 0 else chr(10)}# twml {command}, preset {chosen.name}")
        echo(config.to_toml(settings))


def _version(value: bool) -> None:
    if value:
        print(f"twml {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    pass


# ---------------------------------------------------------------- entry point


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def fail(message: str, code: int = 2) -> None:
    if _rank() == 0:  # under torchrun every process fails alike; one says so
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    from . import launch

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        launched = launch.main(argv)
        argv = launch.split(argv)[1]
    except ValueError as err:
        fail(f"twml: error: {err}")
    if launched is not None:
        sys.exit(launched)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if "WORLD_SIZE" in __import__("os").environ:
            from .runtime import init_distributed

            init_distributed()
        code = app(args=argv, prog_name="twml", standalone_mode=False)
    except UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":
            print(err.format_message())
            sys.exit(0)
        command = err.ctx.command_path if err.ctx else "twml"
        fail(f"{command}: error: {err.format_message()} (see '{command} --help')")
    except TwmlError as err:
        fail(f"twml: error: {err}")
    except Exception as err:
        tracking = sys.modules.get("twml_cli.tracking")
        store = tracking.store_error(err) if tracking else None
        if store is None:
            raise
        fail(f"twml: error: {store}")
    if code == 130:
        fail("twml: interrupted; the MLflow run ended KILLED", 130)
    sys.exit(code if isinstance(code, int) else 0)
