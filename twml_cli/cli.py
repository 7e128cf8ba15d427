"""The `twml` command line: parse, merge the preset, call one study function.

Bad input ends with one line on stderr and exit code 2; Ctrl-C (or SIGTERM) ends the
MLflow run KILLED and exits 130.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import TwmlError

try:  # typer >= 0.24 vendors click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import UsageError

app = typer.Typer(
    name="twml",
    help="Trustworthy-ML studies on timm models, tracked in MLflow: free adversarial training, "
    "randomized smoothing, Neural Cleanse.\n\nEvery command runs on the embedded digits data set "
    "by default, with the defaults of experiments/digits.toml; `--preset cifar10` gives the papers' "
    "setting, and any flag overrides the preset. `twml reproduce` runs everything; `mlflow ui` "
    "browses the runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# ---------------------------------------------------------------- options shared by commands

TRACK, CONFIG, DATA, TRAIN, PGD = "Tracking", "Preset", "Data and model", "Training", "PGD evaluation"

Experiment = Annotated[str, typer.Option(help="MLflow experiment.", rich_help_panel=TRACK)]
TrackingUri = Annotated[
    Optional[str],
    typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).", rich_help_panel=TRACK),
]
Preset = Annotated[Optional[str], typer.Option(help="Preset: digits (the default) or cifar10, or NAME.toml in ./experiments.", rich_help_panel=CONFIG)]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="TOML file read over the default preset.", rich_help_panel=CONFIG)]
Dataset = Annotated[
    Optional[str],
    typer.Option(help="digits, mnist, fashion-mnist, cifar10, cifar100, svhn, gtsrb, or a .npz file.", rich_help_panel=DATA),
]
DataDir = Annotated[Optional[Path], typer.Option(help="Where torchvision data sets are stored (default: ./data).", rich_help_panel=DATA)]
Model = Annotated[Optional[str], typer.Option(help="timm architecture, trained from scratch.", rich_help_panel=DATA)]
ModelKwargs = Annotated[Optional[str], typer.Option(help="JSON keyword arguments for timm.create_model.", rich_help_panel=DATA)]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.", rich_help_panel=DATA)]
Seed = Annotated[Optional[int], typer.Option(help="Seed of every random choice.", rich_help_panel=DATA)]
Epochs = Annotated[Optional[int], typer.Option(help="SGD budget in epochs (free training: ceil(epochs/m) passes).", rich_help_panel=TRAIN)]
BatchSize = Annotated[Optional[int], typer.Option(help="Training batch size.", rich_help_panel=TRAIN)]
Lr = Annotated[Optional[float], typer.Option(help="Peak SGD learning rate.", rich_help_panel=TRAIN)]
Momentum = Annotated[Optional[float], typer.Option(help="SGD (Nesterov) momentum.", rich_help_panel=TRAIN)]
WeightDecay = Annotated[Optional[float], typer.Option(help="SGD weight decay.", rich_help_panel=TRAIN)]
Schedule = Annotated[Optional[str], typer.Option(help="Learning-rate schedule: cosine, step or constant.", rich_help_panel=TRAIN)]
Eps = Annotated[Optional[float], typer.Option(help="L-inf budget in [0, 1] pixel units (free training and PGD).", rich_help_panel=PGD)]
PgdSteps = Annotated[Optional[int], typer.Option(help="PGD iterations.", rich_help_panel=PGD)]
PgdAlpha = Annotated[Optional[float], typer.Option(help="PGD step size (pixel units).", rich_help_panel=PGD)]
PgdRestarts = Annotated[Optional[int], typer.Option(help="PGD random restarts; the most damaging is kept.", rich_help_panel=PGD)]
EvalBatchSize = Annotated[Optional[int], typer.Option(help="Batch size of evaluation and attacks.", rich_help_panel=PGD)]


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


def _execute(command: str, flags: dict, study: Callable, experiment: str, tracking_uri, preset, config_file):
    """Merge preset and flags into the effective config, point MLflow at its store, run."""
    from . import config, studies, tracking

    flags = dict(flags)
    if isinstance(flags.get("model_kwargs"), str):
        try:
            flags["model_kwargs"] = json.loads(flags["model_kwargs"])
        except json.JSONDecodeError as err:
            raise TwmlError(f"--model-kwargs must be a JSON object, e.g. '{{\"drop_rate\": 0.1}}' ({err})") from None
        if not isinstance(flags["model_kwargs"], dict):
            raise TwmlError("--model-kwargs must be a JSON object, e.g. '{\"drop_rate\": 0.1}'")
    if flags.get("data_dir") is not None:
        flags["data_dir"] = str(flags["data_dir"])
    raw, preset_name = config.load(preset, config_file)
    cfg = config.resolve(command, raw, flags)
    tracking.configure(tracking_uri)
    return study(cfg, studies.Context(experiment=experiment, preset=preset_name, echo=echo, progress=progress))


# ---------------------------------------------------------------- commands


@app.command()
def train(
    free: Annotated[bool, typer.Option("--free", help="Free adversarial training (Shafahi et al., 2019).")] = False,
    m: Annotated[Optional[int], typer.Option(help="Free training: replays of each minibatch.", rich_help_panel=TRAIN)] = None,
    eps: Eps = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    schedule: Schedule = None,
    pgd_steps: PgdSteps = None,
    pgd_alpha: PgdAlpha = None,
    pgd_restarts: PgdRestarts = None,
    eval_batch_size: EvalBatchSize = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    model: Model = None,
    model_kwargs: ModelKwargs = None,
    device: Device = None,
    seed: Seed = None,
    preset: Preset = None,
    config_file: ConfigFile = None,
    experiment: Experiment = "twml",
    tracking_uri: TrackingUri = None,
) -> None:
    """Train a model, standard or free adversarial (--free), and attack it with PGD.

    Measures clean accuracy and the success rate of untargeted white-box L-inf PGD on the
    whole test split. Defaults come from the preset (experiments/digits.toml)."""
    from . import studies

    flags = {k: v for k, v in locals().items() if k not in ("free", "preset", "config_file", "experiment", "tracking_uri")}
    _execute("train", flags, lambda cfg, ctx: studies.train(cfg, ctx, free=free), experiment, tracking_uri, preset, config_file)


@app.command()
def attack(
    run: Annotated[str, typer.Option("--run", help="The model: a run id, runs:/<id>/model, or a folder with model.safetensors.")],
    eps: Eps = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="PGD iterations.", rich_help_panel=PGD)] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="PGD step size (pixel units).", rich_help_panel=PGD)] = None,
    restarts: Annotated[Optional[int], typer.Option("--restarts", help="PGD random restarts.", rich_help_panel=PGD)] = None,
    eval_batch_size: EvalBatchSize = None,
    dataset: Annotated[Optional[str], typer.Option(help="Data set (default: the one the model was trained on).", rich_help_panel=DATA)] = None,
    data_dir: DataDir = None,
    device: Device = None,
    seed: Seed = None,
    preset: Preset = None,
    config_file: ConfigFile = None,
    experiment: Experiment = "twml",
    tracking_uri: TrackingUri = None,
) -> None:
    """Re-evaluate a logged model with a stronger PGD (e.g. --steps 50 --restarts 5).

    Logged as a run of its own that names the model's run."""
    from . import studies

    flags = {
        "eps": eps, "pgd_steps": steps, "pgd_alpha": alpha, "pgd_restarts": restarts,
        "eval_batch_size": eval_batch_size, "data_dir": data_dir, "device": device, "seed": seed,
    }  # fmt: skip
    _execute("attack", flags, lambda cfg, ctx: studies.attack(cfg, ctx, run, dataset), experiment, tracking_uri, preset, config_file)


