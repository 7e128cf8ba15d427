"""Section 2: randomized smoothing, certified accuracy against radius."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import figures, results, smoothing
from ..studies.sweep import compare
from .document import Document, Figure, Heading, Para, Table
from .runs import Replicates, SmoothRun, seed_text, setup
from .words import change, f4, short


def procedure(r: SmoothRun) -> str:
    s = r.settings
    if s.adaptive:
        return f"adaptive, n ≤ {s.n:,}, futility {s.futility:g}, grid {', '.join(f'{x:g}' for x in s.radii)}"
    return f"CERTIFY, n = {s.n:,}"


def gaussian(r: SmoothRun) -> bool:
    """Trained as Cohen et al. did (or a given model): the runs the σ study compares."""
    return r.settings.training == "gaussian" or bool(r.settings.model_run)


def trained(runs) -> str:
    kinds = {"given" if r.settings.model_run else r.settings.training for r in runs}
    if kinds == {"gaussian"}:
        return "Each base classifier was trained with Gaussian noise at its σ"
    return "The base classifiers were " + ", ".join(
        "given models" if k == "given" else f"trained with {METHOD_NAMES[k]}" for k in sorted(kinds)
    )


METHOD_NAMES = {
    "gaussian": "Gaussian noise (Cohen et al.)",
    "consistency": "consistency regularization (Jeong and Shin)",
    "smoothadv": "SmoothAdv (Salman et al.)",
    "macer": "MACER (Zhai et al.)",
}


def section(doc: Document, runs: list[SmoothRun], fig_dir: Path) -> None:
    doc.add(Heading("2 Randomized smoothing"))
    if not runs:
        doc.add(Para("No finished `twml smooth` runs in this experiment: run `twml smooth --sigma 0.05 --sigma 0.20`."))
        return
    newest: dict[float, SmoothRun] = {}
    for r in [r for r in runs if gaussian(r)] or runs:
        newest.setdefault(r.settings.sigma, r)
    newest = dict(sorted(newest.items()))
    top = max(float(r.table["radius"].max()) for r in newest.values())
    grid = smoothing.radius_grid(top)
    curves = {
        s: (grid, smoothing.certified_accuracy(r.table["radius"], r.table["correct"], grid)) for s, r in newest.items()
    }
    png, _ = figures.save_both(figures.certified_accuracy_figure(curves), fig_dir / results.CURVE_FIGURE)
    reach = max(
        smoothing.max_certifiable_radius(r.settings.sigma, r.settings.n, r.settings.cert_alpha) for r in newest.values()
    )
    radii = sorted(
        {*(r for r in smoothing.TABLE_RADII if r <= reach), *(x for r in newest.values() for x in r.settings.radii)}
    )
    first = next(iter(newest.values())).settings
    if first.adaptive:
        samples = f"adaptive certification (below) used n0 = {first.n0}, at most n = {first.n:,}"
    else:
        samples = f"CERTIFY (Cohen et al., 2019) used n0 = {first.n0}, n = {first.n}"
    doc.add(
        Para(
            f"The newest run of each σ. {trained(newest.values())}; {samples}, "
            f"α = {first.cert_alpha:g} on {first.num_examples} evenly "
            "spaced test images. Certified accuracy at radius r counts the examples classified correctly with a "
            "certified L2 "
            f"radius of at least r (abstentions count as wrong); radii are in [0, 1] pixel units."
        ),
        Figure(png, "Certified accuracy against L2 radius, one curve per σ", 0.7),
        Table(
            ["σ", "procedure", "accuracy (base)"]
            + [f"cert. acc. r={r:g}" for r in radii]
            + ["abstain", "ACR", "max radius", "samples per image", "run"],
            [
                [f"{s:g}", procedure(r), f4(r.certification.accuracy)]
                + [f4(r.certified(x)) for x in radii]
                + [
                    f4(r.certification.abstain_rate),
                    f4(r.certification.average_certified_radius),
                    f4(r.certification.max_certified_radius),
                    f"{r.certification.samples_per_image:,.0f}",
                    short(r.id),
                ]
                for s, r in newest.items()
            ],
        ),
    )
    if any(r.settings.adaptive for r in newest.values()):
        doc.add(
            Para(
                "Adaptive rows were certified on their grid of radii only (twml smooth --adaptive): fresh samples in "
                "rounds "
                "growing 1.5 times, each look a Clopper-Pearson bound whose level is a share of α (half at the last "
                "look, "
                "half split over the others), so every certificate holds with the same 1 - α as CERTIFY's. An image "
                "stops "
                "trying a radius once a (1 - futility) upper bound of pA shows n could not certify it: that saves "
                "samples "
                "and can miss a certificate fixed n finds, never make a wrong one. Their radius is the largest grid "
                "radius "
                "certified, so between grid radii the table is a lower bound."
            )
        )
    doc.add(Heading("What is the outcome of increasing σ?", 2))
    if len(newest) < 2:
        doc.add(Para("This needs two noise levels: run `twml smooth --sigma 0.05 --sigma 0.20`."))
        return
    lo, hi = min(newest), max(newest)
    a, b = newest[lo], newest[hi]
    ca, cb = a.certification, b.certification
    ra = ca.max_certified_radius
    n, alpha = a.settings.n, a.settings.cert_alpha
    cap = float(smoothing.lower_confidence_bound(n, n, alpha))
    reach_lo, reach_hi = (smoothing.max_certifiable_radius(s, n, alpha) for s in (lo, hi))
    doc.add(
        Para(
            f"From σ = {lo:g} to σ = {hi:g} the largest certified radius "
            f"{change(ra, cb.max_certified_radius, points=False)}, the "
            "average certified radius "
            f"{change(ca.average_certified_radius, cb.average_certified_radius, points=False)}, "
            f"certified accuracy at r = 0 {change(a.certified(0), b.certified(0))} and the abstain rate "
            f"{change(ca.abstain_rate, cb.abstain_rate)}. At r = {ra:.3f}, the largest radius σ = {lo:g} certifies, σ "
            f"= {hi:g} "
            f"still certifies {f4(b.certified(ra))} of the examples."
        ),
        Para(
            "The certified radius is σ·Φ⁻¹(p_A): at the same confidence p_A it grows in proportion to σ. With n = "
            f"{n} and "
            f"α = {alpha:g}, p_A cannot be certified above {cap:.4f}, so no radius beyond {reach_lo / lo:.2f}σ is "
            "possible: "
            f"{reach_lo:.3f} for σ = {lo:g} and {reach_hi:.3f} for σ = {hi:g}. "
            + (
                "A larger σ smooths the classifier more, moving its decision boundary farther from the data, and here "
                "its "
                "certified accuracy falls more slowly with the radius (larger average certified radius)"
                if cb.average_certified_radius > ca.average_certified_radius
                else "Here the larger σ did not certify more on average (smaller average certified radius)"
            )
            + (
                f"; the price is accuracy at small radii, as the base classifier sees noisier images (clean accuracy "
                f"{change(ca.accuracy, cb.accuracy)})."
                if b.certified(0) < a.certified(0)
                else f"; here certified accuracy at r = 0 did not fall ({f4(a.certified(0))} at σ = {lo:g}, "
                f"{f4(b.certified(0))} at "
                f"σ = {hi:g}), while the base classifier's clean accuracy {change(ca.accuracy, cb.accuracy)}."
            )
        ),
        Para(_over_seeds(a, b, runs) or _one_run_each(a, b, runs)),
    )


def _over_seeds(a: SmoothRun, b: SmoothRun, runs: list[SmoothRun]) -> str | None:
    """The σ comparison over the seeds of each σ (runs made like the newest, but for the seed),
    worded from the 95% interval of each difference; None unless both σ have several seeds."""
    kinds = [Replicates.of([r for r in runs if setup(r) == setup(x)]) for x in (a, b)]  # a setup holds its σ
    if min(k.n for k in kinds) < 2:
        return None
    lo, hi = kinds
    parts = [
        compare(lo.estimate(m), hi.estimate(m), what)
        for what, m in (
            ("the average certified radius", lambda r: r.certification.average_certified_radius),
            ("certified accuracy at r = 0", lambda r: r.certified(0.0)),
            ("the abstain rate", lambda r: r.certification.abstain_rate),
        )
    ]
    return (
        "The paragraphs above read the newest run of each σ. Over the seeds of each σ "
        f"({lo.seeds} at σ = {a.settings.sigma:g}, {hi.seeds} at σ = {b.settings.sigma:g}; runs made alike): "
        + "; ".join(parts)
        + "."
    )


def _one_run_each(a: SmoothRun, b: SmoothRun, runs: list[SmoothRun]) -> str:
    """What the comparison above rests on: one run of each σ. The radii's growth is the formula's;
    a change in accuracy or abstain rate needs seeds, and says where the report shows them."""
    seeds = [{r.settings.seed for r in runs if gaussian(r) and r.settings.sigma == x.settings.sigma} for x in (a, b)]
    which = (
        f"seed {a.settings.seed} at both"
        if a.settings.seed == b.settings.seed
        else f"seed {a.settings.seed} at σ = {a.settings.sigma:g}, seed {b.settings.seed} at σ = {b.settings.sigma:g}"
    )
    sweep = f"`twml smooth --sigma {a.settings.sigma:g},{b.settings.sigma:g} --seed 0,1,2`"
    if seeds[0] == seeds[1]:
        logged = f"runs of {seed_text(seeds[0])} are logged at both σ"
    else:
        logged = (
            f"runs of {seed_text(seeds[0])} are logged at σ = {a.settings.sigma:g} and of {seed_text(seeds[1])} at "
            f"σ = {b.settings.sigma:g}"
        )
    more = (
        f'; {logged}, and a sweep ({sweep}) draws each σ\'s mean curve with its spread ("Across sigmas and seeds")'
        if max(len(x) for x in seeds) > 1
        else f": {sweep} trains three of each, and the report then draws each σ's mean curve with its spread"
    )
    return (
        f"This compares one run of each σ (the newest: {which}). That the radii grow with σ follows from the formula; "
        f"whether a change in accuracy or abstain rate exceeds the spread between seeds, one seed cannot tell{more}."
    )


def by_method(runs: list[SmoothRun]) -> dict[float, dict[str, list[SmoothRun]]]:
    """σ -> training method -> its runs (the newest of each seed), for the σ where two or more
    methods trained a base classifier; methods in METHOD_NAMES' order, runs by seed."""
    newest: dict[tuple[float, str, int], SmoothRun] = {}
    for r in runs:
        if not r.settings.model_run and r.training is not None:
            newest.setdefault((r.settings.sigma, r.settings.training, r.settings.seed), r)
    grouped: dict[float, dict[str, list[SmoothRun]]] = {}
    for (sigma, t, _), r in sorted(
        newest.items(), key=lambda kv: (kv[0][0], list(METHOD_NAMES).index(kv[0][1]), kv[0][2])
    ):
        grouped.setdefault(sigma, {}).setdefault(t, []).append(r)
    return {sigma: cells for sigma, cells in grouped.items() if len(cells) > 1}


