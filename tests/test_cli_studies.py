"""`twml smooth`, `twml backdoor` and `twml cleanse` end to end: what their runs log on the
embedded default (read from the shared `twml reproduce`), their findings, and bad input."""

import os

import numpy as np
import pandas as pd
import pytest

from twml_cli import findings, results

SMOOTH_METRICS = {
    "accuracy",
    "certified_accuracy",
    "abstain_rate",
    "average_certified_radius",
    "certify_time_s",
    "samples_per_s",
    "train_time_s",
    "train_loss",
    "certified_accuracy_r0.25",
}
SMOOTH_ARTIFACTS = {
    "certify.csv",
    "certified-accuracy-vs-radius.csv",
    "randomized-smoothing-acc-vs-radius.pdf",
    "randomized-smoothing-acc-vs-radius.png",
    "config.json",
}


def test_smooth_logs_every_metric_and_artifact(reproduced):
    cli, runs = reproduced.cli, reproduced.smooth
    assert sorted(runs) == [0.05, 0.2]
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags["twml.command"] == "smooth"
        p = run.data.params
        assert (p["n0"], p["n"], p["cert_alpha"], p["num_examples"], p["method"]) == (
            "100",
            "1000",
            "0.001",
            "360",
            "noise",
        )
        assert {"epochs", "batch_size", "lr", "model", "dataset", "seed"} <= set(p)
        assert "pgd_steps" not in p and "m" not in p  # not smoothing's settings
        given = os.environ.get("OMP_NUM_THREADS")  # else training on one thread, certification on the cores
        assert (p["threads"], p["eval_threads"]) == (given or "1", given or str(len(os.sched_getaffinity(0))))
        assert SMOOTH_METRICS <= set(run.data.metrics)
        assert SMOOTH_ARTIFACTS <= cli.artifacts(run)
        table = pd.read_csv(cli.download(run, "certify.csv"))
        assert (
            list(table.columns) == ["idx", "label", "predict", "radius", "correct", "time_s", "samples"]
            and len(table) == 360
        )
        assert (table["samples"] == 1100).all()  # n0 + n for every image of fixed-n CERTIFY
        m = run.data.metrics
        assert m["certified_accuracy"] == pytest.approx(table["correct"].mean())
        assert m["abstain_rate"] == pytest.approx((table["predict"] == -1).mean())
        assert m["average_certified_radius"] == pytest.approx(np.where(table["correct"], table["radius"], 0).mean())
        assert not table.loc[table["predict"] == -1, "correct"].any()
        curve = pd.read_csv(cli.download(run, "certified-accuracy-vs-radius.csv"))
        assert list(curve.columns) == ["radius", "certified_accuracy"]
        assert curve["certified_accuracy"].iloc[0] == pytest.approx(m["certified_accuracy"])
        assert np.all(np.diff(curve["certified_accuracy"]) <= 0)


def test_larger_sigma_certifies_larger_radii_and_falls_more_slowly(reproduced):
    small, large = (reproduced.smooth[s].data.metrics for s in (0.05, 0.2))
    checks = findings.smoothing(
        results.read(small, results.CertificationMetrics, "sigma 0.05"),
        results.read(large, results.CertificationMetrics, "sigma 0.2"),
        small["certified_accuracy_r0.25"],
        large["certified_accuracy_r0.25"],
    )
    assert all(c.ok for c in checks), [str(c) for c in checks]


def test_smooth_console_names_each_sigma(reproduced):
    out = reproduced.result.out
    for sigma, run in reproduced.smooth.items():
        assert f"sigma = {sigma:g}:" in out and f"Run id: {run.info.run_id}" in out
    assert "Certified accuracy: r=0:" in out and "Abstain rate:" in out


def test_smooth_certifies_a_given_model(reproduced):
    cli, source = reproduced.cli, reproduced.smooth[0.2]
    result = cli(
        "smooth",
        "--sigma",
        "0.25",
        "--run",
        source.info.run_id,
        "--n",
        "200",
        "--num-examples",
        "20",
        "--experiment",
        "given",
    )
    assert result.code == 0, result.err
    (run,) = cli.runs("smooth", experiment="given")
    assert run.data.params["model_run"] == source.info.run_id and run.data.params["sigma"] == "0.25"
    assert run.data.params["dataset"] == "digits" and "method" not in run.data.params
    assert cli.logged_model(run) is None  # it certified, it did not train
    assert run.data.metrics["accuracy"] == source.data.metrics["accuracy"]


