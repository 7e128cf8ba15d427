"""`twml smooth`, `twml backdoor` and `twml cleanse` end to end on the embedded default."""

import numpy as np
import pandas as pd
import pytest

SMOOTH_METRICS = {
    "accuracy", "certified_accuracy", "abstain_rate", "average_certified_radius", "certify_time_s", "samples_per_s",
    "train_time_s", "train_loss",
}  # fmt: skip
SMOOTH_ARTIFACTS = {
    "certify.csv", "certified-accuracy-vs-radius.csv", "randomized-smoothing-acc-vs-radius.pdf",
    "randomized-smoothing-acc-vs-radius.png", "model/model.safetensors", "model/spec.json",
}  # fmt: skip


def download(cli, run, path):
    return cli.client().download_artifacts(run.info.run_id, path)


@pytest.fixture(scope="module")
def smoothed(module_cli):
    result = module_cli("smooth")  # the preset's sigmas: 0.05 and 0.20
    assert result.code == 0, result.err
    runs = {float(r.data.params["sigma"]): r for r in module_cli.runs("smooth")}
    return module_cli, runs, result


def test_smooth_logs_every_metric_and_artifact(smoothed):
    cli, runs, _ = smoothed
    assert sorted(runs) == [0.05, 0.2]
    for sigma, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["twml.command"] == "smooth"
        p = run.data.params
        assert (p["n0"], p["n"], p["alpha"], p["num_examples"], p["method"]) == ("100", "1000", "0.001", "360", "noise")
        assert {"epochs", "batch_size", "lr", "model", "dataset", "seed"} <= set(p)
        assert SMOOTH_METRICS <= set(run.data.metrics)
        assert SMOOTH_ARTIFACTS <= cli.artifacts(run)
        table = pd.read_csv(download(cli, run, "certify.csv"))
        assert list(table.columns) == ["idx", "label", "predict", "radius", "correct", "time_s"] and len(table) == 360
        m = run.data.metrics
        assert m["certified_accuracy"] == pytest.approx(table["correct"].mean())
        assert m["abstain_rate"] == pytest.approx((table["predict"] == -1).mean())
        assert m["average_certified_radius"] == pytest.approx(np.where(table["correct"], table["radius"], 0).mean())
        assert not table.loc[table["predict"] == -1, "correct"].any()
        curve = pd.read_csv(download(cli, run, "certified-accuracy-vs-radius.csv"))
        assert list(curve.columns) == ["radius", "certified_accuracy"]
        assert curve["certified_accuracy"].iloc[0] == pytest.approx(m["certified_accuracy"])
        assert np.all(np.diff(curve["certified_accuracy"]) <= 0)


def test_larger_sigma_certifies_larger_radii_and_falls_more_slowly(smoothed):
    _, runs, _ = smoothed
    small, large = runs[0.05].data.metrics, runs[0.2].data.metrics
    assert small["certified_accuracy"] >= 0.9
    assert large["max_certified_radius"] > 2 * small["max_certified_radius"]
    # the curve of sigma = 0.20 falls more slowly: more area under it (the average certified
    # radius), and at r = 0.25, beyond sigma = 0.05's reach, it still certifies most examples
    assert large["average_certified_radius"] > 2 * small["average_certified_radius"]
    assert small["certified_accuracy_r0.25"] == 0.0 and large["certified_accuracy_r0.25"] > 0.5


def test_smooth_console_names_each_sigma(smoothed):
    _, runs, result = smoothed
    for sigma, run in runs.items():
        assert f"sigma = {sigma:g}:" in result.out and f"Run id: {run.info.run_id}" in result.out
    assert "Certified accuracy: r=0:" in result.out and "Abstain rate:" in result.out


