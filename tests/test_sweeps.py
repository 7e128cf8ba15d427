"""Sweeps: the expansion of lists x seeds (a pure function), the aggregate a parent holds, the
wording of a comparison from intervals, robustness curves; then one real sweep and one curve
through the CLI."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from twml_cli import config, figures
from twml_cli.studies import attack, smooth, sweep

PRESET = config.load_preset()


def test_expand_is_the_product_with_the_seed_innermost():
    cells = config.expand({"seed": [0, 1], "m": [4, 7], "eps": [0.1, 0.2]})
    assert cells[:3] == [
        {"m": 4, "eps": 0.1, "seed": 0},
        {"m": 4, "eps": 0.1, "seed": 1},
        {"m": 4, "eps": 0.2, "seed": 0},
    ]
    assert len(cells) == 8 and len({tuple(sorted(c.items())) for c in cells}) == 8
    assert config.expand({}) == [{}]


def test_lists_and_seeds_on_any_command():
    cells = config.resolve("train", PRESET, {"method": "free", "m": [1, 2, 4, 7], "seed": [0, 1, 2]})
    assert [(s.m, s.seed) for s in cells] == [(m, seed) for m in (1, 2, 4, 7) for seed in (0, 1, 2)]
    assert config.swept(cells) == ["m", "seed"]
    assert [s.eps for s in config.resolve("train", PRESET, {"eps": [0.2, 0.05, 0.1, 0.05]})] == [
        0.05,
        0.1,
        0.2,
    ]  # once each, ascending
    assert [s.sigma for s in config.resolve("smooth", PRESET, {"sigma": [0.12, 0.25, 0.5]})] == [0.12, 0.25, 0.5]
    assert len(config.resolve("cleanse", PRESET, {"seed": [0, 1]})) == 2


def test_a_setting_that_does_not_apply_makes_no_new_cell():
    cells = config.resolve("train", PRESET, {"method": ["standard", "free", "fast"], "m": [4, 7]})
    assert [(s.method, s.m if s.method == "free" else None) for s in cells] == [
        ("standard", None),
        ("free", 4),
        ("free", 7),
        ("fast", None),
    ]


def test_lists_are_refused_where_a_sweep_makes_no_sense():
    with pytest.raises(Exception, match="device takes one value"):
        config.resolve("train", PRESET, {"device": ["cpu", "cuda"]})
    with pytest.raises(Exception, match=r"m \(replays per minibatch\) must be >= 1, got 0"):
        config.resolve("train", PRESET, {"method": "free", "m": [4, 0]})  # every cell is checked before any run


def test_names_of_children_and_parent():
    cells = config.resolve("train", PRESET, {"method": "free", "m": [4, 7], "seed": [0, 1]})
    axes = config.swept(cells)
    assert sweep.child_name("free-m4", sweep.cell_values(cells[1], axes)) == "free-m4 seed=1"
    assert sweep.child_name("sigma=0.25", {"sigma": 0.25, "seed": 2}) == "sigma=0.25 seed=2"
    # a smoothing sweep over how the base was trained names each training alike, the default's too
    smoothed = config.resolve("smooth", PRESET, {"sigma": 0.05, "training": ["gaussian", "consistency"], "seed": [0]})
    assert [sweep.child_name(smooth.run_name(s), sweep.cell_values(s, config.swept(smoothed))) for s in smoothed] == [
        "gaussian sigma=0.05",
        "consistency sigma=0.05",
    ]
    assert sweep.parent_name("train", cells, axes) == "train: m 4, 7 x seed 0, 1"
    params = sweep.parent_params("train", cells, axes)
    assert params["m"] == [4, 7] and params["seed"] == [0, 1] and params["swept"] == "m,seed" and params["cells"] == 4
    assert params["method"] == "free" and params["epochs"] == 28


def test_a_setting_a_cell_lacks_is_left_out_of_its_name_row_summary_and_figure():
    """`--method standard,free --m 4,7`: standard training has no m. Its runs were named 'standard
    m=4 seed=0', its row and summary line said m=4, and the figure drew it on the m=4 line."""
    from twml_cli.studies import train

    cells = config.resolve("train", PRESET, {"method": ["standard", "free"], "m": [4, 7], "seed": [0, 1]})
    axes = config.swept(cells)
    names = [sweep.child_name(train.run_name(c), sweep.cell_values(c, axes)) for c in cells]
    assert names == ["standard seed=0", "standard seed=1", "free-m4 seed=0", "free-m4 seed=1"] + [
        "free-m7 seed=0",
        "free-m7 seed=1",
    ]
    frame = sweep.table(cells, axes, list("abcdef"), [{"accuracy": 0.90 + i / 100} for i in range(6)])
    assert list(frame.columns[:4]) == ["method", "m", "seed", "run_id"] and frame["m"].isna().tolist()[:3] == [
        True,
        True,
        False,
    ]
    agg = sweep.aggregate(frame, axes)
    assert [line.split(":")[0].strip() for line in sweep.summary_lines("train", agg, axes)] == [
        "method=standard",
        "method=free, m=4",
        "method=free, m=7",
    ]
    fig = figures.sweep_figure(agg, ["method", "m"], ["accuracy"], sweep.LABELS, "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["standard", "free m=4", "free m=7"]
    (points,) = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(points.get_xdata()) == 3 and points.get_linestyle() == "None"  # categories: not joined as a trend


def test_aggregate_from_known_child_metrics():
    cells = config.resolve("train", PRESET, {"method": "free", "m": [4, 7], "seed": [0, 1, 2]})
    metrics = [
        {"accuracy": a, "robust_accuracy": r}
        for a, r in [(0.9, 0.5), (0.8, 0.6), (0.7, 0.7), (1.0, 0.1), (1.0, 0.2), (1.0, 0.3)]
    ]
    frame = sweep.table(cells, ["m", "seed"], [f"id{i}" for i in range(6)], metrics)
    assert list(frame.columns) == ["m", "seed", "run_id", "accuracy", "robust_accuracy"] and len(frame) == 6
    agg = sweep.aggregate(frame, ["m", "seed"])
    assert agg["m"].tolist() == [4, 7]
    assert agg["accuracy_mean"].tolist() == pytest.approx([0.8, 1.0])
    assert agg["accuracy_std"].tolist() == pytest.approx([0.1, 0.0])  # sample standard deviation (ddof 1)
    assert agg["robust_accuracy_std"].tolist() == pytest.approx([0.1, 0.1])
    assert agg["accuracy_n"].tolist() == [3, 3]
    lines = sweep.summary_lines("train", agg, ["m", "seed"])
    assert lines[0] == "  m=4: clean accuracy 0.8000 ± 0.1000; PGD robust accuracy 0.6000 ± 0.1000 (3 seeds)"


def test_seeds_alone_aggregate_into_one_cell():
    cells = config.resolve("smooth", PRESET, {"sigma": 0.25, "seed": [0, 1]})
    agg = sweep.aggregate(sweep.table(cells, ["seed"], ["a", "b"], [{"accuracy": 0.5}, {"accuracy": 0.7}]), ["seed"])
    assert len(agg) == 1 and agg["accuracy_mean"].iloc[0] == pytest.approx(0.6) and agg["accuracy_n"].iloc[0] == 2


def test_comparisons_are_worded_from_the_intervals():
    a, b = sweep.Estimate(0.70, 0.01, 3), sweep.Estimate(0.64, 0.02, 3)
    assert "fell from 0.7000 ± 0.0100 to 0.6400 ± 0.0200" in sweep.compare(a, b, "robust accuracy")
    assert "rose" in sweep.compare(b, a, "robust accuracy")
    close = sweep.compare(sweep.Estimate(0.70, 0.03, 3), sweep.Estimate(0.68, 0.02, 3), "robust accuracy")
    assert "within seed noise" in close and "fell" not in close and "rose" not in close
    assert "one seed" in sweep.compare(sweep.Estimate(0.7, 0.0, 1), sweep.Estimate(0.1, 0.0, 1), "x")


def test_the_difference_interval_is_welchs_and_narrows_with_seeds():
    """The verdict is Welch's two-sample t test at 5%: on random samples, direction() names a
    direction exactly where scipy's test rejects equal means, and the interval's centre is the
    difference. Means and spreads of free m = 4 and m = 7 over 10 seeds of the default (robust
    accuracy 0.6883 ± 0.0336 and 0.6422 ± 0.0412): the same spreads from 3 seeds cannot tell the
    two apart, 10 seeds can; intervals of mean ± sd overlap at any number of seeds."""
    from scipy.stats import ttest_ind

    rng = np.random.default_rng(0)
    for _ in range(200):
        n1, n2 = rng.integers(2, 8, size=2)
        x, y = rng.normal(0, 1, n1), rng.normal(rng.normal(0, 1.5), rng.uniform(0.2, 2), n2)
        a, b = sweep.Estimate.of(x), sweep.Estimate.of(y)
        d = sweep.difference(a, b)
        assert d.value == pytest.approx(y.mean() - x.mean()) and d.low < d.value < d.high
        p = ttest_ind(y, x, equal_var=False).pvalue
        if abs(p - 0.05) > 1e-6:
            assert (sweep.direction(a, b) is not None) == (p < 0.05)
    m4, m7 = sweep.Estimate(0.6883, 0.0336, 3), sweep.Estimate(0.6422, 0.0412, 3)
    assert sweep.direction(m4, m7) is None
    m4, m7 = sweep.Estimate(0.6883, 0.0336, 10), sweep.Estimate(0.6422, 0.0412, 10)
    assert sweep.direction(m4, m7) == "fell"
    assert m4.mean - m4.std < m7.mean + m7.std  # the mean ± sd intervals still overlap
    assert "(mean ± sd over 10 seeds; difference -0.0461, 95% interval -0.0815 to -0.0107)" in sweep.compare(
        m4, m7, "robust accuracy"
    )


def test_area_under_a_robustness_curve():
    assert attack.area(np.array([0.0, 0.1, 0.2]), np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert attack.area(np.array([0.0, 0.05, 0.2]), np.array([0.8, 0.8, 0.8])) == pytest.approx(0.8)


def test_curves_start_at_clean_accuracy_and_average_replicates():
    points = [
        {
            "curve": "m1",
            "replicate": seed,
            "eps": eps,
            "accuracy": 0.9,
            "robust_accuracy": r,
            "autoattack_robust_accuracy": None,
        }
        for (eps, seed), r in zip([(0.05, 0), (0.05, 1), (0.1, 0), (0.1, 1)], [0.6, 0.8, 0.2, 0.4])
    ]
    table = attack.curves(points)
    assert table["eps"].tolist() == [0.0, 0.05, 0.1] and set(table["attack"]) == {"pgd"}
    assert table["robust_accuracy_mean"].tolist() == pytest.approx([0.9, 0.7, 0.3])
    assert table["robust_accuracy_sd"].tolist()[1] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    aucs = [
        (0.05 * (0.9 + 0.6) / 2 + 0.05 * (0.6 + 0.2) / 2) / 0.1,
        (0.05 * (0.9 + 0.8) / 2 + 0.05 * (0.8 + 0.4) / 2) / 0.1,
    ]
    assert table["auc"].iloc[0] == pytest.approx(np.mean(aucs)) and table["auc_sd"].iloc[0] == pytest.approx(
        np.std(aucs, ddof=1)
    )


def test_the_robustness_figure_tells_pgd_from_autoattack_by_line_and_marker():
    """Each attack's curve has its own line style and marker, so their legend entries differ
    (dashes alone did not show in a legend handle of two ems)."""
    points = [
        {
            "curve": "m1",
            "replicate": 0,
            "eps": eps,
            "accuracy": 0.9,
            "robust_accuracy": r,
            "autoattack_robust_accuracy": a,
        }
        for eps, r, a in [(0.05, 0.6, 0.5), (0.1, 0.2, 0.1)]
    ]
    fig = figures.robustness_curves_figure(attack.curves(points))
    (ax,) = fig.axes
    styles = {c.get_label().split(", ")[1].split(" ")[0]: c.lines[0] for c in ax.containers}  # errorbar: data line
    pgd, autoattack = styles["PGD"], styles["AutoAttack"]
    assert pgd.get_linestyle() != autoattack.get_linestyle() and pgd.get_marker() != autoattack.get_marker()
    assert ax.get_legend().handlelength >= 3
    figures.plt.close(fig)


# ---------------------------------------------------------------- through the CLI


def test_a_sweep_through_the_cli(module_cli):
    result = module_cli("train", "--free", "--m", "1,2", "--seed", "0,1", "--epochs", "2", "--pgd-steps", "1")
    assert result.code == 0, result.err
    (parent,) = module_cli.runs("sweep")
    assert parent.data.params["sweep_command"] == "train" and parent.data.params["swept"] == "m,seed"
    children = [r for r in module_cli.runs("train") if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted((r.data.params["m"], r.data.params["seed"]) for r in children) == [
        ("1", "0"),
        ("1", "1"),
        ("2", "0"),
        ("2", "1"),
    ]
    assert sorted(r.info.run_name for r in children) == [
        "free-m1 seed=0",
        "free-m1 seed=1",
        "free-m2 seed=0",
        "free-m2 seed=1",
    ]
    frame = pd.read_csv(module_cli.download(parent, "sweep.csv"))
    agg = pd.read_csv(module_cli.download(parent, "sweep-aggregate.csv"))
    assert len(frame) == 4 and agg["m"].tolist() == [1, 2] and agg["accuracy_n"].tolist() == [2, 2]
    by_id = {r.info.run_id: r for r in children}
    for m, part in frame.groupby("m"):
        logged = [by_id[i].data.metrics["robust_accuracy"] for i in part["run_id"]]
        assert agg.loc[agg["m"] == m, "robust_accuracy_mean"].iloc[0] == pytest.approx(np.mean(logged))
        assert agg.loc[agg["m"] == m, "robust_accuracy_std"].iloc[0] == pytest.approx(np.std(logged, ddof=1))
    assert {"sweep.png", "sweep.pdf", "sweep.csv", "sweep-aggregate.csv"} <= module_cli.artifacts(parent)
    assert f"Sweep run id: {parent.info.run_id}" in result.out and "(2 seeds)" in result.out
    assert "Sweep of 4 runs over m, seed (mean ± sd over 2 seeds):" in result.out
    listed = module_cli("runs").out  # names whole: the seed is what tells a sweep's runs apart
    assert "train: m 1, 2 x seed 0, 1 " in listed and all(f"  {r.info.run_name}  " in listed for r in children)
    header = ["status", "command", "run name", "started (UTC)", "run id"]  # 2 spaces apart: a name's 1 stays in it
    assert re.split(r" {2,}", listed.splitlines()[0]) == header


def test_a_robustness_curve_through_the_cli(module_cli):
    model = module_cli.runs("train")[0].info.run_id
    result = module_cli("attack", "--run", model, "--eps", "0.1,0,0.05", "--num-examples", "90", "--pgd-steps", "5")
    assert result.code == 0, result.err
    parent = next(r for r in module_cli.runs("sweep") if r.data.params["sweep_command"] == "attack")
    curve = pd.read_csv(module_cli.download(parent, "robustness-curves.csv"))
    assert curve["eps"].tolist() == [0.0, 0.05, 0.1]
    assert "Sweep of 3 runs over eps (one seed):" in result.out  # no spread to show from one seed
    robust = curve["robust_accuracy_mean"].to_numpy()
    assert np.all(np.diff(robust) <= 0) and robust[-1] < robust[0]  # never rises with eps, and falls
    children = sorted(
        (r for r in module_cli.runs("attack") if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: float(r.data.params["eps"]),
    )
    at_zero = children[0].data.metrics
    assert at_zero["robust_accuracy"] == at_zero["accuracy"] == pytest.approx(robust[0])  # eps 0: nothing to attack
    table = pd.read_csv(module_cli.download(children[2], "attack-examples.csv"))
    assert len(table) == 90 and table["idx"].tolist() == sorted(table["idx"]) and table["idx"].iloc[-1] == 359
    assert set(table.columns) >= {"label", "clean_pred", "clean_margin", "pgd_robust", "pgd_margin", "pgd_reused"}
    assert (
        table["pgd_reused"].sum() == children[2].data.metrics["reused_broken"] > 0
    )  # broken at 0.05: not attacked again
    assert ((table["clean_margin"] > 0) == (table["clean_pred"] == table["label"])).all()


def test_a_cleanse_sweep_through_the_cli(module_cli):
    if not module_cli.runs("train"):  # run alone, without the sweep above
        assert module_cli("train", "--epochs", "1", "--pgd-steps", "1").code == 0
    model = module_cli.runs("train")[0].info.run_id
    result = module_cli(
        "cleanse", "--run", model, "--search-restarts", "1,2", "--search-steps", "3", "--search-images", "40"
    )
    assert result.code == 0, result.err
    parent = next(r for r in module_cli.runs("sweep") if r.data.params["sweep_command"] == "cleanse")
    children = [r for r in module_cli.runs("cleanse") if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["search_restarts"] for r in children) == ["1", "2"]
    assert all(r.data.params["model0"] == model for r in children)  # both cells inspect the same model
    frame = pd.read_csv(module_cli.download(parent, "sweep.csv"))
    assert sorted(frame["search_restarts"]) == [1, 2] and "model0_accuracy" in frame.columns