def test_backdoor_keeps_accuracy_and_the_trigger_works(reproduced):
    cli, run = reproduced.cli, reproduced.backdoor
    p, m = run.data.params, run.data.metrics
    assert run.data.tags["twml.command"] == "backdoor"
    assert (p["target"], p["poison_rate"], p["trigger_size"], p["position"], p["poisoned_images"]) == (
        "0",
        "0.1",
        "1",
        "bottom-right",
        "144",
    )
    assert {"example.png", "example-clean.png", "example-triggered.png"} <= cli.artifacts(
        run
    ) and "model.safetensors" in cli.model_files(run)
    assert (
        f"Attack success rate (triggered test images not of class 0): {m['attack_success_rate']:.4f}"
        in reproduced.result.out
    )


def test_cleanse_flags_exactly_the_backdoored_model_at_its_target(reproduced):
    cli, run, clean, poisoned = reproduced.cli, reproduced.cleanse, reproduced.standard, reproduced.backdoor
    assert run.data.params["model0"] == clean.info.run_id and run.data.params["model1"] == poisoned.info.run_id
    norms = pd.read_csv(cli.download(run, "norms.csv"))
    assert list(norms.columns[:6]) == ["model", "run_id", "class", "norm", "anomaly_index", "flagged"]
    assert len(norms) == 20
    flagged = norms[norms["flagged"]]
    assert flagged[["model", "class"]].values.tolist() == [[1, 0]]
    m = run.data.metrics
    checks = findings.neural_cleanse(
        clean.data.metrics["accuracy"],
        results.read(poisoned.data.metrics, results.BackdoorMetrics, "backdoor"),
        run.data.tags["twml.verdict"],
        0,
        m.get("backdoor_success_rate"),
    )
    assert all(c.ok for c in checks), [str(c) for c in checks]
    assert m["model1_anomaly_index"] > 2 >= m["model0_anomaly_index"]
    assert (
        m["model0_accuracy"] == clean.data.metrics["accuracy"]
        and m["model1_accuracy"] == poisoned.data.metrics["accuracy"]
    )
    out = reproduced.result.out
    assert "Backdoor is at model 1 class 0" in out
    assert f"Backdoor success rate: {m['backdoor_success_rate']:.4f}" in out
    assert (
        f"Accuracy of model 0 (run {clean.info.run_id[:8]}): {m['model0_accuracy']:.4f}" in out
    )  # which run model 0 is
    norm = norms[(norms["model"] == 1) & (norms["class"] == 3)]["norm"].iloc[0]
    assert f"Norm of trigger targeting class 3 in model 1: {norm:.4f}" in out


def test_cleanse_logs_every_image(reproduced):
    cli, run = reproduced.cli, reproduced.cleanse
    files = cli.artifacts(run)
    for i in (0, 1):
        for c in range(10):
            assert f"masks/model{i}_class{c}_mask.png" in files and f"triggers/model{i}_class{c}_trigger.png" in files
    assert {"norms.csv", "norms.png", "mask-grid.png", "trigger.png", "mask.png", "reversed-triggers.npz"} <= files
    assert {"backdoor/model1_class0/trigger.png", "backdoor/model1_class0/mask.png"} <= files
    from PIL import Image

    with Image.open(cli.download(run, "mask.png")) as img:
        assert min(img.size) >= 160  # an 8x8 mask upscaled so it can be seen
    with np.load(cli.download(run, "reversed-triggers.npz"), allow_pickle=False) as z:
        assert z["model1_masks"].shape == (10, 8, 8) and z["model1_patterns"].shape == (10, 1, 8, 8)
        # the second search's triggers too (twml mitigate stamps both), found apart from the first's
        assert z["model1_search1_masks"].shape == (10, 8, 8) and z["model1_search1_patterns"].shape == (10, 1, 8, 8)
        assert not np.array_equal(z["model1_search1_masks"], z["model1_masks"]) and "model1_search2_masks" not in z


def test_cleanse_takes_models_in_the_order_given(reproduced):
    cli = reproduced.cli
    ids = [reproduced.backdoor.info.run_id, reproduced.standard.info.run_id, reproduced.backdoor.info.run_id]
    args = [a for i in ids for a in ("--run", i)]
    result = cli("cleanse", *args, "--search-steps", "3", "--search-images", "64", "--experiment", "order")
    assert result.code == 0, result.err
    (run,) = cli.runs("cleanse", experiment="order")
    assert (run.data.params["search_steps"], run.data.params["search_images"]) == ("3", "64")
    norms = pd.read_csv(cli.download(run, "norms.csv"))
    assert norms.groupby("model")["run_id"].first().tolist() == ids
