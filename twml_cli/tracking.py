"""Everything MLflow: the store, runs and their end states, params, metrics, artifacts,
finding runs and loading their models back.

The store is MLflow's default, `sqlite:///mlflow.db` in the working directory with
artifacts under ./mlruns, unless MLFLOW_TRACKING_URI or --tracking-uri says otherwise.
A run that raises ends FAILED, one interrupted (Ctrl-C, SIGTERM) ends KILLED once the CLI has
handled the interrupt (end_interrupted); none is left RUNNING while the store can be reached.

A tracking server (http, https) is waited for and its refusals explained by tracking_server.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import math
import os
import platform
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import tracking_server
from .config import param_text
from .errors import TwmlError, interrupted
from .results import COMMAND_TAG, MODEL_DIR, run_id_of
from .tracking_server import (
    SERVER_WAIT_S,
    is_server,
    refused,
    retry_within,
    unreachable,
    wait_for_server,
    without_credentials,
)
from .version import __version__

if TYPE_CHECKING:  # torch loads with models: `twml runs` and the report's reading need neither
    from . import models

DEFAULT_URI = "sqlite:///mlflow.db"


_system_metrics = {"on": False}
_open_runs: set[str] = set()  # runs this process has started or reopened and not yet ended
_interrupted_runs: list[tuple[str, str]] = []  # (run, end state) an interrupt stopped, not yet ended


def configure(
    tracking_uri: str | None = None,
    system_metrics: bool = False,
    create: bool = True,
    server_wait: float = SERVER_WAIT_S,
) -> str:
    """Point MLflow at --tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db, and make
    sure the store is usable (see open_store). system_metrics: every run records CPU, memory
    and GPU use (MLflow's monitor; the optional extra twml_cli[system]). create=False: a
    SQLite store that does not exist yet is an error, not a new empty store (twml report
    reads runs and must not leave an empty database behind). server_wait: seconds a tracking
    server that does not answer is waited for, now and on each request of the runs to come."""
    if system_metrics:
        try:
            import psutil  # noqa: F401
        except ImportError:
            raise TwmlError(
                "--system-metrics needs psutil (and nvidia-ml-py for GPUs): pip install 'twml_cli[system]'"
            ) from None
    _system_metrics["on"] = system_metrics
    if not (server_wait > 0 and math.isfinite(server_wait)):
        raise TwmlError(f"--server-wait must be a number of seconds > 0, got {server_wait:g}")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = without_credentials(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
    if not create and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TwmlError(f"no tracking store at {uri}: run `twml reproduce` or a study first, or pass --tracking-uri")
    mlflow.set_tracking_uri(uri)
    if is_server(uri):
        retry_within(server_wait)
        wait_for_server(uri, server_wait)
    open_store(uri)
    return uri


def open_store(uri: str) -> None:
    """Touch the store once, before any work. A SQLite store is created and migrated under an
    exclusive lock on <db>.lock: MLflow's schema migration is not safe when several processes
    open a new store at once (it can leave the database unreadable), so they take turns.
    An unusable store (no such folder, no server, a file that is not a database) is a
    TwmlError naming it."""
    try:
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            if not db.parent.is_dir():
                raise TwmlError(f"cannot use the tracking store {uri}: folder '{db.parent}' does not exist")
            with open(db.with_name(db.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                MlflowClient(uri).search_experiments(max_results=1)
        else:
            MlflowClient(uri).search_experiments(max_results=1)
    except TwmlError:
        raise
    except Exception as err:  # noqa: BLE001 - MLflow, SQLAlchemy, HTTP and OS errors all mean the same here
        raise TwmlError(refused(err, uri) or f"cannot use the tracking store {uri}: {_first_line(err)}") from None


def store_error(err: BaseException) -> TwmlError | None:
    """A TwmlError for an error raised by the tracking store (MLflow, its database or server),
    None for anything else. A server's refusal (401, 403) or absence says so in plain words."""
    module = type(err).__module__.split(".")[0]
    if not (isinstance(err, MlflowException) or module in ("sqlalchemy", "alembic", "requests", "urllib3")):
        return None
    uri = tracking_uri()
    return TwmlError(refused(err, uri) or f"tracking store {uri}: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def client() -> MlflowClient:
    return MlflowClient()


def experiment_id(name: str, create: bool = True) -> str | None:
    """The id of experiment `name`, created if missing (safe when several processes race)."""
    tracking_server.context["experiment"] = name
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is None and create:
        try:
            return c.create_experiment(name)
        except MlflowException:  # another process created it first
            exp = c.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise TwmlError(f"experiment '{name}' is deleted; restore it in mlflow ui or choose another --experiment")
    return exp.experiment_id if exp else None


def environment_params(device: str, threads: int, eval_threads: int) -> dict[str, str]:
    import timm
    import torch

    return {
        "twml_version": __version__,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": platform.python_version(),
        "device": device,
        # CPU figures depend on them: repeat a run with --threads and --eval-threads
        "threads": str(threads),
        "eval_threads": str(eval_threads),
    }


HOST_TAG, PID_TAG, HEARTBEAT_TAG, RESUMED_TAG = "twml.host", "twml.pid", "twml.heartbeat", "twml.resumed"


class Run:
    """A live MLflow run; every method logs to it."""

    def __init__(self, run_id: str):
        self.id = run_id
        self._client = client()
        self._steps: dict[str, set[int]] = {}  # series steps already logged (a step is logged once)
        self.model_id: str | None = None  # the LoggedModel this run made, once it made one

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, param_text(v)) for k, v in params.items() if v is not None]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Metrics of the run (and of its LoggedModel, once it has one: the Models tab shows them)."""
        now = int(time.time() * 1000)
        self._log_metrics([Metric(k, float(v), now, step, model_id=self.model_id) for k, v in metrics.items()])

    def log_series(self, name: str, steps: list[int], values: list[float]) -> None:
        """One metric over steps (e.g. per-epoch loss with step = epoch); a step this run
        already holds (logged live, or before an interruption) is not logged again."""
        if name not in self._steps:
            self._steps[name] = {m.step for m in self._client.get_metric_history(self.id, name)}
        fresh = [(int(s), float(v)) for s, v in zip(steps, values) if int(s) not in self._steps[name]]
        now = int(time.time() * 1000)
        self._log_metrics([Metric(name, v, now, s) for s, v in fresh])
        self._steps[name].update(s for s, _ in fresh)

    def heartbeat(self) -> None:
        """When this run last showed signs of life (see `status_of`)."""
        self.set_tags({HEARTBEAT_TAG: str(int(time.time()))})

    def _log_metrics(self, items: list[Metric]) -> None:
        for i in range(0, len(items), 500):  # MLflow's per-batch limit is 1000
            self._client.log_batch(self.id, metrics=items[i : i + 500])

    def set_tags(self, tags: dict[str, str]) -> None:
        self._client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.id, str(path), artifact_path)

    def log_dir(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifacts(self.id, str(path), artifact_path)

    def log_json(self, obj: Any, name: str) -> None:
        self._client.log_text(self.id, json.dumps(obj, indent=2, default=str), name)

    def log_text(self, text: str, name: str) -> None:
        self._client.log_text(self.id, text, name)

    def log_model(self, model: models.Classifier, register: str = "") -> None:
        """The model as an MLflow LoggedModel named 'model' of this run (the Models tab; its files,
        model.safetensors and spec.json, never a pickle, live with the LoggedModel, not among
        the run's artifacts; `runs:/<id>/model` and the run id still find it, see
        download_model). Metrics logged afterwards are linked to it. `register`: also a new
        version of that registered model (`models:/NAME/VERSION`)."""
        spec = model.spec
        exp = self._client.get_run(self.id).info.experiment_id
        params = {
            "arch": spec.arch,
            "num_classes": spec.num_classes,
            "input": "x".join(map(str, (spec.in_chans, *spec.input_size))),
            "dataset": spec.dataset,
            "small_input_stem": spec.small_input_stem,
            "model_kwargs": json.dumps(spec.model_kwargs),
        }
        logged = self._client.create_logged_model(
            exp,
            name=MODEL_DIR,
            source_run_id=self.id,
            model_type="twml-safetensors",
            params={k: str(v) for k, v in params.items()},
        )
        from . import models

        with tempfile.TemporaryDirectory() as tmp:
            models.save_model(model, tmp)
            self._client.log_model_artifacts(logged.model_id, tmp)
        self._client.finalize_logged_model(logged.model_id, "READY")
        self.model_id = logged.model_id
        if register:
            version = mlflow.register_model(f"models:/{logged.model_id}", register)
            self.set_tags({"twml.registered": f"models:/{register}/{version.version}"})

    def log_datasets(self, datasets: list[dict]) -> None:
        """Data sets as MLflow inputs: each {name, digest, source, profile, context}."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    d["name"], d["digest"], "twml", json.dumps({"uri": d["source"]}), profile=json.dumps(d["profile"])
                ),
                [InputTag("mlflow.data.context", d["context"])],
            )
            for d in datasets
        ]
        self._client.log_inputs(self.id, datasets=inputs)


