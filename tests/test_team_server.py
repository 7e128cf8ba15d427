"""A team's tracking server: MLflow's basic-auth app with users and permissions, a server that
does not answer, and one that goes away in the middle of a run. Real servers on free ports."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import Cli, free_port, mlflow_server, training_with_its_run, twml_process

ADMIN, ALICE, BOB = "admin-password-1", "alice-password-1", "bob-password-12"  # the server wants 12+ characters
TINY = ("--epochs", "1", "--pgd-steps", "1")
pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Credentials and MLflow's HTTP settings as a fresh shell has them, restored afterwards
    (twml sets some of them in-process)."""
    for key in (
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    ):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def as_user(monkeypatch, user: str | None, password: str | None) -> None:
    for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


@pytest.fixture
def cli(bare_cli):
    """twml in an empty folder: against a server, no store is made here (the tests check it)."""
    return bare_cli


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """A basic-auth server with two users, alice and bob; every user may read every experiment
    and write to their own."""
    with mlflow_server(tmp_path_factory.mktemp("team"), auth={"admin": ADMIN}) as uri:
        with pytest.MonkeyPatch.context() as mp:
            as_user(mp, "admin", ADMIN)
            from mlflow.server import get_app_client

            users = get_app_client("basic-auth", tracking_uri=uri)
            users.create_user("alice", ALICE)
            users.create_user("bob", BOB)
        yield uri


def admin_client(uri: str, monkeypatch):
    from mlflow.tracking import MlflowClient

    as_user(monkeypatch, "admin", ADMIN)
    return MlflowClient(uri)


def everything_logged(client, run) -> bytes:
    """Params, tags, metrics' names and every artifact of a run, as bytes to search."""
    import tempfile

    text = repr(run.data.params) + repr(run.data.tags) + repr(run.data.metrics)
    with tempfile.TemporaryDirectory() as tmp:
        client.download_artifacts(run.info.run_id, "", tmp)
        blobs = [p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()]
    return text.encode() + b"".join(blobs)


def test_with_credentials_train_smooth_and_report_work_and_the_password_stays_secret(team, cli, clean_env):
    cli.uri = team
    host = team.removeprefix("http://")
    in_uri = f"http://alice:{ALICE}@{host}"  # the password inside the URI, as some users pass it
    trained = cli("train", *TINY, "--tracking-uri", in_uri, "--experiment", "alice-work")
    assert trained.code == 0, trained.err
    as_user(clean_env, "alice", ALICE)  # from here on the usual way: MLflow's variables
    (model,) = cli.runs("train", experiment="alice-work")
    smoothed = cli(
        "smooth",
        "--run",  # the model, read back from the server
        model.info.run_id,
        "--sigma",
        "0.25",
        "--n",
        "100",
        "--num-examples",
        "20",
        "--experiment",
        "alice-work",
        "--tracking-uri",
        team,
    )
    assert smoothed.code == 0, smoothed.err
    report = cli("report", "--out", "out", "--experiment", "alice-work", "--tracking-uri", in_uri)
    assert report.code == 0, report.err
    listed = cli("runs", "--experiment", "alice-work", "--tracking-uri", team)
    assert listed.code == 0 and "FINISHED" in listed.out and "smooth" in listed.out

    client = admin_client(team, clean_env)
    exp = client.get_experiment_by_name("alice-work")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags["twml.command"] for r in runs} == {"train", "smooth", "report"}
    assert all(r.info.status == "FINISHED" for r in runs)
    (smooth,) = (r for r in runs if r.data.tags["twml.command"] == "smooth")
    assert {"certify.csv", "randomized-smoothing-acc-vs-radius.png"} <= cli.artifacts(smooth)  # proxied artifacts
    assert (cli.path / "out" / "alice-work.pdf").stat().st_size > 1000
    secret = ALICE.encode()
    for r in runs:
        assert secret not in everything_logged(client, r), r.data.tags["twml.command"]
    for result in (trained, smoothed, report, listed):
        assert ALICE not in result.out + result.err
    assert all(secret not in p.read_bytes() for p in (cli.path / "out").rglob("*") if p.is_file())
    assert not (cli.path / "mlflow.db").exists() and not (cli.path / ".twml").exists()


@pytest.mark.parametrize(
    "user, password, says",
    [
        (None, None, "401 Unauthorized: no user name and password"),
        ("alice", "not-her-password", "401 Unauthorized: user 'alice' with this password"),
        ("mallory", "any-password-1", "401 Unauthorized: user 'mallory' with this password"),
    ],
)
def test_no_or_wrong_credentials_end_in_one_line_and_leave_nothing(team, cli, clean_env, user, password, says):
    cli.uri = team
    as_user(clean_env, user, password)
    result = cli("train", *TINY, "--tracking-uri", team, "--experiment", "strangers")
    assert result.code == 2
    assert result.err.strip() == (
        f"twml: error: the server {team} refused these credentials ({says}); set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD to an account of this server"
    )
    assert admin_client(team, clean_env).get_experiment_by_name("strangers") is None
    assert not (cli.path / "mlflow.db").exists() and not (cli.path / "mlruns").exists()