def training_methods(doc: Document, runs: list[SmoothRun], fig_dir: Path) -> None:
    """How the base classifier was trained, compared at each σ where two or more methods ran: the
    certified-accuracy curves (mean over seeds, a band of one sd), ACR against Gaussian's worded
    from the intervals, and what each method cost to train."""
    from ..studies import smooth, sweep

    compared = by_method(runs)
    if not compared:
        return
    doc.add(
        Heading("How should the base classifier be trained?", 2),
        Para(
            "CERTIFY's guarantee holds whatever the base classifier; the training decides how confident its votes "
            "are under noise, and so the radii. Each method below trained the same architecture for the same epochs; "
            "all were certified by the same procedure on the same test images with the same noise. Curves are the "
            "mean over seeds with a band of one standard deviation; a difference in ACR is called one only where the "
            "95% confidence interval of the difference of the means (Welch's t) excludes 0. Training time is "
            "wall-clock time on the machine named in the "
            "run table; passes per step count forward-backward passes of a minibatch's size per SGD step."
        ),
    )
    for sigma, cells in compared.items():
        named = [
            (t, r.table["radius"].to_numpy(), r.table["correct"].to_numpy()) for t, rs in cells.items() for r in rs
        ]
        grid, curves, envelope = smooth.bands(named)
        png, _ = figures.save_both(
            figures.certified_accuracy_bands_figure(grid, curves, envelope),
            fig_dir / f"training-methods-sigma-{sigma:g}",
        )
        acr = {t: sweep.Estimate.of([r.certification.average_certified_radius for r in rs]) for t, rs in cells.items()}
        rows = [
            [t, str(len(rs)), acr[t].text()]
            + [f4(float(np.mean([r.certified(x) for r in rs]))) for x in (0.0, 0.25, 0.5)]
            + [
                f4(float(np.mean([r.certification.accuracy for r in rs]))),
                f"{per_epoch(rs):.2f}",
                str(next(r.training.passes_per_step for r in rs if r.training)),
            ]
            for t, rs in cells.items()
        ]
        doc.add(
            Heading(f"σ = {sigma:g}", 3),
            Figure(png, f"Certified accuracy against L2 radius at σ = {sigma:g}, one curve per training method", 0.7),
            Table(
                [
                    "training",
                    "seeds",
                    "ACR",
                    "cert. acc. r=0",
                    "r=0.25",
                    "r=0.5",
                    "accuracy (base)",
                    "train s/epoch",
                    "passes per step",
                ],
                rows,
            ),
        )
        if "gaussian" not in cells:
            continue
        sentences = [
            sweep.compare(acr["gaussian"], acr[t], f"the ACR, from Gaussian training to {t},")
            + f", at {per_epoch(rs) / per_epoch(cells['gaussian']):.1f}x Gaussian's training time per epoch"
            for t, rs in cells.items()
            if t != "gaussian"
        ]
        doc.add(Para(". ".join(s[0].upper() + s[1:] for s in sentences) + "."))


def per_epoch(runs: list[SmoothRun]) -> float:
    """Mean training seconds per epoch."""
    return float(np.mean([r.training.train_time_s / r.settings.epochs for r in runs if r.training]))
