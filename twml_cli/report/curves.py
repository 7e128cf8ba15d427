"""Curves instead of points, from sweeps: free training against m and robustness against eps
(study 1), certified accuracy across sigmas with their envelope (study 2). Every claim is
worded from intervals over seeds (studies.sweep.compare), never from one run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import figures
from ..studies import attack, smooth, sweep
from .document import Document, Figure, Heading, Para, Table
from .runs import Runs, SweepRun, TrainRun
from .smoothing import gaussian
from .words import model_name, short

M_METRICS = ("accuracy", "robust_accuracy", "autoattack_robust_accuracy", "train_time_s", "images_per_s")


def model_label(r: TrainRun) -> str:
    return r.settings.method + (f" m={r.settings.m}" if r.settings.method == "free" else "")


def _cells(frame: pd.DataFrame, metric: str) -> sweep.Estimate:
    return sweep.Estimate.of(frame[metric].dropna())


def m_curve(doc: Document, runs: Runs, fig_dir: Path) -> None:
    """The newest train sweep over m: each metric against m (mean ± sd over seeds), standard and
    fast training alike trained as references, and the m = 4 against m = 7 comparison."""
    sw = runs.sweep("train", "m")
    if sw is None:
        return
    doc.add(Heading("Across m and seeds: the m-curve", 2))
    frame = sw.table
    if "method" in frame:  # standard and fast cells have no m (an empty cell of the table)
        frame = frame[frame["method"] == "free"].astype({"m": int})
    metrics = [m for m in M_METRICS if m in frame and frame[m].notna().any()]
    ms = sorted(frame["m"].unique())
    by_m = {m: frame[frame["m"] == m] for m in ms}
    means = {k: np.array([_cells(by_m[m], k).mean for m in ms]) for k in metrics}
    sds = {k: np.array([_cells(by_m[m], k).std for m in ms]) for k in metrics}
    like = _alike(sw, runs.train)
    refs = {}
    for method in ("standard", "fast"):
        peers = pd.DataFrame([{k: _metric(r, k) for k in metrics} for r in like if r.settings.method == method])
        if len(peers):
            refs[f"{method} ({len(peers)} run{'s' if len(peers) > 1 else ''})"] = {
                k: (_cells(peers, k).mean, _cells(peers, k).std) for k in metrics
            }
    png, _ = figures.save_both(
        figures.m_curve_figure(np.array(ms, dtype=float), means, sds, refs, sweep.LABELS, sw.seeds), fig_dir / "m-curve"
    )
    n = sw.seeds
    doc.add(
        Para(
            f"Sweep {short(sw.id)} trained free adversarial training at m = {', '.join(str(m) for m in ms)} with {n} "
            f"seed{'s' if n > 1 else ''} "
            f"each, at the same {sw.param('epochs')} epochs of SGD budget and eps {float(sw.param('eps')):.4g}; every "
            "value is the mean ± standard "
            "deviation over seeds. Standard and fast training runs alike (same data, model, eps and budget) are drawn "
            "as references."
        ),
        Figure(
            png,
            f"Free training against m ({'mean ± sd over ' + str(n) + ' seeds' if n > 1 else 'one seed'}); dashed: "
            "references",
            0.95,
        ),
        Table(
            ["m", *(sweep.label(k) for k in metrics), "seeds"],
            [
                [str(m), *(_cells(by_m[m], k).text(1 if k.endswith("_s") else 4) for k in metrics), str(len(by_m[m]))]
                for m in ms
            ],
        ),
    )
    lo, hi = (4, 7) if {4, 7} <= set(ms) else (ms[0], ms[-1])
    if lo == hi:
        return
    claims = [
        sweep.compare(_cells(by_m[lo], k), _cells(by_m[hi], k), sweep.label(k), 1 if k.endswith("_s") else 4)
        for k in metrics
    ]
    doc.add(Para(f"From m = {lo} to m = {hi}: " + "; ".join(claims) + "."))
    if "train_time_s" in metrics:
        doc.add(Para(_timing_caveat(sw, runs)))


def _metric(r: TrainRun, key: str) -> float:
    for record in (r.training, r.robustness, r.autoattack):
        if record is not None and hasattr(record, key):
            return float(getattr(record, key))
    return float("nan")


def _alike(sw: SweepRun, trains: list[TrainRun]) -> list[TrainRun]:
    keys = ("dataset", "model", "eps", "epochs")
    return [
        r
        for r in trains
        if all(
            str(getattr(r.settings, k)) == sw.param(k) or _same_number(getattr(r.settings, k), sw.param(k))
            for k in keys
        )
    ]


def _same_number(a, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-12
    except (TypeError, ValueError):
        return False


def _timing_caveat(sw: SweepRun, runs: Runs) -> str:
    """What wall-clock times can support: the sweep's runs ran one after another in one process,
    on the hosts its children name; say so, and that steps and images/s are the fairer measure."""
    children = [r for r in runs.train if r.id in set(sw.table["run_id"])]
    hosts = sorted({r.host for r in children if r.host})
    where = (
        f"on one host ({hosts[0]})"
        if len(hosts) == 1
        else f"on {len(hosts)} hosts ({', '.join(hosts)}): times compare only within a host"
    )
    return (
        f"Training times are wall-clock seconds of runs made one after another {where}; other work on the machine "
        "changes "
        "them, so the SGD steps (equal at equal budget) and the images per second are the fairer measure of cost, and "
        "a "
        "time difference within seed noise says nothing."
    )


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
        at = {
            e: f"{m:.4f} ± {s:.4f}" if part["replicates"].max() > 1 else f"{m:.4f}"
            for e, m, s in zip(part["eps"], part["robust_accuracy_mean"], part["robust_accuracy_sd"])
        }
        rows.append(
            [
                curve,
                "PGD" if atk == "pgd" else "AutoAttack",
                str(int(part["replicates"].max())),
                f"{part['auc'].iloc[0]:.4f} ± {part['auc_sd'].iloc[0]:.4f}",
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
    """The newest smoothing sweep over sigma: certified accuracy against radius per sigma (mean
    over seeds, a band of one sd), their envelope, and ACR per sigma."""
    sw = runs.sweep("smooth", "sigma")
    if sw is None:
        return
    by_id = {r.id: r for r in runs.smooth}
    named = [
        (
            smooth.cell_label(by_id[i].settings, ["sigma"]),
            by_id[i].table["radius"].to_numpy(),
            by_id[i].table["correct"].to_numpy(),
        )
        for i in sw.table["run_id"]
        if i in by_id and gaussian(by_id[i])  # other training methods have their own figures
    ]
    if not named:
        return
    grid, curves, envelope = smooth.bands(named)
    png, _ = figures.save_both(
        figures.certified_accuracy_bands_figure(grid, curves, envelope), fig_dir / "certified-accuracy-by-sigma"
    )
    seeds = max(c.seeds for c in curves.values())
    doc.add(
        Heading("Across sigmas and seeds: the envelope", 2),
        Para(
            f"Sweep {short(sw.id)} trained and certified at each σ with {seeds} seed{'s' if seeds > 1 else ''}; the "
            "curves are the mean "
            "certified accuracy over seeds with a band of one standard deviation, and the envelope is the best σ at "
            "each radius, as "
            "Cohen et al. plot it."
        ),
        Figure(png, "Certified accuracy against L2 radius per σ, with the envelope", 0.7),
        Table(
            ["σ", "ACR", "seeds", "best σ between radii"],
            [
                [
                    name,
                    f"{c.acr:.4f} ± {c.acr_sd:.4f}" if c.seeds > 1 else f"{c.acr:.4f}",
                    str(c.seeds),
                    _where_best(grid, curves, name),
                ]
                for name, c in curves.items()
            ],
        ),
    )


def _where_best(grid: np.ndarray, curves: dict, name: str) -> str:
    """The radii where `name` is the envelope (ties to the smaller σ), as 'a to b'."""
    names = list(curves)
    stack = np.stack([curves[n].mean for n in names])
    live = stack.max(0) > 0
    best = (stack.argmax(0) == names.index(name)) & live
    if not best.any():
        return "–"
    idx = np.flatnonzero(best)
    return f"{grid[idx[0]]:.3f} to {grid[idx[-1]]:.3f}"
