"""Section 1: free adversarial training against standard training."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from .. import figures
from ..studies.sweep import compare, direction
from .document import Bullets, Document, Figure, Heading, Para, Table
from .runs import KIND, AttackRun, Replicates, TrainRun, setup
from .words import change, f4, model_name, secs, short


def replays(r: TrainRun) -> int:
    return r.settings.m if r.settings.method == "free" else 1


def label(r: TrainRun) -> str:
    return r.settings.method + (f" m={r.settings.m}" if r.settings.method == "free" else "")


def _autoattack(r, later: dict | None):
    """A run's AutoAttack metrics: its own, else those of the newest `twml attack --autoattack`
    run on its model (`later`: model run id -> attack run), else None."""
    return r.autoattack or ((later or {}).get(r.id) or r).autoattack


def aa(r, later: dict | None = None) -> str:
    """AutoAttack's robust accuracy, or a dash when the model has none."""
    found = _autoattack(r, later)
    return f4(found.autoattack_robust_accuracy) if found else "–"


def worst(r, later: dict | None = None) -> str:
    found = _autoattack(r, later)
    return f4(found.robust_accuracy_worst) if found else "–"


def section(
    doc: Document,
    runs: list[TrainRun],
    attack_runs: list[AttackRun],
    fig_dir: Path,
    curves: frozenset[str] = frozenset(),
) -> None:
    """The training runs, the questions they answer, and `twml attack` runs but those in `curves`
    (the runs of the robustness-curve sweep the report draws: one row per model and eps would
    repeat the curves as a table of several pages)."""
    tabled = [a for a in attack_runs if a.id not in curves]
    doc.add(Heading("1 Free adversarial training"))
    if not runs:
        doc.add(
            Para(
                "No finished `twml train` runs in this experiment: run `twml train`, `twml train --free --m 4` and "
                "`twml train --free --m 7`."
            )
        )
        _attacks(doc, tabled)
        return
    later: dict = {}
    for a in attack_runs:  # newest first
        if a.autoattack and a.settings.eps == next((r.settings.eps for r in runs if r.id == a.model), None):
            later.setdefault(a.model, a)
    table, common = Table(
        [
            "method",
            "m",
            "data",
            "model",
            "eps",
            "epochs",
            "passes/step",
            "train time",
            "accuracy",
            "PGD success",
            "robust acc.",
            "PGD",
            "AutoAttack",
            "worst",
            "run",
        ],
        [
            [
                r.settings.method,
                str(replays(r)),
                r.settings.dataset,
                r.settings.model,
                f"{r.settings.eps:.4g}",
                str(r.settings.epochs),
                str(r.training.passes_per_step),
                secs(r.training.train_time_s) + (" (stopped early)" if r.training.stopped_early else ""),
                f4(r.robustness.accuracy),
                f4(r.robustness.pgd_success_rate),
                f4(r.robustness.robust_accuracy),
                f"{r.settings.pgd_steps}x{r.settings.pgd_restarts}",
                aa(r, later),
                worst(r, later),
                short(r.id),
            ]
            for r in runs
        ],
    ).drop_constant(["data", "model", "eps", "epochs", "passes/step", "PGD"], dashes=["AutoAttack", "worst"])
    doc.add(
        Para(
            "Every finished training run. PGD is untargeted, white-box, L-inf with a random start (steps x restarts); "
            "its "
            "success rate counts every misclassified adversarial example (inputs already misclassified included), and "
            "robust accuracy is its complement. AutoAttack, where a model was evaluated with it (by --eval "
            "autoattack, or "
            "later by twml attack --autoattack at the same eps), is the standard version (APGD-CE, APGD-T, FAB-T, "
            "Square); "
            "'worst' counts an example robust only if it survives PGD and AutoAttack. "
            "Passes/step: forward-backward passes per SGD step (2 for fast training). Run ids are shortened; section 4 "
            "lists them whole." + (f" Every run here has {', '.join(common)}." if common else "")
        ),
        table,
    )
    bars = figures.adversarial_bars_figure(
        [f"{label(r)}\n{short(r.id)}" for r in runs],
        [r.robustness.accuracy for r in runs],
        [r.robustness.pgd_success_rate for r in runs],
    )
    doc.add(
        Figure(
            figures.save(bars, fig_dir / "adversarial-training.png"),
            "Benign accuracy and PGD success rate of every training run",
            0.75,
        )
    )

    # The questions compare kinds of training (standard, free at each m) trained alike: every setting
    # but the method, m and the seed as the newest standard run's; the seeds of a kind are replicates.
    anchor = next((r for r in runs if r.settings.method == "standard"), runs[0])
    kind = setup(anchor, *KIND)
    alike = [r for r in runs if setup(r, *KIND) == kind]
    standards = [r for r in alike if r.settings.method == "standard"]
    standard = Replicates.of(standards) if standards else None
    free = {
        m: Replicates.of([r for r in alike if r.settings.method == "free" and r.settings.m == m])
        for m in sorted({r.settings.m for r in alike if r.settings.method == "free"})
    }
    if standard is not None or free:
        doc.add(Para(_basis(standard, free)))
    fasts = [r for r in alike if r.settings.method == "fast"]
    fast = Replicates.of(fasts) if fasts else None
    _times(doc, standard, free, fast)
    _effect(doc, standard, free)
    _increasing_m(doc, free)
    _attacks(doc, tabled)
    _fast(doc, fast, free)