@pytest.mark.slow  # 15 s; the credentials tests above keep the server's refusals in the default run
def test_a_reader_cannot_write_to_anothers_experiment(team, cli, clean_env):
    cli.uri = team
    as_user(clean_env, "alice", ALICE)
    assert cli("train", *TINY, "--experiment", "alice-only", "--tracking-uri", team).code == 0
    as_user(clean_env, "bob", BOB)
    read = cli("runs", "--experiment", "alice-only", "--tracking-uri", team)
    assert read.code == 0 and "FINISHED" in read.out  # bob may read
    wrote = cli("train", *TINY, "--experiment", "alice-only", "--tracking-uri", team)
    assert wrote.code == 2
    assert wrote.err.strip() == (
        f"twml: error: the server {team} refused these credentials (403 Permission denied): user 'bob' may not "
        "write to experiment 'alice-only'; ask its owner or an admin for EDIT permission, or choose another "
        "--experiment"
    )
    client = admin_client(team, clean_env)
    (run,) = client.search_runs([client.get_experiment_by_name("alice-only").experiment_id])  # alice's alone
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("wait", [3, pytest.param(None, marks=pytest.mark.slow)])  # None: the default 30 s
def test_a_server_that_is_down_is_reported_within_the_wait(cli, wait):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cli.uri = uri
    start = time.monotonic()
    result = cli("train", *TINY, "--tracking-uri", uri, *(["--server-wait", str(wait)] if wait else []))
    took = time.monotonic() - start
    wait = wait or 30  # the default
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        f"twml: waiting up to {wait} s for the tracking server {uri} (connection refused)",
        f"twml: error: the tracking server {uri} did not answer within {wait} s (connection refused); start it, "
        "check the address, or wait longer with --server-wait",
    ]
    assert wait - 2 <= took <= wait + 5, took


def test_a_server_that_goes_away_mid_run_loses_no_work(tmp_path):
    """The server is killed once the first pass's state is kept; twml keeps the training state locally and
    says how to go on; once the server is back, --resume finishes the run, and it ends as an
    uninterrupted run with the same settings does."""
    folder, work = tmp_path / "server", tmp_path / "work"
    folder.mkdir(), work.mkdir()
    port = free_port()
    args = ("train", "--epochs", "6", "--pgd-steps", "2", "--threads", "1", "--server-wait", "3")
    cli = Cli(work)
    with mlflow_server(folder, port) as uri:
        cli.uri = uri
        whole = cli(*args, "--experiment", "whole", "--tracking-uri", uri)
        assert whole.code == 0, whole.err
        proc = twml_process(*args, "--experiment", "cut", cwd=work, uri=uri)  # to be cut off: its own process
        kept = work / ".twml" / "kept"
        deadline = time.time() + 120
        while time.time() < deadline and not list(kept.glob("*/checkpoint/state.json")):
            time.sleep(0.05)
        state = next(kept.glob("*/checkpoint/state.json"))
    out, err = proc.communicate(timeout=120)  # the server is gone
    run_id = state.parts[-3]
    assert proc.returncode == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"twml: error: the tracking server {uri} stopped answering (connection refused)")
    assert f"run {run_id} kept the training state after pass" in line
    assert f"`twml train --resume {run_id} --tracking-uri {uri}` goes on from there" in line
    assert (state.parent / "state.safetensors").is_file()

    with mlflow_server(folder, port):
        listed = cli("runs", "--experiment", "cut", "--tracking-uri", uri)
        assert "interrupted" in listed.out and f"resume: twml train --resume {run_id}" in listed.out, listed.out
        resumed = cli("train", "--resume", run_id, "--tracking-uri", uri)
        assert resumed.code == 0, resumed.err
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        run = client.get_run(run_id)
        (reference,) = client.search_runs([client.get_experiment_by_name("whole").experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags["twml.resumed"] == "1"
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
        assert steps == list(range(1, 7))
        for key in ("accuracy", "pgd_success_rate", "train_loss"):
            assert run.data.metrics[key] == reference.data.metrics[key], key
    assert not kept.exists()  # finished: nothing left behind


def test_a_third_ctrl_c_quits_while_a_frozen_server_holds_the_runs_end(tmp_path):
    """A server that accepts connections and never answers (stopped, overloaded) holds the
    interrupted run's end for minutes: a second Ctrl-C says so, a third quits at once."""
    folder, work = tmp_path / "server", tmp_path / "work"
    folder.mkdir(), work.mkdir()
    started: list = []
    with mlflow_server(folder, started=started) as uri:
        cli = Cli(work)
        cli.uri = uri
        proc = training_with_its_run(cli, work, signal.SIG_DFL)
        (server,) = started
        os.killpg(server.pid, signal.SIGSTOP)
        try:
            proc.send_signal(signal.SIGINT)
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            time.sleep(1.0)
            assert proc.poll() is None, proc.communicate()[1]  # still waiting for the server
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
        finally:
            os.killpg(server.pid, signal.SIGCONT)
            proc.kill()
        assert proc.returncode == -signal.SIGINT, err  # as a shell sees it: 130
        assert err.strip() == (
            "twml: stopping: ending the MLflow run; Ctrl-C again quits at once and leaves it RUNNING "
            "(`twml runs` lists it)"
        )
        (run,) = cli.runs()
        assert run.info.status == "RUNNING"
        listed = cli("runs", "--tracking-uri", uri)
        assert "interrupted  train" in listed.out and f"resume: twml train --resume {run.info.run_id}" in listed.out