@contextlib.contextmanager
def start_run(
    experiment: str, command: str, run_name: str | None = None, tags: dict | None = None, parent: str | None = None
) -> Iterator[Run]:
    """A run tagged twml.command=<command>. It ends FINISHED, or FAILED if the block raises;
    interrupted (Ctrl-C; the CLI turns SIGTERM into one too), end_interrupted() ends it KILLED."""
    c = client()
    life = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), HEARTBEAT_TAG: str(int(time.time()))}
    nested = {"mlflow.parentRunId": parent} if parent else {}
    exp = experiment_id(experiment)
    assert exp is not None  # created when missing
    info = c.create_run(exp, run_name=run_name, tags={COMMAND_TAG: command, **life, **nested, **(tags or {})}).info
    with _terminating(info.run_id):
        yield Run(info.run_id)


@contextlib.contextmanager
def reopen_run(run_id: str) -> Iterator[Run]:
    """An interrupted run, RUNNING again in this process; it ends as start_run's do."""
    c = client()
    previous = int(get_run(run_id).data.tags.get(RESUMED_TAG, "0"))
    c.update_run(run_id, status="RUNNING")
    run = Run(run_id)
    run.set_tags({HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), RESUMED_TAG: str(previous + 1)})
    run.heartbeat()
    with _terminating(run_id):
        yield run


