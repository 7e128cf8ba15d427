"""Shared fixtures: the embedded data set, a private MLflow store, and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits():
    from twml_cli.data import describe, load_dataset

    train, test = load_dataset("digits")
    return train, test, describe("digits", train, test)


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

        return MlflowClient(self.uri)

    def runs(self, command: str | None = None, status: str | None = None, experiment: str = "twml"):
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
        return [
            r
            for r in runs
            if (command is None or r.data.tags.get("twml.command") == command) and (status is None or r.info.status == status)
        ]

    def artifacts(self, run) -> set[str]:
        """Every artifact path of a run, recursively."""
        client, found, todo = self.client(), set(), [None]
        while todo:
            for f in client.list_artifacts(run.info.run_id, todo.pop()):
                (todo.append(f.path) if f.is_dir else found.add(f.path))
        return found


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path)


@pytest.fixture(scope="module")
def module_cli(tmp_path_factory):
    return Cli(tmp_path_factory.mktemp("store"))
