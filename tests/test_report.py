"""`twml reproduce` and `twml report`: the write-up states what MLflow holds."""

import re

import pandas as pd
import pytest

from twml_cli.report import _thin_margin, change


@pytest.fixture(scope="module")
def reproduced(module_cli):
    result = module_cli("reproduce")
    assert result.code == 0, result.err
    return module_cli, result


def test_reproduce_logs_every_step_as_its_own_run(reproduced):
    cli, result = reproduced
    runs = cli.runs()
    assert all(r.info.status == "FINISHED" for r in runs)
    commands = sorted(r.data.tags["twml.command"] for r in runs)
    assert commands == ["backdoor", "cleanse", "report", "smooth", "smooth", "train", "train", "train"]
    trains = {(r.data.params["method"], r.data.params["m"]): r for r in cli.runs("train")}
    assert set(trains) == {("standard", "1"), ("free", "4"), ("free", "7")}
    assert sorted(r.data.params["sigma"] for r in cli.runs("smooth")) == ["0.05", "0.2"]
    cleanse = cli.runs("cleanse")[0]
    assert cleanse.data.params["model0"] == trains[("standard", "1")].info.run_id
    assert cleanse.data.params["model1"] == cli.runs("backdoor")[0].info.run_id
    assert "[7/7] report" in result.out and "Report: reports/twml.md and reports/twml.pdf" in result.out
    assert "mlflow ui" in result.out


def test_report_states_the_logged_numbers(reproduced):
    cli, _ = reproduced
    md = (cli.path / "reports" / "twml.md").read_text()
    for r in cli.runs("train"):
        row = next(line for line in md.splitlines() if line.endswith(f"| {r.info.run_id[:8]} |"))
        for key in ("accuracy", "pgd_success_rate", "robust_accuracy"):
            assert f"| {r.data.metrics[key]:.4f} |" in row
    trains = {r.data.params["m"]: r.data.metrics for r in cli.runs("train")}
    std, free4, free7 = trains["1"], trains["4"], trains["7"]
    # the sentences agree with the numbers, direction included
    assert f"benign accuracy {change(std['accuracy'], free4['accuracy'])}" in md
    assert f"PGD {change(std['pgd_success_rate'], free4['pgd_success_rate'])}" in md
    assert "From m = 4 to m = 7" in md and f"benign accuracy {change(free4['accuracy'], free7['accuracy'])}" in md
    assert f"standard training: **{std['train_time_s']:.1f} s**" in md
    for r in cli.runs("smooth"):
        assert f"{r.data.metrics['average_certified_radius']:.4f}" in md
    cleanse = cli.runs("cleanse")[0]
    norms = pd.read_csv(cli.client().download_artifacts(cleanse.info.run_id, "norms.csv"))
    for value in norms["norm"]:
        assert f"{value:.4f}" in md
    assert "**Backdoor is at model 1 class 0**" in md
    assert f"sends {cleanse.data.metrics['backdoor_success_rate']:.4f} of them to class 0" in md
    assert "The verdict names that model and class." in md
    index = cleanse.data.metrics["model1_anomaly_index"]
    assert ("is a thin margin" in md) == (index < 3.0)  # 1.5 x the threshold of 2
    for run_id in (r.info.run_id for r in cli.runs() if r.data.tags["twml.command"] != "report"):
        assert run_id in md  # every number links back to its run


def test_report_files_embed_the_figures(reproduced):
    cli, _ = reproduced
    out = cli.path / "reports"
    figures = {p.name for p in (out / "twml").iterdir()}
    assert {"randomized-smoothing-acc-vs-radius.png", "randomized-smoothing-acc-vs-radius.pdf", "adversarial-training.png",
            "cleanse-trigger.png", "cleanse-mask.png", "cleanse-mask-grid.png", "cleanse-norms.png"} <= figures  # fmt: skip
    md = (out / "twml.md").read_text()
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / name).is_file()
    pdf = (out / "twml.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Subtype /Image") >= 6
    assert b"DejaVu" in pdf  # a Unicode font, so sigma renders
    report = cli.runs("report")[0]
    assert {"twml.md", "twml.pdf", "figures/cleanse-trigger.png", "sources.json"} <= cli.artifacts(report)


def test_a_study_without_runs_gets_one_line(cli):
    assert cli("train", "--epochs", "1", "--pgd-steps", "1").code == 0
    result = cli("report", "--out", "out")
    assert result.code == 0, result.err
    md = (cli.path / "out" / "twml.md").read_text()
    assert "No finished `twml smooth` runs in this experiment: run `twml smooth --sigma 0.05 --sigma 0.20`." in md
    assert "No finished `twml cleanse` runs in this experiment" in md
    assert "This needs a standard and a free run trained alike" in md
    assert (cli.path / "out" / "twml.pdf").stat().st_size > 1000
    empty = cli("report", "--experiment", "nothing-here", "--out", "out")
    assert empty.code == 0 and "No finished runs in experiment 'nothing-here'" in (cli.path / "out" / "nothing-here.md").read_text()


def test_thin_margin_only_near_the_threshold():
    assert "2.23 against a threshold of 2 is a thin margin" in _thin_margin(2.23, 2.0)
    assert _thin_margin(3.0, 2.0) == "" and _thin_margin(5.7, 2.0) == ""


def test_change_wording():
    assert change(0.5, 0.75) == "rose from 0.5000 to 0.7500 (+25.00 points)"
    assert change(0.75, 0.5) == "fell from 0.7500 to 0.5000 (-25.00 points)"
    assert change(0.5, 0.5) == "stayed at 0.5000"
    assert change(2.0, 3.0, points=False) == "rose from 2.0000 to 3.0000 (x1.50)"
