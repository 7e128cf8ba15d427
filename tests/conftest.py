"""Shared fixtures: the embedded data set, a private MLflow store with an in-process CLI
runner, and one `twml reproduce` on the embedded default that several test modules read."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
# Two threads per test, fewer where pytest-xdist's workers share the cores: a worker whose
# OpenMP threads wait for a core the other worker holds runs several times slower.
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))))


# fixtures that run whole twml commands (or start servers, or kill runs)
E2E_FIXTURES = {"cli", "bare_cli", "module_cli", "reproduced", "killed_and_resumed", "server"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Mark `e2e` every test that runs whole commands (through one of E2E_FIXTURES, or a
    subprocess of its own, marked by hand): `pytest -m "not e2e"` is the fast tier.

    The suite runs on two workers (pytest-xdist, `-n 2 --dist loadgroup`): most tests use one
    core. Each test goes to its module's worker, so a module-scoped fixture is made once, and
    every test that reads `twml reproduce` to one worker, so that runs once."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if E2E_FIXTURES & fixtures:
            item.add_marker(pytest.mark.e2e)
        item.add_marker(pytest.mark.xdist_group("reproduce" if "reproduced" in fixtures else item.module.__name__))


@pytest.fixture(scope="session")
def digits():
    """The embedded data set: .train, .test (examples.InMemory: .x, .y, .tensors) and .info."""
    from twml_cli.data import open_dataset

    return open_dataset("digits")


@dataclass
class Result:
    code: int
    out: str
    err: str


class Cli:
    """Runs `twml ...` in-process against the MLflow store in `path` (its cwd while it runs)."""

    def __init__(self, path: Path):
        self.path = path
        self.uri = f"sqlite:///{path / 'mlflow.db'}"

    def __call__(self, *args: str) -> Result:
        from twml_cli.cli import main

        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(self.path)  # ./mlruns, ./data and ./reports land in the test's folder
            mp.setenv("MLFLOW_TRACKING_URI", self.uri)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(list(args))
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
        return Result(code, out.getvalue(), err.getvalue())

    def client(self):
        from mlflow.tracking import MlflowClient

        from twml_cli.tracking import open_store

        open_store(self.uri)  # as twml does: a new store is made by one process at a time
        return MlflowClient(self.uri)

    def runs(self, command: str | None = None, status: str | None = None, experiment: str = "twml"):
        if self.uri.startswith("sqlite:///") and not (self.path / "mlflow.db").exists():
            return []  # no store, no runs (and no store made by looking)
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
        return [
            r
            for r in runs
            if (command is None or r.data.tags.get("twml.command") == command)
            and (status is None or r.info.status == status)
        ]

    def artifacts(self, run) -> set[str]:
        """Every artifact path of a run, recursively."""
        client, found, todo = self.client(), set(), [None]
        while todo:
            for f in client.list_artifacts(run.info.run_id, todo.pop()):
                (todo.append(f.path) if f.is_dir else found.add(f.path))
        return found

    def download(self, run, path: str) -> str:
        return self.client().download_artifacts(run.info.run_id, path)

    def logged_model(self, run):
        """The READY LoggedModel 'model' the run produced, or None."""
        from mlflow.entities import LoggedModelStatus

        found = self.client().search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}' AND name = 'model'"
        )
        ready = [m for m in found if m.status == LoggedModelStatus.READY]
        assert len(ready) <= 1, "one model per run"
        return ready[0] if ready else None

    def model_files(self, run) -> set[str]:
        """The files of the run's LoggedModel (empty when it logged none)."""
        model = self.logged_model(run)
        return {f.path for f in self.client().list_logged_model_artifacts(model.model_id)} if model else set()

    def model_weights(self, run) -> str:
        """A local copy of the run's model.safetensors."""
        import mlflow.artifacts

        self.use()  # models:/ is resolved in the process's store, whatever tracking_uri= says
        folder = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{self.logged_model(run).model_id}")
        return str(Path(folder) / "model.safetensors")

    def use(self):
        """Point this process's MLflow at the store (what --tracking-uri does in the CLI)."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty MLflow store (mlflow.db), made and migrated once per worker: MLflow's schema
    migration takes 2 to 7 s a store on 2 cores, and `cli` starts from a copy instead."""
    store = Cli(tmp_path_factory.mktemp("empty-store"))
    store.client()
    return store.path / "mlflow.db"