def open_runs() -> set[str]:
    """The runs this process has open (started or reopened, not yet ended)."""
    return set(_open_runs)


def pending_runs() -> set[str]:
    """The runs not yet ended: open, or stopped by an interrupt and waiting for end_interrupted()."""
    return set(_open_runs) | {run_id for run_id, _ in _interrupted_runs}


@contextlib.contextmanager
def _terminating(run_id: str) -> Iterator[None]:
    c = client()
    _open_runs.add(run_id)
    monitor = _system_monitor(run_id) if _system_metrics["on"] else None
    finished = False
    try:
        yield
        finished = True
        c.set_terminated(run_id, "FINISHED")
    except BaseException as err:
        if interrupted(err):
            # ended by end_interrupted(), once the interrupt is gone; FINISHED if its work was done
            _interrupted_runs.append((run_id, "FINISHED" if finished else "KILLED"))
        elif not finished and not unreachable(err, tracking_uri()):
            # (a server that stopped answering cannot be told; `twml runs` shows the run stale)
            c.set_terminated(run_id, "FAILED")
        raise
    finally:
        _open_runs.discard(run_id)
        if monitor is not None:
            monitor.finish()


def end_interrupted() -> list[str]:
    """End the runs an interrupt (Ctrl-C, SIGTERM) stopped: KILLED, or FINISHED where only the
    writing of their end was interrupted. Their end states, innermost run first.

    Called once the interrupt has been handled, not while it unwinds: a Ctrl-C that lands while
    a store query's rows are read leaves the query's statement open, and on an sqlite store an
    open statement keeps its read lock, even once its connection is closed, for as long as the
    interrupt's traceback keeps the frames that hold it. Ending the run there waited for the
    lock, failed ("database is locked") and left the run RUNNING. Once the traceback is gone,
    collecting its reference cycles finalizes the statement."""
    gc.collect()
    ended = []
    while _interrupted_runs:
        run_id, status = _interrupted_runs[0]  # a child before its parent; pending until ended
        try:
            client().set_terminated(run_id, status)
        except Exception as err:
            _interrupted_runs.clear()  # left to `twml runs`; the next command starts afresh
            store = store_error(err)
            if store is None:
                raise
            raise TwmlError(f"interrupted, and the run could not be ended: {store} (`twml runs` lists it)") from None
        _interrupted_runs.pop(0)
        ended.append(status)
    return ended