def _basis(standard: Replicates | None, free: dict[int, Replicates]) -> str:
    """What the questions below compare: which runs, how many seeds, and what one seed cannot say."""
    kinds = ([("standard", standard)] if standard else []) + [(f"free m = {m}", k) for m, k in free.items()]
    seeds = {k.seeds for _, k in kinds}
    each = f"{kinds[0][1].seeds} for each" if len(seeds) == 1 else "; ".join(f"{name}: {k.seeds}" for name, k in kinds)
    text = (
        "The questions below compare standard and free training runs made alike (every setting but the method, m "
        f"and the seed as in the newest {'standard' if standard else 'training'} run), over the seeds each was "
        f"trained with ({each}). "
    )
    if min(k.n for _, k in kinds) > 1:
        return text + (
            "Values are means ± one standard deviation over seeds; a difference is called a rise or a fall only where "
            "the 95% confidence interval of the difference of the means (Welch's t) excludes 0."
        )
    return text + (
        "One run of a kind cannot tell a difference from the spread between seeds: `twml train --method standard,free "
        "--m 4,7 --seed 0,1,2` trains three of each, and the report then answers from their means and spreads."
    )


def _value(k: Replicates, metric: Callable, fmt: str, unit: str = "") -> str:
    """A metric of a kind: its value from one run, else 'mean ± sd' over the seeds."""
    e = k.estimate(metric)
    return f"{e.mean:{fmt}}{unit}" if e.n == 1 else f"{e.mean:{fmt}} ± {e.std:{fmt}}{unit}"


def _attacks(doc: Document, attack_runs: list[AttackRun]) -> None:
    """`twml attack` runs, whatever trained their models (a logged run or a folder)."""
    if not attack_runs:
        return
    doc.add(
        Heading("Stronger attacks on logged models", 2),
        Para("`twml attack` re-evaluations; a robustness claim should survive more steps and restarts."),
        Table(
            ["model", "eps", "PGD", "accuracy", "PGD success", "robust acc.", "AutoAttack", "worst", "run"],
            [
                [
                    model_name(r.model),
                    f"{r.settings.eps:.4g}",
                    f"{r.settings.pgd_steps}x{r.settings.pgd_restarts}",
                    f4(r.robustness.accuracy),
                    f4(r.robustness.pgd_success_rate),
                    f4(r.robustness.robust_accuracy),
                    aa(r),
                    worst(r),
                    short(r.id),
                ]
                for r in attack_runs
            ],
        ),
    )


def _times(
    doc: Document, standard: Replicates | None, free: dict[int, Replicates], fast: Replicates | None = None
) -> None:
    doc.add(Heading("How much time did it take to train each of the models?", 2))

    def rate(r):
        return r.training.images_per_s

    def line(name: str, k: Replicates) -> str:
        ratio = (
            f", {k.estimate(train_time).mean / standard.estimate(train_time).mean:.2f}x standard"
            if standard is not None and k is not standard
            else ""
        )
        over = f" over {k.n} seeds" if k.n > 1 else ""
        return f"{name}: **{_value(k, train_time, '.1f', ' s')}**{over} ({_value(k, rate, ',.0f')} images/s{ratio})"

    kinds = (
        ([("standard training", standard)] if standard else [])
        + [(f"free adversarial training, m = {m}", k) for m, k in free.items()]
        + ([("fast adversarial training", fast)] if fast else [])
    )
    doc.add(Bullets([line(name, k) for name, k in kinds]))
    caveat = timing_caveat([r for _, k in kinds for r in k.runs])
    if caveat:
        doc.add(Para(caveat))
    if standard is not None and free:
        base = standard.newest.training.sgd_steps
        steps = {m: k.newest.training.sgd_steps for m, k in free.items()}
        same = all(s == base for s in steps.values())
        doc.add(
            Para(
                f"Free training replays each minibatch m times and makes ceil(epochs / m) passes, so at "
                f"{standard.newest.settings.epochs} epochs of budget it makes "
                + (
                    "the same number of SGD steps as standard training"
                    if same
                    else "slightly more SGD steps than standard training (epochs not divisible by m)"
                )
                + f" ({base} for standard; "
                + ", ".join(f"{s} for m = {m}" for m, s in sorted(steps.items()))
                + "), so the times above compare equal SGD budgets."
            )
        )


