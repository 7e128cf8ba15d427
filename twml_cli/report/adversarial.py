"""Section 1: free adversarial training against standard training."""

from __future__ import annotations

import math
from pathlib import Path

from .. import figures
from .document import Bullets, Document, Figure, Heading, Para, Table
from .runs import AttackRun, TrainRun
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


def section(doc: Document, runs: list[TrainRun], attack_runs: list[AttackRun], fig_dir: Path) -> None:
    doc.add(Heading("1 Free adversarial training"))
    if not runs:
        doc.add(
            Para(
                "No finished `twml train` runs in this experiment: run `twml train`, `twml train --free --m 4` and "
                "`twml train --free --m 7`."
            )
        )
        _attacks(doc, attack_runs)
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

    # The questions compare the newest run of each kind trained like the newest standard run.
    standard = next((r for r in runs if r.settings.method == "standard"), None)
    keys = ("dataset", "model", "eps", "epochs")
    free: dict[int, TrainRun] = {}
    for r in runs:
        if r.settings.method == "free" and (
            standard is None or all(getattr(r.settings, k) == getattr(standard.settings, k) for k in keys)
        ):
            free.setdefault(r.settings.m, r)
    _times(doc, standard, free)
    _effect(doc, standard, free)
    _increasing_m(doc, free)
    _attacks(doc, attack_runs)
    _fast(doc, runs, free)


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


def _times(doc: Document, standard: TrainRun | None, free: dict[int, TrainRun]) -> None:
    doc.add(Heading("How much time did it take to train each of the models?", 2))
    items = []
    if standard is not None:
        items.append(
            f"standard training: **{secs(standard.training.train_time_s)}** ({standard.training.images_per_s:,.0f} "
            "images/s)"
        )
    for m, r in sorted(free.items()):
        ratio = (
            f", {r.training.train_time_s / standard.training.train_time_s:.2f}x standard"
            if standard is not None
            else ""
        )
        items.append(
            f"free adversarial training, m = {m}: **{secs(r.training.train_time_s)}** ({r.training.images_per_s:,.0f} "
            f"images/s{ratio})"
        )
    doc.add(Bullets(items))
    caveat = timing_caveat([r for r in (standard, *free.values()) if r is not None])
    if caveat:
        doc.add(Para(caveat))
    if standard is not None and free:
        steps = {m: r.training.sgd_steps for m, r in free.items()}
        same = all(s == standard.training.sgd_steps for s in steps.values())
        doc.add(
            Para(
                f"Free training replays each minibatch m times and makes ceil(epochs / m) passes, so at "
                f"{standard.settings.epochs} epochs of budget it makes "
                + (
                    "the same number of SGD steps as standard training"
                    if same
                    else "slightly more SGD steps than standard training (epochs not divisible by m)"
                )
                + f" ({standard.training.sgd_steps} for standard; "
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


def _effect(doc: Document, standard: TrainRun | None, free: dict[int, TrainRun]) -> None:
    doc.add(Heading("What was the effect of adversarial training on benign accuracy and robustness?", 2))
    if standard is None or not free:
        doc.add(
            Para("This needs a standard and a free run trained alike: run `twml train` and `twml train --free --m 4`.")
        )
        return
    m0 = 4 if 4 in free else min(free)
    a, b = standard.robustness, free[m0].robustness
    doc.add(
        Para(
            f"With free adversarial training (m = {m0}, eps = {free[m0].settings.eps:.4g}) benign accuracy "
            f"{change(a.accuracy, b.accuracy)} and the success rate of untargeted white-box PGD "
            f"{change(a.pgd_success_rate, b.pgd_success_rate)}; robust accuracy "
            f"{change(a.robust_accuracy, b.robust_accuracy)}."
        ),
        Para(tradeoff(b.accuracy - a.accuracy, a.pgd_success_rate - b.pgd_success_rate)),
    )


def _increasing_m(doc: Document, free: dict[int, TrainRun]) -> None:
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
    caveat = timing_caveat([a, b])
    doc.add(
        Para(
            f"From m = {lo} to m = {hi}, training time "
            f"{change(a.training.train_time_s, b.training.train_time_s, secs, points=False)}, "
            f"benign accuracy {change(a.robustness.accuracy, b.robustness.accuracy)} and the PGD success rate "
            f"{change(a.robustness.pgd_success_rate, b.robustness.pgd_success_rate)}; robust accuracy "
            f"{change(a.robustness.robust_accuracy, b.robustness.robust_accuracy)}." + (f" {caveat}" if caveat else "")
        ),
        Para(
            f"At an equal SGD budget, m = {hi} passes over the data {math.ceil(b.settings.epochs / hi)} times and m = "
            f"{lo} "
            f"{math.ceil(a.settings.epochs / lo)} times: the larger m sees each minibatch fewer times, with more "
            "ascent steps each time."
        ),
    )


def _fast(doc: Document, runs: list[TrainRun], free: dict[int, TrainRun]) -> None:
    """Fast adversarial training (Wong et al.) beside free training, when both were run."""
    fast = next((r for r in runs if r.settings.method == "fast"), None)
    if fast is None:
        return
    doc.add(Heading("The baseline users compare against: fast adversarial training", 2))
    peers = [r for m, r in sorted(free.items()) if r.settings.epochs == fast.settings.epochs]
    ft, fr = fast.training, fast.robustness
    text = (
        f"Fast adversarial training (FGSM from a random start, step {fast.settings.fast_step:g} eps, Wong et al. 2020) "
        f"reached benign accuracy {f4(fr.accuracy)} and PGD success {f4(fr.pgd_success_rate)} in "
        f"{secs(ft.train_time_s)}, "
        f"with {ft.passes_per_step} forward-backward passes per SGD step against free training's 1."
    )
    for r in peers:
        text += (
            f" Free training with m = {r.settings.m} at the same {r.settings.epochs} epochs of budget: "
            f"{f4(r.robustness.accuracy)} "
            f"and {f4(r.robustness.pgd_success_rate)} in {secs(r.training.train_time_s)} "
            f"(fast took {ft.train_time_s / r.training.train_time_s:.2f}x as long)."
        )
    if ft.stopped_early:
        text += (
            " Its guard against catastrophic overfitting fired: PGD accuracy on a training batch collapsed, and "
            "the weights of the pass before were kept."
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
