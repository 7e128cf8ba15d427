"""Curves instead of points, from sweeps: free training against m and robustness against eps
(study 1), certified accuracy across sigmas with their envelope (study 2). Every claim is
worded from intervals over seeds (studies.sweep.compare), never from one run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import figures
from ..studies import attack, smooth, sweep
from .adversarial import timing_caveat
from .document import Document, Figure, Heading, Para, Table
from .runs import KIND, Replicates, Runs, SweepRun, TrainRun, setup
from .smoothing import gaussian
from .words import model_name, short

M_METRICS = ("accuracy", "robust_accuracy", "autoattack_robust_accuracy", "train_time_s", "images_per_s")


def model_label(r: TrainRun) -> str:
    return r.settings.method + (f" m={r.settings.m}" if r.settings.method == "free" else "")


def m_curve(doc: Document, runs: Runs, fig_dir: Path) -> None:
    """Free training against m, drawn when a train sweep over m asked for it: every free run made
    like the sweep's newest (every setting but m and the seed; the newest run of each seed), each
    metric against m (mean ± sd over seeds), standard and fast training made alike as references,
    and the m = 4 against m = 7 comparison. Runs made alike outside the sweep are seeds like its own."""
    sw = runs.sweep("train", "m")
    if sw is None:
        return
    children = set(sw.table["run_id"])
    anchor = next((r for r in runs.train if r.id in children and r.settings.method == "free"), None)
    if anchor is None:
        return
    kind = setup(anchor, *KIND)
    alike = [r for r in runs.train if setup(r, *KIND) == kind]
    free = [r for r in alike if r.settings.method == "free"]
    by_m = _by(free, "m")
    ms = list(by_m)

    def has(k: Replicates, metric: str) -> bool:  # every seed measured it (AutoAttack: --eval autoattack)
        return all(np.isfinite(_metric(r, metric)) for r in k.runs)

    def cells(k: Replicates, metric: str) -> sweep.Estimate:
        return sweep.Estimate.of([_metric(r, metric) for r in k.runs])

    metrics = [x for x in M_METRICS if all(has(k, x) for k in by_m.values())]
    refs = {}
    for method in ("standard", "fast"):
        peers = [r for r in alike if r.settings.method == method]
        if peers:
            k = Replicates.of(peers)
            refs[f"{method} ({k.n} run{'s' if k.n > 1 else ''})"] = {
                x: (cells(k, x).mean, cells(k, x).std) for x in metrics if has(k, x)
            }
    figure = figures.m_curve_figure(
        np.array(ms, dtype=float),
        {x: np.array([cells(by_m[m], x).mean for m in ms]) for x in metrics},
        {x: np.array([cells(by_m[m], x).std for m in ms]) for x in metrics},
        refs,
        sweep.LABELS,
        [by_m[m].n for m in ms],
    )
    png, _ = figures.save_both(figure, fig_dir / "m-curve")
    doc.add(
        Heading("Across m and seeds: the m-curve", 2),
        Para(
            f"Free adversarial training at m = {', '.join(str(m) for m in ms)}, at {anchor.settings.epochs} epochs of "
            f"SGD budget and eps {anchor.settings.eps:.4g}: {_which(sw, by_m, children, 'm')}; every value is the "
            "mean ± standard deviation over seeds. Standard and fast training runs made alike "
            "are drawn as references."
        ),
        Figure(
            png,
            f"Free training against m ({figures.over_seeds([k.n for k in by_m.values()])}); dashed: references",
            0.95,
        ),
        Table(
            ["m", *(sweep.label(k) for k in metrics), "seeds"],
            [
                [str(m), *(cells(k, x).text(1 if x.endswith("_s") else 4) for x in metrics), str(k.n)]
                for m, k in by_m.items()
            ],
        ),
    )
    lo, hi = (4, 7) if {4, 7} <= set(ms) else (ms[0], ms[-1])
    if lo == hi:
        return
    claims = [
        sweep.compare(cells(by_m[lo], x), cells(by_m[hi], x), sweep.label(x), 1 if x.endswith("_s") else 4)
        for x in metrics
    ]
    doc.add(Para(f"From m = {lo} to m = {hi}: " + "; ".join(claims) + "."))
    if "train_time_s" in metrics:
        doc.add(Para(_timing_caveat([r for k in by_m.values() for r in k.runs])))


def _by(runs: list, axis: str) -> dict:
    """Runs of one setup but `axis`, by its value (ascending): the newest run of each seed."""
    values = sorted({getattr(r.settings, axis) for r in runs})
    return {v: Replicates.of([r for r in runs if getattr(r.settings, axis) == v]) for v in values}


def _which(sw: SweepRun, groups: dict, children: set[str], axis: str) -> str:
    """Which runs a curve draws: 'the runs of sweep X and 2 more made alike (...), the newest of each
    seed (m = 4: seeds 0-2; ...)', the runs from outside the sweep's `children` counted."""
    outside = {r.id for k in groups.values() for r in k.runs} - children
    more = (
        f" and {len(outside)} more made alike (every setting but {axis} and the seed as the sweep's)" if outside else ""
    )
    seeds = "; ".join(f"{axis} = {v:g}: {k.seeds}" for v, k in groups.items())
    return f"the runs of sweep {short(sw.id)}{more}, the newest of each seed ({seeds})"


def _metric(r: TrainRun, key: str) -> float:
    for record in (r.training, r.robustness, r.autoattack):
        if record is not None and hasattr(record, key):
            return float(getattr(record, key))
    return float("nan")


def _timing_caveat(runs: list[TrainRun]) -> str:
    """What wall-clock times can support: say where they ran, that steps and images/s are the
    fairer measure, and why they cannot be compared where they cannot (adversarial.timing_caveat)."""
    hosts = sorted({r.host for r in runs if r.host})
    where = (
        f"on one host ({hosts[0]})"
        if len(hosts) == 1
        else f"on {len(hosts)} hosts ({', '.join(hosts)}): times compare only within a host"
    )
    text = (
        f"Training times are wall-clock seconds of runs {where}; other work on the machine changes them, so the SGD "
        "steps (equal at equal budget) and the images per second are the fairer measure of cost, and a time "
        "difference within seed noise says nothing."
    )
    warning = timing_caveat(runs)
    return text + (f" {warning}" if warning else "")


def robustness_curves(doc: Document, runs: Runs, fig_dir: Path) -> None:
    """The newest attack sweep over eps: robust accuracy against eps per kind of model (models
    trained with other seeds are replicates), and the area under each curve."""
    sw = runs.sweep("attack", "eps")
    if sw is None:
        return
    trains = {r.id: r for r in runs.train}
    points = []
    for _, row in sw.table.iterrows():
        model = str(row.get("model_run", sw.param("model_run")))
        made = trains.get(model)
        points.append(
            {
                "curve": model_label(made) if made else model_name(model),
                "replicate": f"{model}-{row.get('seed', 0)}",
                "eps": row["eps"],
                "accuracy": row["accuracy"],
                "robust_accuracy": row["robust_accuracy"],
                "autoattack_robust_accuracy": row.get("autoattack_robust_accuracy"),
            }
        )
    table = attack.curves(points)
    png, _ = figures.save_both(figures.robustness_curves_figure(table), fig_dir / "robustness-curves")
    eps = sorted(e for e in table["eps"].unique() if e > 0)
    doc.add(
        Heading("Robustness curves", 2),
        Para(
            f"Sweep {short(sw.id)} attacked each model at eps = {', '.join(f'{e:g}' for e in eps)} "
            f"(PGD-{sw.param('pgd_steps')}"
            f"{', and AutoAttack' if 'autoattack' in set(table['attack']) else ''}); eps 0 is clean accuracy. The eps "
            "of one model "
            "share their work: an adversarial example found inside a smaller ball lies inside every larger one, so an "
            "example broken "
            "at one eps is counted broken at the next without being attacked again, and each point is the worst case "
            "over the eps "
            "up to it. Models of one kind trained with other seeds are replicates (mean ± sd); AUC is the area under "
            "the curve "
            "divided by the largest eps: the mean robust accuracy over the range."
        ),
        Figure(png, "Robust accuracy against eps, per kind of model (solid: PGD, dashed: AutoAttack)", 0.75),
    )
    rows = []
    for (curve, atk), part in table.groupby(["curve", "attack"], sort=False):
        n = int(part["replicates"].max())
        at = {
            e: sweep.Estimate(m, s, n).text()
            for e, m, s in zip(part["eps"], part["robust_accuracy_mean"], part["robust_accuracy_sd"])
        }
        rows.append(
            [
                curve,
                "PGD" if atk == "pgd" else "AutoAttack",
                str(n),
                sweep.Estimate(part["auc"].iloc[0], part["auc_sd"].iloc[0], n).text(),
                *(at.get(e, "–") for e in eps),
            ]
        )
    doc.add(Table(["model", "attack", "replicates", "AUC", *(f"eps {e:g}" for e in eps)], rows))
    pgd = table[table["attack"] == "pgd"].drop_duplicates("curve").sort_values("auc", ascending=False)
    if len(pgd) >= 2:
        best, second = pgd.iloc[0], pgd.iloc[1]
        a = sweep.Estimate(second["auc"], second["auc_sd"], int(second["replicates"]))
        b = sweep.Estimate(best["auc"], best["auc_sd"], int(best["replicates"]))
        doc.add(
            Para(
                f"Under PGD the largest area is {best['curve']}'s; against the next, {second['curve']}: "
                + sweep.compare(a, b, "the AUC")
                + "."
            )
        )


def sigma_curves(doc: Document, runs: Runs, fig_dir: Path) -> None:
    """Certified accuracy against radius per σ, drawn when a smoothing sweep over σ asked for it:
    every run made like the sweep's newest Gaussian-trained one (every setting but σ and the seed;
    the newest of each seed), the mean over seeds with a band of one sd, their envelope, and the
    ACR per σ. Runs made alike outside the sweep are seeds like its own."""
    sw = runs.sweep("smooth", "sigma")
    if sw is None:
        return
    children = set(sw.table["run_id"])
    anchor = next((r for r in runs.smooth if r.id in children and gaussian(r)), None)
    if anchor is None:  # other training methods have their own figures
        return
    kind = setup(anchor, "sigma")
    alike = [r for r in runs.smooth if setup(r, "sigma") == kind]
    by_sigma = _by(alike, "sigma")
    named = [
        (smooth.cell_label(r.settings, ["sigma"]), r.table["radius"].to_numpy(), r.table["correct"].to_numpy())
        for k in by_sigma.values()
        for r in k.runs
    ]
    grid, curves, envelope = smooth.bands(named)
    png, _ = figures.save_both(
        figures.certified_accuracy_bands_figure(grid, curves, envelope), fig_dir / "certified-accuracy-by-sigma"
    )
    doc.add(
        Heading("Across sigmas and seeds: the envelope", 2),
        Para(
            f"Trained and certified at σ = {', '.join(f'{x:g}' for x in by_sigma)}: "
            f"{_which(sw, by_sigma, children, 'σ')}; the curves are the mean certified accuracy over seeds with a band "
            "of one standard deviation, and the "
            "envelope is the best σ at each radius, as Cohen et al. plot it."
        ),
        Figure(png, "Certified accuracy against L2 radius per σ, with the envelope", 0.7),
        Table(
            ["σ", "ACR", "seeds", "best σ between radii"],
            [
                [name, sweep.Estimate(c.acr, c.acr_sd, c.seeds).text(), str(c.seeds), _where_best(grid, curves, name)]
                for name, c in curves.items()
            ],
        ),
    )


def _where_best(grid: np.ndarray, curves: dict, name: str) -> str:
    """The radii where `name` is the envelope (ties to the smaller σ): 'a to b', one stretch per
    stretch of the grid where it leads ('0.000 to 0.046, 0.059 to 0.079'), 'at a' for one point."""
    names = list(curves)
    stack = np.stack([curves[n].mean for n in names])
    best = (stack.argmax(0) == names.index(name)) & (stack.max(0) > 0)
    idx = np.flatnonzero(best)
    if not len(idx):
        return "–"
    stretches = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    return ", ".join(
        f"at {grid[s[0]]:.3f}" if len(s) == 1 else f"{grid[s[0]]:.3f} to {grid[s[-1]]:.3f}" for s in stretches
    )