def timing_caveat(runs: list) -> str | None:
    """A warning when wall-clock times of `runs` cannot be compared: runs that overlapped in
    time (they shared the machine), ran on different hosts or with different thread counts.
    None when they ran one after another on one machine alike."""
    reasons = []
    hosts = {r.host for r in runs if r.host}
    if len(hosts) > 1:
        reasons.append(f"they ran on {len(hosts)} different machines ({', '.join(sorted(hosts))})")
    threads = {r.param("threads") for r in runs if r.param("threads")}
    if len(threads) > 1:
        reasons.append(f"they ran with different CPU thread counts ({', '.join(sorted(threads))})")
    timed = sorted((r for r in runs if r.end_time), key=lambda r: r.start_time)
    overlaps = [(a, b) for i, a in enumerate(timed) for b in timed[i + 1 :] if b.start_time < a.end_time]
    if overlaps:
        pairs = ", ".join(f"{a.id[:8]} and {b.id[:8]}" for a, b in overlaps[:3])
        reasons.append(f"some of them ran at the same time and shared the machine (runs {pairs})")
    if not reasons:
        return None
    return (
        "These times are not comparable: " + "; ".join(reasons) + ". The SGD steps and passes below are; "
        "rerun them one after another on one machine to compare times."
    )


def accuracy(r) -> float:
    return r.robustness.accuracy


def pgd_success(r) -> float:
    return r.robustness.pgd_success_rate


def robust(r) -> float:
    return r.robustness.robust_accuracy


def train_time(r) -> float:
    return r.training.train_time_s


def _changes(a: Replicates, b: Replicates, parts: list[tuple[str, Callable]]) -> str:
    """How each metric changes from kind a to kind b, in one clause: from one run each, the two
    values; from several seeds, worded from their intervals (studies.sweep.compare)."""
    if max(a.n, b.n) == 1:
        said = [
            f"{what} {change(metric(a.newest), metric(b.newest), *((secs, False) if metric is train_time else ()))}"
            for what, metric in parts
        ]
        return ", ".join(said[:-1]) + " and " + said[-1] if len(said) > 1 else said[0]
    return "; ".join(
        compare(
            a.estimate(metric),
            b.estimate(metric),
            what + (" (s)" if metric is train_time else ""),
            1 if metric is train_time else 4,
        )
        for what, metric in parts
    )


def _effect(doc: Document, standard: Replicates | None, free: dict[int, Replicates]) -> None:
    doc.add(Heading("What was the effect of adversarial training on benign accuracy and robustness?", 2))
    if standard is None or not free:
        doc.add(
            Para("This needs a standard and a free run trained alike: run `twml train` and `twml train --free --m 4`.")
        )
        return
    m0 = 4 if 4 in free else min(free)
    a, b = standard, free[m0]
    metrics = [
        ("benign accuracy", accuracy),
        ("the success rate of untargeted white-box PGD", pgd_success),
        ("robust accuracy", robust),
    ]
    single = max(a.n, b.n) == 1
    doc.add(
        Para(
            f"With free adversarial training (m = {m0}, eps = {b.newest.settings.eps:.4g})"
            + (" " if single else ", against standard training: ")
            + _changes(a, b, metrics)
            + "."
        ),
        Para(
            tradeoff(accuracy(b.newest) - accuracy(a.newest), pgd_success(a.newest) - pgd_success(b.newest))
            if single
            else tradeoff_over_seeds(a, b)
        ),
    )


def _increasing_m(doc: Document, free: dict[int, Replicates]) -> None:
    doc.add(Heading("Increasing m: what is the impact on training time, benign accuracy and robustness?", 2))
    if len(free) < 2:
        doc.add(
            Para(
                "This needs free runs with two values of m: run `twml train --free --m 4` and `twml train --free --m "
                "7`."
            )
        )
        return
    lo, hi = (4, 7) if {4, 7} <= set(free) else (min(free), max(free))
    a, b = free[lo], free[hi]
    caveat = timing_caveat([*a.runs, *b.runs])
    metrics = [
        ("training time", train_time),
        ("benign accuracy", accuracy),
        ("the PGD success rate", pgd_success),
        ("robust accuracy", robust),
    ]
    doc.add(
        Para(f"From m = {lo} to m = {hi}, {_changes(a, b, metrics)}." + (f" {caveat}" if caveat else "")),
        Para(
            f"At an equal SGD budget, m = {hi} passes over the data {math.ceil(b.newest.settings.epochs / hi)} "
            f"times and m = {lo} {math.ceil(a.newest.settings.epochs / lo)} times: the larger m sees each minibatch "
            "fewer times, with more ascent steps each time."
        ),
    )