def test_smooth_certifies_a_given_model(smoothed):
    cli, runs, _ = smoothed
    source = runs[0.2].info.run_id
    result = cli("smooth", "--sigma", "0.25", "--model-run", source, "--n", "200", "--num-examples", "20")
    assert result.code == 0, result.err
    run = cli.runs("smooth")[0]
    assert run.data.params["model_run"] == source and run.data.params["sigma"] == "0.25"
    assert "model/model.safetensors" not in cli.artifacts(run)  # it certified, it did not train
    assert run.data.metrics["accuracy"] == runs[0.2].data.metrics["accuracy"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["smooth", "--sigma", "0"], "sigma must be > 0"),
        (["smooth", "--sigma", "0.1", "--sigma", "-0.2"], "sigma must be > 0, got -0.2"),
        (["smooth", "--n0", "0"], "n0 must be >= 1"),
        (["smooth", "--n", "0"], "n must be >= 1"),
        (["smooth", "--alpha", "1"], "alpha must lie in (0, 1)"),
        (["smooth", "--model-run", "0123456789abcdef"], "no run '0123456789abcdef'"),
        (["backdoor", "--target", "10"], "target class 10 is outside the classes 0..9"),
        (["backdoor", "--poison-rate", "0"], "poison rate must lie in (0, 1)"),
        (["backdoor", "--trigger-size", "9"], "trigger size 9 is larger than the 8x8 image"),
        (["cleanse", "--run", "0123456789abcdef"], "no run '0123456789abcdef'"),
        (["cleanse"], "no finished run of twml train and twml backdoor"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run(cli, args, message):
    result = cli(*args)
    assert result.code == 2 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and cli.runs() == []


@pytest.fixture(scope="module")
def cleansed(tmp_path_factory):
    """The README's Neural Cleanse block: a clean model, a backdoored one, cleanse."""
    from conftest import Cli

    cli = Cli(tmp_path_factory.mktemp("cleanse"))
    clean = cli("train", "--pgd-steps", "1")
    poisoned = cli("backdoor", "--target", "0")
    result = cli("cleanse")
    for r in (clean, poisoned, result):
        assert r.code == 0, r.err
    return cli, cli.runs("train")[0], cli.runs("backdoor")[0], cli.runs("cleanse")[0], poisoned, result


def test_backdoor_keeps_accuracy_and_the_trigger_works(cleansed):
    cli, clean, poisoned, _, console, _ = cleansed
    p, m = poisoned.data.params, poisoned.data.metrics
    assert poisoned.data.tags["twml.command"] == "backdoor"
    assert (p["target"], p["poison_rate"], p["trigger_size"], p["position"]) == ("0", "0.1", "2", "bottom-right")
    assert m["accuracy"] >= clean.data.metrics["accuracy"] - 0.03
    assert m["attack_success_rate"] >= 0.95
    assert {"model/model.safetensors", "example.png", "example-clean.png", "example-triggered.png"} <= cli.artifacts(poisoned)
    assert f"Attack success rate (triggered test images not of class 0): {m['attack_success_rate']:.4f}" in console.out


def test_cleanse_flags_exactly_the_backdoored_model_at_its_target(cleansed):
    cli, clean, poisoned, run, _, result = cleansed
    assert run.data.params["model0"] == clean.info.run_id and run.data.params["model1"] == poisoned.info.run_id
    norms = pd.read_csv(download(cli, run, "norms.csv"))
    assert list(norms.columns[:6]) == ["model", "run_id", "class", "norm", "anomaly_index", "flagged"]
    assert len(norms) == 20
    flagged = norms[norms["flagged"]]
    assert flagged[["model", "class"]].values.tolist() == [[1, 0]]
    assert flagged["anomaly_index"].iloc[0] > 2
    assert run.data.tags["twml.verdict"] == "model 1 class 0"
    m = run.data.metrics
    assert m["backdoor_success_rate"] >= 0.9
    assert m["model1_anomaly_index"] > 2 >= m["model0_anomaly_index"]
    assert m["model0_accuracy"] == clean.data.metrics["accuracy"] and m["model1_accuracy"] == poisoned.data.metrics["accuracy"]
    assert "Backdoor is at model 1 class 0" in result.out
    assert f"Backdoor success rate: {m['backdoor_success_rate']:.4f}" in result.out
    assert f"Accuracy of model 0: {m['model0_accuracy']:.4f}" in result.out
    norm = norms[(norms["model"] == 1) & (norms["class"] == 3)]["norm"].iloc[0]
    assert f"Norm of trigger targeting class 3 in model 1: {norm:.4f}" in result.out


def test_cleanse_logs_every_image(cleansed):
    cli, _, _, run, _, _ = cleansed
    files = cli.artifacts(run)
    for i in (0, 1):
        for c in range(10):
            assert f"masks/model{i}_class{c}_mask.png" in files and f"triggers/model{i}_class{c}_trigger.png" in files
    assert {"norms.csv", "norms.png", "mask-grid.png", "trigger.png", "mask.png"} <= files
    assert {"backdoor/model1_class0/trigger.png", "backdoor/model1_class0/mask.png"} <= files
    from PIL import Image

    with Image.open(download(cli, run, "mask.png")) as img:
        assert min(img.size) >= 160  # an 8x8 mask upscaled so it can be seen


def test_cleanse_takes_models_in_the_order_given(cleansed):
    cli, clean, poisoned, _, _, _ = cleansed
    ids = [poisoned.info.run_id, clean.info.run_id, poisoned.info.run_id]
    result = cli("cleanse", "--run", ids[0], "--run", ids[1], "--run", ids[2], "--steps", "3", "--num-images", "64")
    assert result.code == 0, result.err
    norms = pd.read_csv(download(cli, cli.runs("cleanse")[0], "norms.csv"))
    assert norms.groupby("model")["run_id"].first().tolist() == ids
