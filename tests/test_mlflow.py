"""MLflow as its users use it: run trees, data sets as inputs, models in the Models tab and the
registry, system metrics, a real tracking server, and a store that never breaks."""

import json

import numpy as np
import pytest
from conftest import Cli, mlflow_server, twml_process

from twml_cli import load_model, results

TINY = ("--epochs", "1", "--pgd-steps", "1")


def test_reproduce_is_one_run_tree(reproduced):
    cli = reproduced.cli
    (parent,) = cli.runs("reproduce")
    children = [r for r in cli.runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["twml.command"] for r in children) == [
        "backdoor",
        "cleanse",
        "mitigate",
        "mitigate",
        "mitigate",
        "report",
        "sweep",
        "train",
        "train",
        "train",
    ]
    (sweep,) = [r for r in children if r.data.tags["twml.command"] == "sweep"]
    sigmas = [r for r in cli.runs("smooth") if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert sorted(r.data.params["sigma"] for r in sigmas) == [
        "0.05",
        "0.2",
    ]  # the two sigmas, one sweep under reproduce
    assert parent.info.status == "FINISHED"


def test_every_run_names_its_data_with_a_digest(reproduced):
    client = reproduced.cli.client()
    inputs = {}
    for name in ("standard", "free4", "backdoor"):
        run = client.get_run(getattr(reproduced, name).info.run_id)
        inputs[name] = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs[name]) == {"train", "test"}
        assert all(len(d.digest) == 16 and json.loads(d.profile)["num_examples"] > 0 for d in inputs[name].values())
    assert inputs["standard"]["train"].digest == inputs["free4"]["train"].digest  # the same data, the same digest
    assert (
        inputs["backdoor"]["train"].digest != inputs["standard"]["train"].digest
    )  # poisoned: never confused with clean
    assert (
        inputs["backdoor"]["train"].name == "digits (poisoned)"
        and inputs["backdoor"]["test"].digest == inputs["standard"]["test"].digest
    )


def test_trained_models_are_logged_models_with_their_metrics(reproduced):
    cli, run = reproduced.cli, reproduced.free4
    mine = cli.logged_model(run)
    assert mine.params["arch"] == "test_byobnet" and mine.source_run_id == run.info.run_id
    assert {m.key: m.value for m in mine.metrics}["accuracy"] == run.data.metrics["accuracy"]
    cli.use()  # in this process, as the CLI does with --tracking-uri
    for uri in (f"models:/{mine.model_id}", run.info.run_id, f"runs:/{run.info.run_id}/model"):
        assert load_model(uri).spec.arch == "test_byobnet"
    assert cli.model_files(run) == {"model.safetensors", "spec.json"}  # safetensors and a spec, never a pickle


def test_register_makes_a_registry_version_that_loads(cli):
    result = cli("train", *TINY, "--register", "digits-standard")
    assert result.code == 0, result.err
    (run,) = cli.runs("train")
    assert run.data.tags["twml.registered"] == "models:/digits-standard/1"
    cli.use()  # in this process, as the CLI does with --tracking-uri
    model = load_model("models:/digits-standard/1")
    assert model.spec.dataset == "digits" and not model.training
    missing = cli("attack", "--run", "models:/no-such-model/3")
    assert missing.code == 2 and "no model 'models:/no-such-model/3'" in missing.err


def test_several_sigmas_nest_under_one_parent(cli):
    result = cli("smooth", "--sigma", "0.1,0.3", "--epochs", "1", "--n", "100", "--num-examples", "6")
    assert result.code == 0, result.err
    (parent,) = cli.runs("sweep")
    children = cli.runs("smooth")
    assert len(children) == 2 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert f"{results.SIGMA_FIGURE}.png" in cli.artifacts(parent)  # the figure with both sigmas and their envelope
    assert f"Sweep run id: {parent.info.run_id} (figures {results.SIGMA_FIGURE}.png, sweep.png" in result.out


def test_system_metrics_are_logged_when_asked_even_for_a_run_shorter_than_the_interval(cli, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "30")  # MLflow's loop never samples
    result = cli("train", "--epochs", "4", "--pgd-steps", "1", "--system-metrics")
    assert result.code == 0, result.err
    (run,) = cli.runs("train")
    assert (run.info.end_time - run.info.start_time) / 1000 < 30
    cpu = run.data.metrics.get("system/cpu_utilization_percentage")
    assert cpu is not None and 0 <= cpu <= 100, sorted(run.data.metrics)
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0


