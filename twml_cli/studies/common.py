"""What the studies share: hooks into the caller, the device, data and models, and the Run
protocol a study records to. No MLflow here: a Run is anything with these methods
(tracking.Run logs to MLflow; tests may pass their own)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from .. import data, models, training
from ..errors import TwmlError
from ..examples import InMemory, usual_augmentation
from ..runtime import Progress, no_progress, resolve_device


@dataclass
class Hooks:
    """How compute() reaches its caller without printing or MLflow: a progress wrapper for long
    loops, per-pass training stats as they come, checkpoints to keep, and what an interrupted
    run already did (its last training state, its certified rows). All optional."""

    progress: Progress = no_progress
    on_pass: Callable[[training.EpochStats], None] | None = None
    save_state: Callable[[training.TrainState], None] | None = None
    resume: training.TrainState | None = None
    save_rows: Callable[[dict], None] | None = None  # certification rows so far (rank 0)
    done_rows: dict | None = None  # rows an interrupted certification already wrote
    earlier: list = dataclasses.field(default_factory=list)  # what the earlier cells of a sweep kept (study.sweep_keep)

    def training(self, settings) -> training.Hooks:
        every = settings.checkpoint_every
        return training.Hooks(
            self.progress, self.on_pass, self.save_state if every else None, max(every, 1), self.resume
        )


class Run(Protocol):
    """Where record() writes: an MLflow run (tracking.Run) or anything with these methods."""

    id: str

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None: ...
    def log_series(self, name: str, steps: list[int], values: list[float]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dir(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_model(self, model: models.Classifier, register: str = "") -> None: ...


@contextlib.contextmanager
def artifacts(run: Run) -> Iterator[Path]:
    """A scratch folder whose files become the run's artifacts when the block ends."""
    with tempfile.TemporaryDirectory(prefix="twml-") as tmp:
        yield Path(tmp)
        run.log_dir(tmp)


def device(settings) -> torch.device:
    try:
        return resolve_device(settings.device)
    except ValueError as err:
        raise TwmlError(str(err)) from None


Data = data.DataSet


@functools.lru_cache(maxsize=2)
def _open(name: str, data_dir: str, image_size: int, workers: int) -> Data:
    return data.open_dataset(name, data_dir, image_size, workers)


def load_data(name: str, settings, model: models.Classifier | None = None) -> Data:
    """A data set with its description (cached: a command making several runs loads it once).
    An image folder read for a given model is resized to the model's input size."""
    size = settings.image_size
    if not size and model is not None and data.is_folder(name):
        size = model.spec.input_size[0]
    return _open(name, settings.data_dir, size, settings.workers)


def in_memory(name: str, settings, command: str, model: models.Classifier | None = None) -> data.MemoryDataSet:
    """The data set, for commands that poison or stamp whole sets; an image folder, which streams,
    is refused before it is read (listing a large folder alone takes a while)."""
    if data.is_folder(name):
        raise TwmlError(
            f"twml {command} needs a data set that fits in memory; '{name}' is an image folder, which streams"
        )
    loaded = load_data(name, settings, model)
    return data.MemoryDataSet(cast(InMemory, loaded.train), cast(InMemory, loaded.test), loaded.info)


def with_augmentation(settings, loaded: Data):
    """The settings with `augmentation` resolved for this data set (what is logged)."""
    if not settings.augment:
        policy = "none"
    elif settings.augmentation == "auto":
        policy = usual_augmentation(loaded.info.name, loaded.train.streamed)
    else:
        policy = settings.augmentation
    return dataclasses.replace(settings, augmentation=policy)


def new_model(settings, info: data.DataInfo, dev: torch.device) -> models.Classifier:
    """A freshly initialized model, seeded by the settings' seed."""
    torch.manual_seed(settings.seed)
    spec = models.ModelSpec.for_data(settings.model, info, settings.model_kwargs, settings.stem)
    return models.prepare(models.create_model(spec), dev)


def load_model(uri: str, dev: torch.device) -> models.Classifier:
    """A logged model: a folder, a run id or a runs:/ URI (the last two through MLflow)."""
    from .. import load_model as load

    return load(uri, dev)


def evenly_spaced(n: int, count: int) -> np.ndarray:
    """`count` evenly spaced indices of range(n), the first and the last included (0 or more than
    n: all of them)."""
    count = n if count <= 0 else min(count, n)
    return np.linspace(0, n - 1, count).round().astype(int)


def check_fits(model: models.Classifier, info: data.DataInfo, what: str) -> None:
    spec = model.spec
    if (spec.in_chans, tuple(spec.input_size)) != (
        info.in_chans,
        tuple(info.input_size),
    ) or spec.num_classes < info.num_classes:
        raise TwmlError(
            f"{what} takes {spec.in_chans}x{spec.input_size[0]}x{spec.input_size[1]} images of {spec.num_classes} "
            "classes, "
            f"but data set '{info.name}' has {info.in_chans}x{info.input_size[0]}x{info.input_size[1]} images of "
            f"{info.num_classes}"
        )


def model_source(uri: str) -> dict[str, str]:
    """How a run names the model it used: {'model_run': id} or {'model_path': folder}."""
    if Path(uri).is_dir():
        return {"model_path": str(Path(uri).resolve())}
    run = source_run(uri)
    return {"model_run": uri if run is None else run.info.run_id}  # the whole id, when a prefix was given


def source_run(uri: str):
    """The MLflow run whose model `uri` names; None for a model folder or a models:/ URI."""
    if Path(uri).is_dir() or uri.startswith("models:/"):
        return None
    from .. import tracking

    return tracking.get_run(tracking.run_id_of(uri))


def data_name(explicit: str | None, model: models.Classifier | None, default: str) -> str:
    """The data set a study on a given model uses: the one named, else the model's, else the default."""
    return explicit or (model.spec.dataset if model is not None else None) or default