def _fast(doc: Document, fast: Replicates | None, free: dict[int, Replicates]) -> None:
    """Fast adversarial training (Wong et al.) beside free training made alike, when both were run;
    over its seeds where several were."""
    if fast is None:
        return
    doc.add(Heading("The baseline users compare against: fast adversarial training", 2))
    f = fast.newest
    over = f" (over {fast.n} seeds)" if fast.n > 1 else ""
    text = (
        f"Fast adversarial training (FGSM from a random start, step {f.settings.fast_step:g} eps, Wong et al. 2020) "
        f"reached benign accuracy {_value(fast, accuracy, '.4f')} and PGD success {_value(fast, pgd_success, '.4f')} "
        f"in {_value(fast, train_time, '.1f', ' s')}{over}, with {f.training.passes_per_step} forward-backward passes "
        "per SGD step against free training's 1."
    )
    for m, k in free.items():
        ratio = fast.estimate(train_time).mean / k.estimate(train_time).mean
        text += (
            f" Free training with m = {m} at the same {f.settings.epochs} epochs of budget: "
            f"{_value(k, accuracy, '.4f')} and {_value(k, pgd_success, '.4f')} in {_value(k, train_time, '.1f', ' s')} "
            f"(fast took {ratio:.2f}x as long)."
        )
    if free and min(fast.n, *(k.n for k in free.values())) > 1:
        m0 = 4 if 4 in free else min(free, key=lambda m: free[m].estimate(pgd_success).mean)
        text += (
            f" From free training at m = {m0} to fast training, "
            + compare(free[m0].estimate(pgd_success), fast.estimate(pgd_success), "the PGD success rate")
            + "."
        )
    stopped = sum(r.training.stopped_early for r in fast.runs)
    if stopped:
        text += (
            " Its guard against catastrophic overfitting fired"
            + (f" in {stopped} of its {fast.n} runs" if fast.n > 1 else "")
            + ": PGD accuracy on a training batch collapsed, and the weights of the pass before were kept."
        )
    doc.add(Para(text))


def tradeoff(acc_delta: float, rob_delta: float) -> str:
    acc = f"{abs(acc_delta) * 100:.2f} points of benign accuracy"
    rob = f"{abs(rob_delta) * 100:.2f} points of PGD success rate"
    if rob_delta > 0 and acc_delta < 0:
        if rob_delta > 2 * -acc_delta:
            return (
                f"Adversarial training traded {acc} for {rob}: a small loss of accuracy for a large gain in robustness."
            )
        return f"Adversarial training traded {acc} for {rob}."
    if rob_delta > 0:
        return f"Here adversarial training cost no benign accuracy (it gained {acc}) and removed {rob}."
    return (
        "Here adversarial training did not make the model more robust: the PGD success rate changed by "
        f"{-rob_delta * 100:+.2f} points."
    )


def tradeoff_over_seeds(standard: Replicates, free: Replicates) -> str:
    """The trade-off in words, over seeds: a gain or a cost is named only where the 95% interval of
    the difference excludes 0 (studies.sweep.direction)."""
    acc_a, acc_b = standard.estimate(accuracy), free.estimate(accuracy)
    pgd_a, pgd_b = standard.estimate(pgd_success), free.estimate(pgd_success)
    acc = f"{abs(acc_b.mean - acc_a.mean) * 100:.2f} points of benign accuracy"
    rob = f"{(pgd_a.mean - pgd_b.mean) * 100:.2f} points of PGD success rate"
    over = "Over these seeds"
    if min(standard.n, free.n) < 2:
        return "One of the two kinds has a single seed, so no direction can be told: train it with more seeds."
    if direction(pgd_a, pgd_b) != "fell":
        return (
            f"{over} adversarial training did not make the model measurably more robust: the change in PGD success "
            f"rate ({(pgd_b.mean - pgd_a.mean) * 100:+.2f} points, means) is not told apart from seed noise."
            if direction(pgd_a, pgd_b) is None
            else f"{over} adversarial training made the model less robust: the PGD success rate rose."
        )
    cost = direction(acc_a, acc_b)
    if cost == "fell":
        return f"{over} adversarial training traded {acc} for {rob} (means)."
    if cost == "rose":
        return f"{over} adversarial training cost no benign accuracy (it gained {acc}) and removed {rob} (means)."
    return (
        f"{over} adversarial training removed {rob} (means); its change in benign accuracy "
        f"({(acc_b.mean - acc_a.mean) * 100:+.2f} points) is not told apart from seed noise."
    )
