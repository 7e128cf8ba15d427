"""A run killed with SIGKILL is told apart from a live one, and `--resume` finishes it in place
with the very weights an uninterrupted run of the same seed ends with."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
from conftest import twml_process, twml_run
from safetensors.torch import load_file

ARGS = ("train", "--free", "--m", "4", "--epochs", "16", "--pgd-steps", "3")  # 4 passes, a checkpoint after each


def checkpoint_passes(cli, run_id) -> int:
    """The passes the run's logged checkpoint holds; 0 while there is none, or while the run is
    still copying its state.json into the store (the copy is read half-written)."""
    try:
        path = cli.client().download_artifacts(run_id, "checkpoint/state.json")
        return json.loads(open(path).read())["passes_done"]
    except Exception:  # noqa: BLE001 - no checkpoint yet, or one being logged
        return 0


def kill_after(cli, args: tuple, passes: int):
    """Start `twml ARGS`, SIGKILL it once its run holds a checkpoint of `passes` passes; the run."""
    command = args[0]
    proc = twml_process(*args, cwd=cli.path, uri=cli.uri)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            runs = cli.runs(command)
            if runs and checkpoint_passes(cli, runs[0].info.run_id) >= passes:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "training ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    (killed,) = cli.runs(command)
    return killed


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    from conftest import Cli

    cli = Cli(tmp_path_factory.mktemp("resume"))
    killed = kill_after(cli, ARGS, passes=2)
    listing = cli("runs")
    done_before = checkpoint_passes(cli, killed.info.run_id)
    resumed = twml_run("train", "--resume", killed.info.run_id, cwd=cli.path, uri=cli.uri)  # a fresh process
    whole = cli(*ARGS, "--experiment", "whole")
    return cli, killed, listing, done_before, resumed, whole


def test_a_killed_run_is_listed_as_interrupted_with_its_resume_command(killed_and_resumed):
    cli, killed, listing, *_ = killed_and_resumed
    assert killed.info.status == "RUNNING"  # SIGKILL leaves MLflow no chance...
    line = next(line for line in listing.out.splitlines() if killed.info.run_id in line)
    assert (
        line.startswith("interrupted") and f"resume: twml train --resume {killed.info.run_id}" in line
    )  # ...twml tells


def test_resume_finishes_the_same_run_with_the_uninterrupted_weights(killed_and_resumed):
    cli, killed, _, done_before, resumed, whole = killed_and_resumed
    assert 2 <= done_before < 4
    assert resumed.code == 0, resumed.err
    said = f"Resuming run {killed.info.run_id} from the training state after pass {done_before}\n"
    assert resumed.out.startswith(said)
    assert whole.code == 0, whole.err
    run = cli.client().get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["twml.resumed"] == "1"
    assert len(cli.runs("train")) == 1  # continued in place, no new run
    (reference,) = cli.runs("train", experiment="whole")
    a = load_file(cli.model_weights(run))
    b = load_file(cli.model_weights(reference))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit
    for key in ("accuracy", "pgd_success_rate", "robust_accuracy", "sgd_steps"):
        assert run.data.metrics[key] == reference.data.metrics[key]
    history = cli.client().get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [4, 8, 12, 16]  # each pass logged once
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
        m.value
        for m in sorted(cli.client().get_metric_history(reference.info.run_id, "train_loss"), key=lambda m: m.step)
    ]


def test_resume_refuses_what_it_cannot_do(killed_and_resumed):
    cli, killed, *_ = killed_and_resumed
    again = cli("train", "--resume", killed.info.run_id)
    assert again.code == 2 and "already finished" in again.err
    changed = cli("train", "--resume", killed.info.run_id, "--epochs", "3")
    assert changed.code == 2 and "a resumed run keeps its settings" in changed.err
    other = cli("smooth", "--resume", killed.info.run_id)
    assert other.code == 2 and "is a 'train' run, not 'smooth'" in other.err


def test_runs_ends_what_cannot_be_resumed_and_resume_refuses_a_live_run(cli):
    """Runs left RUNNING as a SIGKILL leaves them, made by hand: a report (never resumable), a
    train run killed before it logged its settings, one whose process still lives, and a train
    run stopped by SIGTERM (KILLED, resumable)."""
    import socket

    from twml_cli import tracking

    client = cli.client()
    exp = client.create_experiment("twml")
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = {"twml.host": socket.gethostname()}

    def run(command, pid, params=None, status=None):
        r = client.create_run(exp, tags={"twml.command": command, "twml.pid": str(pid), **here})
        for k, v in (params or {}).items():
            client.log_param(r.info.run_id, k, v)
        if status:
            client.set_terminated(r.info.run_id, status)
        return r.info.run_id

    settings = {"epochs": "2", "seed": "0", "twml_version": "x"}
    report = run("report", dead.pid)
    early = run("train", dead.pid, {"epochs": "2"})  # killed between create_run and log_params
    live = run("train", os.getpid(), settings)
    stopped = run("train", dead.pid, settings, status="KILLED")
    listing = cli("runs")
    assert listing.code == 0, listing.err
    lines = {rid: next(x for x in listing.out.splitlines() if rid in x) for rid in (report, early, live, stopped)}
    for rid in (report, early):
        assert "ended KILLED: its process is gone and it cannot be resumed" in lines[rid]
        assert client.get_run(rid).info.status == "KILLED"
    assert lines[live].startswith("running") and "resume" not in lines[live]
    assert lines[stopped].startswith("KILLED") and f"resume: twml train --resume {stopped}" in lines[stopped]
    assert tracking.status_of(client.get_run(live)) == "running"
    late = run("report", dead.pid)  # for the JSON listing to end
    listed = cli("runs", "--json")
    assert listed.code == 0, listed.err
    rows = {row["run_id"]: row for row in json.loads(listed.out)}
    assert set(rows) == {report, early, live, stopped, late}
    assert rows[late]["status"] == "interrupted" and rows[late]["ended_killed"] and rows[late]["resume"] is None
    assert client.get_run(late).info.status == "KILLED"
    assert rows[report]["status"] == "KILLED" and not rows[report]["ended_killed"]  # the table's listing ended it
    assert rows[live]["status"] == "running" and rows[live]["resume"] is None and not rows[live]["ended_killed"]
    assert rows[stopped]["resume"] == f"twml train --resume {stopped}" and rows[stopped]["command"] == "train"
    started = datetime.fromisoformat(rows[stopped]["started"].replace("Z", "+00:00"))
    assert started.timestamp() == pytest.approx(client.get_run(stopped).info.start_time / 1000, abs=1)
    refused = cli("train", "--resume", live)
    assert refused.code == 2 and f"run '{live}' is still running (process {os.getpid()} on" in refused.err
    refused = cli("train", "--resume", early)
    assert refused.code == 2 and "was stopped before it logged its settings" in refused.err
    # listing, resumable runs among them, loads no torch (it took 1.6 s of the command's 4)
    listed = "import sys\nfrom twml_cli.cli import main\ntry:\n    main(['runs'])\nexcept SystemExit:\n    pass\n"
    probe = subprocess.run(
        [sys.executable, "-c", listed + "print('torch' in sys.modules)"],
        cwd=cli.path,
        env={**os.environ, "MLFLOW_TRACKING_URI": cli.uri},
        capture_output=True,
        text=True,
    )
    assert f"resume: twml train --resume {stopped}" in probe.stdout, probe.stderr
    assert probe.stdout.strip().splitlines()[-1] == "False"


def test_resuming_says_where_the_run_goes_on_from():
    import numpy as np

    from twml_cli.checkpoints import TrainState
    from twml_cli.studies.resume import going_on

    state, rows = TrainState({}, {"passes_done": 3}), {"index": np.arange(40), "radius": np.zeros(40)}
    assert going_on("r1", state, None) == "Resuming run r1 from the training state after pass 3"
    both = "Resuming run r1 from the training state after pass 3 and 40 certified examples"
    assert going_on("r1", state, rows) == both
    assert going_on("r1", None, None) == "Resuming run r1 from the start: it had kept no training state"


def test_a_checkpoint_torn_between_its_two_files_is_refused(tmp_path):
    """A kill between writing (or uploading) state.safetensors and state.json leaves the weights
    of one pass beside the position of another; load refuses the pair instead of resuming from
    it (the soak found a resumed run ending with other numbers than its uninterrupted twin)."""
    import shutil

    import torch

    from twml_cli.checkpoints import TrainState

    first = TrainState({"model.w": torch.zeros(3)}, {"passes_done": 1}).save(tmp_path / "first")
    second = TrainState({"model.w": torch.ones(3)}, {"passes_done": 2}).save(tmp_path / "second")
    back = TrainState.load(second)
    assert back.meta == {"passes_done": 2} and torch.equal(back.tensors["model.w"], torch.ones(3))
    assert not list(second.glob("*.new"))  # written whole, then renamed
    shutil.copy(second / TrainState.META, first / TrainState.META)  # pass 2's position, pass 1's weights
    with pytest.raises(ValueError, match="two different checkpoints"):
        TrainState.load(first)
    (second / TrainState.WEIGHTS).write_bytes((second / TrainState.WEIGHTS).read_bytes()[:40])  # cut short
    with pytest.raises(ValueError, match="holds no whole checkpoint"):
        TrainState.load(second)


def test_a_smooth_run_resumed_mid_training_certifies_as_an_uninterrupted_one(cli):
    """Killed after the third of six passes and resumed: the same losses, accuracy and
    certificates as the run that was never stopped (the soak found a resumed smooth run that
    had gone on with another thread count than it was started with)."""
    args = ("smooth", "--sigma", "0.25", "--epochs", "6", "--n", "200", "--num-examples", "60", "--threads", "1")
    assert cli(*args, "--experiment", "whole").code == 0
    killed = kill_after(cli, args, passes=3)
    assert 3 <= checkpoint_passes(cli, killed.info.run_id) < 6
    resumed = cli("smooth", "--resume", killed.info.run_id)
    assert resumed.code == 0, resumed.err
    run = cli.client().get_run(killed.info.run_id)
    (whole,) = cli.runs("smooth", experiment="whole")
    assert (run.data.params["threads"], run.data.params["eval_threads"]) == ("1", "1")  # --threads: both phases
    for key in ("train_loss", "accuracy", "certified_accuracy", "average_certified_radius"):
        assert run.data.metrics[key] == whole.data.metrics[key], key


@pytest.mark.parametrize(
    ("logged", "resumed"),
    [({"threads": "1", "eval_threads": "2"}, (1, 2)), ({"threads": "1"}, (1, 1)), ({"threads": "999"}, (0, 0))],
)
def test_a_resumed_run_keeps_both_thread_counts(monkeypatch, logged, resumed):
    """Training and evaluation go on with the counts the run started with; a run logged before
    eval_threads existed ran everything with its threads; counts this machine cannot run are left
    to its own choice."""
    from types import SimpleNamespace

    from twml_cli import tracking
    from twml_cli.studies import resume

    params = {"twml_version": "0", "epochs": "3", "sigma": "0.25", **logged}
    run = SimpleNamespace(
        info=SimpleNamespace(status="KILLED"), data=SimpleNamespace(params=params, tags={"twml.command": "smooth"})
    )
    monkeypatch.setattr(tracking, "get_run", lambda run_id: run)
    settings = resume.resume_settings("smooth", "r", {})
    assert (settings.threads, settings.eval_threads, settings.epochs, settings.sigma) == (*resumed, 3, 0.25)
