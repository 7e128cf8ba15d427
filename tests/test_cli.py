"""`twml train` and `twml attack` end to end on the embedded default, bad input, Ctrl-C,
and several processes logging to one store."""

import os
import signal
import subprocess
import sys
import time

import pytest

from twml_cli import load_dataset, load_model
from twml_cli.attacks import accuracy

TRAIN_PARAMS = {
    "dataset", "model", "method", "m", "eps", "epochs", "batch_size", "lr", "seed", "device",
    "pgd_steps", "pgd_alpha", "pgd_restarts", "torch_version", "timm_version", "twml_version",
}  # fmt: skip
TRAIN_METRICS = {"train_time_s", "accuracy", "pgd_success_rate", "robust_accuracy", "images_per_s", "train_loss", "train_accuracy"}


@pytest.fixture(scope="module")
def trained(module_cli):
    """The README's first block with default settings: standard, then free m=4 training."""
    standard = module_cli("train")
    free = module_cli("train", "--free", "--m", "4")
    assert standard.code == 0, standard.err
    assert free.code == 0, free.err
    runs = {r.data.params["method"]: r for r in module_cli.runs("train")}
    return module_cli, runs, standard, free


def test_train_logs_every_param_and_metric(trained):
    cli, runs, _, _ = trained
    for method, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["twml.command"] == "train"
        assert TRAIN_PARAMS <= set(run.data.params), TRAIN_PARAMS - set(run.data.params)
        assert TRAIN_METRICS <= set(run.data.metrics), TRAIN_METRICS - set(run.data.metrics)
        p = run.data.params
        assert (p["dataset"], p["model"], p["epochs"], p["device"]) == ("digits", "test_byobnet", "28", "cpu")
        assert float(p["eps"]) == 0.1 and p["pgd_steps"] == "10" and p["seed"] == "0"
        assert {"model/model.safetensors", "model/spec.json", "config.json"} <= cli.artifacts(run)
    assert runs["standard"].data.params["m"] == "1" and runs["free"].data.params["m"] == "4"
    history = cli.client().get_metric_history(runs["free"].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [4, 8, 12, 16, 20, 24, 28]  # 7 passes of 4 replays
    history = cli.client().get_metric_history(runs["standard"].info.run_id, "train_accuracy")
    assert sorted(m.step for m in history) == list(range(1, 29))


def test_free_training_trades_a_little_accuracy_for_much_robustness(trained):
    _, runs, _, _ = trained
    standard, free = runs["standard"].data.metrics, runs["free"].data.metrics
    assert standard["accuracy"] >= 0.95
    assert free["accuracy"] >= 0.90
    assert free["pgd_success_rate"] <= 0.6 * standard["pgd_success_rate"]
    assert free["sgd_steps"] == standard["sgd_steps"]  # 28 epochs: 7 passes x 4 replays
    for m in (standard, free):
        assert m["robust_accuracy"] == pytest.approx(1 - m["pgd_success_rate"])


def test_console_reads_like_the_write_up(trained):
    _, runs, standard, free = trained
    assert "Time (in seconds) to complete standard training:" in standard.out
    assert "Time (in seconds) to complete free adversarial training (m=4):" in free.out
    acc = runs["free"].data.metrics["accuracy"]
    assert f"Model accuracy: {acc:.4f}" in free.out
    assert "Success rate of untargeted white-box PGD" in free.out
    assert f"Run id: {runs['free'].info.run_id}" in free.out


def test_logged_model_loads_back_and_gives_the_logged_accuracy(trained):
    cli, runs, _, _ = trained
    run = runs["free"]
    os.environ["MLFLOW_TRACKING_URI"] = cli.uri
    try:
        for uri in (run.info.run_id, f"runs:/{run.info.run_id}/model"):
            model = load_model(uri)
            assert not model.training
            _, test = load_dataset("digits")
            assert accuracy(model, *test.tensors) == run.data.metrics["accuracy"]
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_attack_reevaluates_a_logged_model_as_its_own_run(trained):
    cli, runs, _, _ = trained
    source = runs["free"]
    result = cli("attack", "--run", source.info.run_id, "--steps", "20", "--restarts", "2")
    assert result.code == 0, result.err
    run = cli.runs("attack")[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model_run"] == source.info.run_id == run.data.tags["twml.model_run"]
    assert (run.data.params["pgd_steps"], run.data.params["pgd_restarts"]) == ("20", "2")
    assert run.data.metrics["accuracy"] == source.data.metrics["accuracy"]  # the same model on the same data
    assert {"pgd_success_rate", "robust_accuracy"} <= set(run.data.metrics)
    assert "20 steps, 2 restarts" in result.out


BAD = [
    (["train", "--dataset", "imagenet-x"], "unknown data set 'imagenet-x'"),
    (["train", "--model", "resnet_nonexistent"], "unknown model 'resnet_nonexistent'"),
    (["train", "--free", "--m", "0"], "m (replays per minibatch) must be >= 1, got 0"),
    (["train", "--eps", "1.5"], "eps must lie in [0, 1]"),
    (["train", "--eps", "-0.1"], "eps must lie in [0, 1]"),
    (["train", "--epochs", "0"], "epochs must be >= 1, got 0"),
    (["train", "--m", "four"], "Invalid value for '--m'"),
    (["train", "--preset", "imagenet"], "unknown preset 'imagenet'"),
    (["train", "--model-kwargs", "[1, 2]"], "--model-kwargs must be a JSON object"),
    (["attack", "--run", "0123456789abcdef0123456789abcdef"], "no run '0123456789abcdef0123456789abcdef'"),
    (["attack", "--run", "runs:/feedface/model"], "no run 'feedface'"),
    (["nonsense"], "No such command 'nonsense'"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_no_run(cli, args, message):
    result = cli(*args)
    assert result.code == 2
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "Traceback" not in result.err + result.out
    assert cli.runs() == []


def test_weights_that_are_not_safetensors_end_with_exit_2(cli, tmp_path):
    from twml_cli.models import ModelSpec, create_model, save_model

    folder = tmp_path / "model"
    save_model(create_model(ModelSpec("test_byobnet", 10, 1, (8, 8), (0.3,), (0.4,), {}, True, "digits")), folder)
    (folder / "model.safetensors").write_bytes(os.urandom(64))
    result = cli("attack", "--run", str(folder))
    assert result.code == 2 and "not a readable safetensors file" in result.err
    assert len(result.err.strip().splitlines()) == 1 and cli.runs() == []


def test_tracking_uri_flag_picks_the_store(cli, tmp_path):
    other = tmp_path / "elsewhere.db"
    result = cli("train", "--epochs", "1", "--pgd-steps", "1", "--tracking-uri", f"sqlite:///{other}", "--experiment", "mine")
    assert result.code == 0, result.err
    assert other.exists() and cli.runs() == []
    from mlflow.tracking import MlflowClient

    assert MlflowClient(f"sqlite:///{other}").get_experiment_by_name("mine") is not None


def _twml(*args, cwd, env):
    return subprocess.Popen([sys.executable, "-m", "twml_cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_ends_the_run_killed(cli, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": cli.uri}
    proc = _twml("train", "--epochs", "2000", cwd=tmp_path, env=env)
    deadline = time.time() + 120
    while not cli.runs() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)  # inside the training loop
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    (run,) = cli.runs()
    assert run.info.status == "KILLED"


def test_several_processes_can_log_to_one_store(cli, tmp_path):
    assert cli("train", "--epochs", "1", "--pgd-steps", "1").code == 0  # creates the store and experiment first
    env = {**os.environ, "MLFLOW_TRACKING_URI": cli.uri}
    procs = [_twml("train", "--epochs", "1", "--pgd-steps", "1", "--seed", str(s), cwd=tmp_path, env=env) for s in (1, 2, 3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    runs = cli.runs("train", status="FINISHED")
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2", "3"]


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "twml_cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "attack", "smooth", "backdoor", "cleanse"):
        assert command in out