@app.command()
def smooth(
    sigma: Annotated[Optional[list[float]], typer.Option(help="Noise level in pixel units; repeat for several.")] = None,
    n0: Annotated[Optional[int], typer.Option(help="Samples that select the top class.")] = None,
    n: Annotated[Optional[int], typer.Option(help="Fresh samples that estimate its probability.")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Failure probability of each certificate.")] = None,
    num_examples: Annotated[Optional[int], typer.Option(help="Evenly spaced test examples to certify.")] = None,
    certify_batch_size: Annotated[Optional[int], typer.Option(help="Noisy samples per forward pass.")] = None,
    model_run: Annotated[Optional[str], typer.Option(help="Certify this model (run id, runs:/ URI or folder) instead of training one.")] = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    schedule: Schedule = None,
    eval_batch_size: EvalBatchSize = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    model: Model = None,
    model_kwargs: ModelKwargs = None,
    device: Device = None,
    seed: Seed = None,
    preset: Preset = None,
    config_file: ConfigFile = None,
    experiment: Experiment = "twml",
    tracking_uri: TrackingUri = None,
) -> None:
    """Randomized smoothing (Cohen et al., 2019): certified L2 radii for each sigma.

    Trains a base classifier with Gaussian noise at each sigma (or takes --model-run),
    certifies evenly spaced test images, and plots certified accuracy against radius."""
    from . import studies

    flags = {k: v for k, v in locals().items() if k not in ("model_run", "preset", "config_file", "experiment", "tracking_uri")}
    flags["sigma"] = sigma or None
    explicit = dataset if model_run else None
    _execute(
        "smooth", flags, lambda cfg, ctx: studies.smooth(cfg, ctx, model_run, explicit), experiment, tracking_uri, preset, config_file
    )


@app.command()
def backdoor(
    target: Annotated[Optional[int], typer.Option(help="Class the trigger sends images to.")] = None,
    poison_rate: Annotated[Optional[float], typer.Option(help="Fraction of training images poisoned, in (0, 1).")] = None,
    trigger_size: Annotated[Optional[int], typer.Option(help="Side of the square trigger (default: a tenth of the image side, at least 2).")] = None,
    position: Annotated[Optional[str], typer.Option(help="bottom-right, bottom-left, top-right or top-left.")] = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    schedule: Schedule = None,
    eval_batch_size: EvalBatchSize = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    model: Model = None,
    model_kwargs: ModelKwargs = None,
    device: Device = None,
    seed: Seed = None,
    preset: Preset = None,
    config_file: ConfigFile = None,
    experiment: Experiment = "twml",
    tracking_uri: TrackingUri = None,
) -> None:
    """BadNets (Gu et al., 2017): train a backdoored model to inspect with cleanse.

    A white square stamped on a fraction of the training images sends them to the target
    class; logs clean accuracy and attack success rate."""
    from . import studies

    flags = {k: v for k, v in locals().items() if k not in ("preset", "config_file", "experiment", "tracking_uri")}
    _execute("backdoor", flags, studies.backdoor_model, experiment, tracking_uri, preset, config_file)


@app.command()
def cleanse(
    run: Annotated[
        Optional[list[str]],
        typer.Option("--run", help="A model to inspect (run id, runs:/ URI or folder); repeat for several "
                     "(default: the newest standard train run, then the newest backdoor run)."),
    ] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimization rounds (passes over the clean images).")] = None,
    num_images: Annotated[Optional[int], typer.Option(help="Clean training images used.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Clean images per class in one step.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Attack success a reversed trigger must reach.")] = None,
    anomaly_threshold: Annotated[Optional[float], typer.Option(help="Anomaly index above which a class is flagged.")] = None,
    eval_batch_size: EvalBatchSize = None,
    dataset: Annotated[Optional[str], typer.Option(help="Clean data (default: the one the models were trained on).", rich_help_panel=DATA)] = None,
    data_dir: DataDir = None,
    device: Device = None,
    seed: Seed = None,
    preset: Preset = None,
    config_file: ConfigFile = None,
    experiment: Experiment = "twml",
    tracking_uri: TrackingUri = None,
) -> None:
    """Neural Cleanse (Wang et al., 2019): which model is backdoored, toward which class?

    Reverse-engineers a trigger for every class of each model, all classes at once, and
    flags classes whose trigger is abnormally small (MAD anomaly index > 2)."""
    from . import studies

    flags = {k: v for k, v in locals().items() if k not in ("run", "dataset", "preset", "config_file", "experiment", "tracking_uri")}
    _execute(
        "cleanse", flags, lambda cfg, ctx: studies.cleanse_models(cfg, ctx, run, dataset), experiment, tracking_uri, preset, config_file
    )


@app.command()
def report(
    out: Annotated[Path, typer.Option(help="Folder for <experiment>.md, <experiment>.pdf and the figures.")] = Path("reports"),
    experiment: Experiment = "twml",
    tracking_uri: TrackingUri = None,
) -> None:
    """Build the write-up (Markdown and PDF) from the experiment's finished runs.

    Writes <out>/<experiment>.md and .pdf with their figures, and logs them as a run."""
    from . import report as report_module
    from . import tracking

    uri = tracking.configure(tracking_uri)
    files = report_module.build(experiment, out, uri)
    echo(f"Report: {files.markdown} and {files.pdf} (figures in {files.figures}/)")
    echo(f"Run id: {files.run_id}")


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option(help="Folder for the report.")] = Path("reports"),
    data_dir: DataDir = None,
    device: Device = None,
    seed: Seed = None,
    preset: Preset = None,
    config_file: ConfigFile = None,
    experiment: Experiment = "twml",
    tracking_uri: TrackingUri = None,
) -> None:
    """Run the whole write-up: all three studies, then the report.

    Standard and free (m = 4 and 7) training, smoothing at sigma 0.05 and 0.20, a BadNets
    model, Neural Cleanse on the standard and the backdoored model, the report. About a
    minute on a 2-core CPU with the embedded default; `--preset cifar10` is for a GPU."""
    from . import config, studies, tracking

    flags = {"data_dir": str(data_dir) if data_dir else None, "device": device, "seed": seed}
    raw, preset_name = config.load(preset, config_file)
    tracking.configure(tracking_uri)
    ctx = studies.Context(experiment=experiment, preset=preset_name, echo=echo, progress=progress)
    studies.reproduce(raw, flags, ctx, out)


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
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = app(args=argv, prog_name="twml", standalone_mode=False)
    except UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":
            print(err.format_message())
            sys.exit(0)
        command = err.ctx.command_path if err.ctx else "twml"
        fail(f"{command}: error: {err.format_message()} (see '{command} --help')")
    except TwmlError as err:
        fail(f"twml: error: {err}")
    if code == 130:
        fail("twml: interrupted; the MLflow run ended KILLED", 130)
    sys.exit(code if isinstance(code, int) else 0)