def _system_monitor(run_id: str):
    """MLflow's system-metrics monitor for `run_id`, started. MLflow's own logs a sample only
    once a sampling interval (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, 10 s) has passed, so a
    shorter run would get none; this one logs, at the end of such a run, one sample covering
    the whole run (psutil's CPU use since the sample taken at the start)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        published = False

        def publish_metrics(self, metrics):
            super().publish_metrics(metrics)
            self.published = True

        def finish(self):
            super().finish()  # stops and joins the sampling thread
            if self.published:
                return
            try:
                for m in self.monitors:
                    m.clear_metrics()
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()
            except Exception as err:  # as MLflow's own: a lost sample never fails the run
                logging.getLogger(__name__).warning("system metrics not logged: %s", err)

    monitor = Monitor(run_id, resume_logging=True)
    monitor.start()
    return monitor


# ---------------------------------------------------------------- reading runs back


def get_run(run_id: str):
    """The MLflow run `run_id`, or the one run whose id starts with it (as the report prints
    ids, 8 characters); TwmlError when there is none, or more than one."""
    try:
        return client().get_run(run_id)
    except MlflowException:
        pass
    text = run_id.lower()
    if 4 <= len(text) < 32 and all(c in "0123456789abcdef" for c in text):
        experiments = [e.experiment_id for e in client().search_experiments()]
        found = (
            [r for r in client().search_runs(experiments, max_results=50_000) if r.info.run_id.startswith(text)]
            if experiments
            else []
        )
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(f"{r.info.run_id} ({r.data.tags.get(COMMAND_TAG, '?')})" for r in found[:5])
            raise TwmlError(f"run id '{run_id}' is ambiguous: it starts {len(found)} runs ({names}); give more of it")
    raise TwmlError(f"no run '{run_id}' in the tracking store {tracking_uri()}") from None


def find_runs(experiment: str, command: str, status: str = "FINISHED") -> list:
    """Runs of `command` in `experiment`, newest first."""
    exp = experiment_id(experiment, create=False)
    if exp is None:
        return []
    return client().search_runs(
        [exp],
        filter_string=f"tags.`{COMMAND_TAG}` = '{command}' and attributes.status = '{status}'",
        order_by=["attributes.start_time DESC"],
        max_results=10_000,
    )


def download_model(uri: str) -> str:
    """A local folder holding a logged model: a run id, runs:/<id>/model, or a registry URI
    (models:/NAME/VERSION, models:/NAME@ALIAS, models:/<model id>)."""
    if uri.startswith("models:/"):
        try:
            return mlflow.artifacts.download_artifacts(artifact_uri=uri)
        except (MlflowException, OSError) as err:
            raise TwmlError(f"no model '{uri}' in {tracking_uri()} ({_first_line(err)})") from None
    run_id = run_id_of(uri)
    if not run_id:
        raise TwmlError(f"'{uri}' names no run")
    run = get_run(run_id)
    run_id = run.info.run_id  # the whole id, when a prefix was given
    artifact_path = uri.split("/", 2)[2] if uri.startswith("runs:/") and uri.count("/") >= 2 else MODEL_DIR
    try:
        model_id = logged_model_of(run, artifact_path)
        if model_id is not None:
            return mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}")
        return mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path
        )  # files in the run itself
    except (MlflowException, OSError):
        params = run.data.params
        if params.get("mitigation") == "filter":  # the filter holds no model: it serves the one it acted on
            source = params.get("model_run") or params.get("model_path") or "?"
            raise TwmlError(
                f"run '{run_id}' is an input filter (twml mitigate --mitigation filter) and holds no model: the model "
                f"it filters is that of {source}, unchanged"
            ) from None
        raise TwmlError(f"run '{run_id}' holds no model under '{artifact_path}'") from None


def logged_model_of(run, name: str = MODEL_DIR) -> str | None:
    """The id of the newest finished LoggedModel `name` that `run` produced, if any (a run
    killed while logging one leaves it PENDING; a resumed run logs it again)."""
    found = client().search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'"
    )
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None


def load_model(uri: str, device="cpu") -> models.Classifier:
    """The model a run logged (a run id or runs:/<id>/model), in eval mode."""
    from . import models

    return models.load_model_dir(download_model(uri), device)


def final_metrics(run_id: str) -> dict[str, float]:
    """A run's metrics, each at its last logged step."""
    return dict(get_run(run_id).data.metrics)


def artifact_uri(run_id: str) -> str:
    """Where a run's artifacts are (a local folder for the default store)."""
    return get_run(run_id).info.artifact_uri.removeprefix("file://")


def download_artifact(run_id: str, path: str) -> str | None:
    """A local copy of one artifact of a run, or None when the run has no such file."""
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    except (MlflowException, OSError):
        return None


# ---------------------------------------------------------------- live, interrupted, done

STALE_S = 15 * 60  # a RUNNING run from another machine silent this long is reported as stale


def status_of(run) -> str:
    """FINISHED, FAILED, KILLED, or for a RUNNING run: 'running' (its process is alive),
    'interrupted' (its process on this machine is gone: SIGKILL, a crash, a lost node) or
    'stale' (on another machine, no heartbeat for STALE_S seconds)."""
    if run.info.status != "RUNNING":
        return run.info.status
    tags = run.data.tags
    if tags.get(HOST_TAG) == socket.gethostname() and tags.get(PID_TAG, "").isdigit():
        return "running" if _alive(int(tags[PID_TAG])) else "interrupted"
    beat = int(tags.get(HEARTBEAT_TAG, "0") or 0)
    return "stale" if time.time() - beat > STALE_S else "running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_runs(experiment: str) -> list:
    """Every run of the experiment, newest first."""
    exp = experiment_id(experiment, create=False)
    if exp is None:
        return []
    return client().search_runs([exp], order_by=["attributes.start_time DESC"], max_results=10_000)