@pytest.fixture
def cli(tmp_path, empty_store):
    """twml with an empty store of its own in tmp_path (a copy of empty_store)."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return Cli(tmp_path)


@pytest.fixture
def bare_cli(tmp_path):
    """twml in an empty folder: no store until a command makes one."""
    return Cli(tmp_path)


@pytest.fixture(scope="module")
def module_cli(tmp_path_factory):
    return Cli(tmp_path_factory.mktemp("store"))


@dataclass
class Reproduced:
    """`twml reproduce` on the embedded default, and its runs by role."""

    cli: Cli
    result: Result
    standard: object
    free4: object
    free7: object
    smooth: dict  # sigma -> run
    backdoor: object
    cleanse: object
    report: object


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Reproduced:
    cli = Cli(tmp_path_factory.mktemp("reproduce"))
    result = cli("reproduce")
    assert result.code == 0, result.err
    trains = {r.data.params["method"] + r.data.params.get("m", ""): r for r in cli.runs("train")}
    return Reproduced(
        cli=cli,
        result=result,
        standard=trains["standard"],
        free4=trains["free4"],
        free7=trains["free7"],
        smooth={float(r.data.params["sigma"]): r for r in cli.runs("smooth")},
        backdoor=cli.runs("backdoor")[0],
        cleanse=cli.runs("cleanse")[0],
        report=cli.runs("report")[0],
    )


def twml_process(*args: str, cwd: Path, uri: str, sigint=None, **env):
    """`python -m twml_cli ARGS` as a child process logging to the store `uri`; `sigint`: the
    child's SIGINT handler to start with (signal.SIG_DFL, signal.SIG_IGN), else this process's."""
    import signal
    import subprocess
    import sys

    environ = {**os.environ, "MLFLOW_TRACKING_URI": uri, **env}
    return subprocess.Popen(
        [sys.executable, "-m", "twml_cli", *args],
        cwd=cwd,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=None if sigint is None else lambda: signal.signal(signal.SIGINT, sigint),
    )


def training_with_its_run(cli: Cli, cwd: Path, sigint):
    """A long `twml train` in its own process, started with SIGINT handled by `sigint`, once
    its run exists in `cli`'s store."""
    import time

    proc = twml_process("train", "--epochs", "2000", cwd=cwd, uri=cli.uri, sigint=sigint, PYTHONFAULTHANDLER="1")
    deadline = time.time() + 120
    while not cli.runs() and time.time() < deadline:
        time.sleep(0.5)
    return proc


def twml_run(*args: str, cwd: Path, uri: str, timeout: float = 600) -> Result:
    """`python -m twml_cli ARGS` to completion."""
    proc = twml_process(*args, cwd=cwd, uri=uri)
    out, err = proc.communicate(timeout=timeout)
    return Result(proc.returncode, out, err)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int | None = None, auth: dict | None = None, started: list | None = None):
    """A real `mlflow server` on 127.0.0.1 (a free port unless given), its store and proxied
    artifacts in `folder`; yields its URI. auth: {"admin": password} starts MLflow's basic-auth
    app (every user may read every experiment, as its default configuration says). started:
    a list the server's process is appended to (its group is the server's, to signal)."""
    import socket
    import subprocess
    import sys
    import time

    port = port or free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner: twml runs none
    app = []
    if auth:
        ini = folder / "auth.ini"
        ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{folder / 'users.db'}\nadmin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 600\n"  # check a password's hash once, not on every request
        )
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(ini),
            MLFLOW_AUTH_ADMIN_PASSWORD=auth["admin"],
            MLFLOW_FLASK_SERVER_SECRET_KEY="twml-tests-only",
        )
        app = ["--app-name", "basic-auth"]
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", *app, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "art")]
        + ["--serve-artifacts"],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # mlflow server runs uvicorn as a child: stop the whole group
    )
    if started is not None:
        started.append(proc)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.3)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