@pytest.mark.e2e  # four twml processes
def test_four_concurrent_first_uses_of_an_empty_folder_all_finish(tmp_path):
    cli = Cli(tmp_path)
    procs = [twml_process("train", *TINY, "--seed", str(s), cwd=tmp_path, uri=cli.uri) for s in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    runs = cli.runs("train")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on a free port, artifacts proxied through it."""
    with mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


@pytest.mark.slow  # 36 s; test_team_server runs the same commands against a server that wants credentials
def test_train_smooth_and_report_against_a_team_server(server, tmp_path):
    cli = Cli(tmp_path)
    cli.uri = server
    assert cli("train", *TINY, "--tracking-uri", server).code == 0
    (trained,) = cli.runs("train")
    result = cli(
        "smooth",
        "--run",
        trained.info.run_id,
        "--sigma",
        "0.25",
        "--n",
        "100",
        "--num-examples",
        "8",
        "--tracking-uri",
        server,
    )
    assert result.code == 0, result.err
    report = cli("report", "--out", "out", "--tracking-uri", server)
    assert report.code == 0, report.err
    assert all(r.info.status == "FINISHED" for r in cli.runs())
    assert {"certify.csv", "randomized-smoothing-acc-vs-radius.png"} <= cli.artifacts(
        cli.runs("smooth")[0]
    )  # proxied artifacts
    assert (tmp_path / "out" / "twml.pdf").stat().st_size > 1000
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # everything went to the server


def test_not_finite_pixels_are_refused(cli, tmp_path):
    x = np.random.default_rng(0).random((10, 1, 4, 4)).astype(np.float32)
    x[3, 0, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=x, y_train=np.arange(10) % 2, x_test=x, y_test=np.arange(10) % 2)
    result = cli("train", "--dataset", str(tmp_path / "nan.npz"))
    assert result.code == 2 and "holds 1 pixels that are NaN or infinite" in result.err and cli.runs() == []


def test_a_report_of_an_experiment_with_no_runs_is_refused_and_creates_nothing(cli):
    assert cli("train", *TINY).code == 0
    result = cli("report", "--experiment", "nothing-logged-here", "--out", "out")
    assert result.code == 2 and "experiment 'nothing-logged-here' has no runs" in result.err
    assert cli.client().get_experiment_by_name("nothing-logged-here") is None and not (cli.path / "out").exists()


@pytest.mark.parametrize(  # a server that does not answer: test_team_server.py
    "uri, message", [("sqlite:////proc/no/such/dir/mlflow.db", "folder '/proc/no/such/dir' does not exist")]
)
def test_an_unusable_tracking_store_is_one_line(cli, uri, message):
    result = cli("train", *TINY, "--tracking-uri", uri)
    assert (
        result.code == 2
        and message in result.err
        and len(result.err.strip().splitlines()) == 1
        and "Traceback" not in result.err
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        '{"checkpoint_path": "/etc/hostname"}',
        '{"pretrained": true}',
        '{"pretrained_cfg_overlay": {"file": "x"}}',
        '{"drop_rate": 0.1, "act_layer": "https://example.com/evil.py"}',
    ],
)
def test_model_kwargs_that_ask_for_files_are_refused(cli, tmp_path, kwargs):
    result = cli("train", *TINY, "--model-kwargs", kwargs)
    assert result.code == 2 and "is refused" in result.err and cli.runs() == []
    from twml_cli.models import ModelSpec, create_model, save_model

    folder = save_model(
        create_model(ModelSpec("test_byobnet", 10, 1, (8, 8), (0.3,), (0.4,), {}, True, "digits")), tmp_path / "m"
    )
    spec = json.loads((folder / "spec.json").read_text())
    (folder / "spec.json").write_text(json.dumps({**spec, "model_kwargs": json.loads(kwargs)}))  # a logged spec, edited
    shared = cli("attack", "--run", str(folder))
    assert shared.code == 2 and "is refused" in shared.err and len(shared.err.strip().splitlines()) == 1
