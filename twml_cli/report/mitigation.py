"""Section 3's mitigation: the models `twml mitigate` repaired, before and after, and how."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from .. import config, results
from ..settings import RUNTIME_ONLY
from ..studies.cleanse import standing
from ..studies.mitigate import excited_by
from .document import Document, Figure, Heading, Para, Table
from .runs import CleanseRun
from .words import count, f4, model_name, short


def _how(s, triggers: int = 1) -> str:
    """What a mitigation run's settings did, in words (`triggers`: the reversed triggers it stamped or
    read, one per search of the cleanse run)."""
    if s.mitigation == "filter":
        return (
            "filtering leaves the model as it is and rejects an image whose mean activation on the "
            f"{s.filter_neurons:.0%} of the penultimate neurons that {excited_by(triggers)} most exceeds a "
            f"threshold, the one that rejects {s.filter_rejects:.0%} of the clean training images (its accuracy "
            "counts a rejected image as wrong)"
        )
    if s.mitigation == "prune":
        return (
            f"pruning removes the penultimate-layer neurons the reversed trigger excites most, {s.prune_step:.0%} at "
            f"a time, until it succeeds on fewer than {s.prune_stop:.0%} of the training images"
        )
    rate = "warmed up for an epoch, then a cosine to 0" if s.unlearn_schedule == "warmup" else "constant"
    frozen = (
        ", normalization statistics frozen"
        if s.unlearn_freeze_norm
        else ", normalized with the statistics of each batch's unstamped images, estimated at the end on all the "
        "clean images"
        if s.unlearn_clean_norm
        else ""
    )
    held = f"; the other images' features held, weight {s.unlearn_distill:g}" if s.unlearn_distill else ""
    if s.unlearn_hold_stamped:
        held += (
            f"; the stamped images' features pulled toward their clean images' as they were, weight "
            f"{s.unlearn_hold_stamped:g}"
        )
    return (
        f"unlearning fine-tunes for {count(s.unlearn_epochs, 'epoch')} on clean training images of which "
        f"{s.unlearn_fraction:.0%} carry "
        + ("the reversed trigger" if triggers == 1 else f"one of the {triggers} searches' reversed triggers, in turn,")
        + f" under their true labels (SGD, lr {s.unlearn_lr:g} {rate}"
        f"{frozen}{held})"
    )


# Measured on the embedded digits' detection matrix: docs/neural-cleanse-measurements.md, "The repair holds
# when the statistics are estimated again".
FROZEN_CAVEAT = (
    " An unlearned model is repaired under the normalization statistics it was fine-tuned with: re-estimated "
    "on clean images, as training it on in train mode does, they can bring the trigger back (on the embedded "
    "digits they did in nearly every repair), where the default repair, on the unstamped images' statistics, holds."
)


def _frozen(run) -> bool:
    return run.settings.mitigation == "unlearn" and bool(run.settings.unlearn_freeze_norm)


def _setting(run) -> dict:
    """A repair's settings, less the cleanse run it acted on and where it ran."""
    return {k: v for k, v in config.params(run.settings).items() if k not in ("cleanse_run", *RUNTIME_ONLY)}


def _described(runs: list) -> dict:
    """For each method, the run whose settings the text describes: of the settings most of its
    repairs share, the first made (`runs`: newest first), so that later variations are named as such."""
    out = {}
    for method in dict.fromkeys(r.settings.mitigation for r in runs[::-1]):  # in the order they ran
        alike = [r for r in runs if r.settings.mitigation == method]
        shared = [_setting(r) for r in alike]
        out[method] = max(alike[::-1], key=lambda r: shared.count(_setting(r)))  # max keeps the first: the oldest
    return out


def _differs(run, described) -> str:
    """The settings in which a repair differs from the run of its method the text describes, as
    the options that make them ('--unlearn-lr 0.05', '--no-unlearn-freeze-norm'), or '–'."""

    def option(k: str, v) -> str:
        flag = k.replace("_", "-")
        if isinstance(v, bool):
            return f"--{flag}" if v else f"--no-{flag}"
        return f"--{flag} {v:g}" if isinstance(v, float) else f"--{flag} {v}"

    a, b = _setting(run), _setting(described)
    return ", ".join(option(k, v) for k, v in a.items() if v != b.get(k)) or "–"


def section(
    doc: Document,
    runs: list,
    newest: CleanseRun | None = None,
    searched_again: Sequence[CleanseRun] = (),
    fig_dir: Path | None = None,
) -> None:
    """Neural Cleanse's mitigation: each repaired model, before and after, and the cleanse run
    whose finding it acted on; a finding of the newest cleanse run (`newest`, the one section 3
    reads) that no repair acted on is named, with the command that repairs it; a filter's
    figure of what each threshold rejects (copied into `fig_dir`). Then what searching each
    repaired model again found (`searched_again`: cleanse runs of repaired models, newest
    first), or the command that searches it."""
    if not runs:
        return
    described = _described(runs)
    table, common = Table(
        [
            "method",
            "model",
            "class",
            "cleanse run",
            "accuracy",
            "real trigger's success",
            "reversed trigger's success",
            "run",
            "settings",
        ],
        [
            [
                r.settings.mitigation,
                model_name(r.param("model_run") or r.param("model_path")),
                r.param("target"),
                short(r.settings.cleanse_run),
                f"{f4(r.mitigation.accuracy_before)} → {f4(r.mitigation.accuracy)}",
                f"{f4(r.real.attack_success_rate_before)} → {f4(r.real.attack_success_rate)}" if r.real else "–",
                f"{f4(r.mitigation.reversed_success_before)} → {f4(r.mitigation.reversed_success)}",
                short(r.id),
                _differs(r, described[r.settings.mitigation]),
            ]
            for r in runs
        ],
    ).drop_constant(["cleanse run"], dashes=["settings"])
    acted = {r.settings.cleanse_run for r in runs}
    unrepaired = (
        f" The newest cleanse run ({short(newest.id)}, above) flagged {newest.verdict}; no repair has acted on its "
        "findings yet: `twml mitigate` repairs them."
        if newest is not None and newest.verdict != "none" and newest.id not in acted
        else ""
    )
    doc.add(
        Heading("Mitigation: repairing the backdoored model", 2),
        Para(
            "`twml mitigate` repairs each model a cleanse run flagged, with the trigger Neural Cleanse reversed (the "
            "real one stays unknown to it): "
            + "; ".join(_how(r.settings, int(r.param("reversed_triggers") or 1)) for r in described.values())
            + ". The real trigger's attack success is measured on clean test images of the other classes."
            + (
                " Where a repair ran with other settings, the settings column names them."
                if "settings" in table.header
                else ""
            )
            + (f" Every repair below acts on the findings of {common[0]}." if common else "")
            + (FROZEN_CAVEAT if any(_frozen(r) for r in runs) else "")
            + unrepaired
        ),
        table,
    )
    for r in runs:
        m, said = r.mitigation, []
        how = {"unlearn": "Unlearning", "prune": "Pruning", "filter": "Filtering"}[r.settings.mitigation]
        if len(runs) > 1:  # which row this sentence reads
            how += f" of class {r.param('target')} (run {short(r.id)})"
        if r.restarts:
            said.append(
                f"{how} at lr {r.settings.unlearn_lr:g} lost the clean training images and started again from the "
                f"model as it was at half the rate ({count(r.restarts, 'restart')}): the model kept was fine-tuned "
                f"at lr {r.lr_used:g}."
            )
            fall = r.settings.unlearn_restart_fall
            if r.train_accuracy is not None and r.train_accuracy[1] < r.train_accuracy[0] - fall:
                said.append(
                    f"None of its fine-tunes kept those images within {fall * 100:g} points: the one kept ended "
                    f"highest, at {f4(r.train_accuracy[1])} from {f4(r.train_accuracy[0])}."
                )
        if r.rejected is not None:
            clean, real = r.rejected
            said.append(
                f"{how} rejected "
                + (f"{real:.2%} of the test images carrying the real trigger and " if real is not None else "")
                + f"{clean:.2%} of the clean ones."
            )
        accuracy = (
            "clean accuracy "
            + ("(a rejected image counted as wrong) " if r.rejected is not None else "")
            + f"went from {f4(m.accuracy_before)} to {f4(m.accuracy)} ({(m.accuracy - m.accuracy_before) * 100:+.2f} "
            + (f"points: {r.change.in_words()})" if r.change is not None else "points)")
        )
        if r.real is not None:
            said.append(
                f"{'It' if said else how} took the real trigger's attack success from "
                f"{f4(r.real.attack_success_rate_before)} to {f4(r.real.attack_success_rate)} while {accuracy}."
            )
        elif r.change is not None:  # a model of the user's own: the accuracy, with the images it changed
            said.append(f"{'In the end' if said else 'After ' + how[0].lower() + how[1:]}, {accuracy}.")
        if said:
            doc.add(Para(" ".join(said)))
        if r.tradeoff is not None and fig_dir is not None:
            shown = fig_dir / f"mitigate-{short(r.id)}-{results.FILTER_FIGURE}"
            shutil.copy(r.tradeoff, shown)
            doc.add(
                Figure(
                    shown,
                    f"The input filter of class {r.param('target')} (run {short(r.id)}): the clean and the stamped "
                    "test images it rejects at each threshold; the dots, the threshold it uses",
                    0.6,
                )
            )
    _searched_again(doc, runs, searched_again)


def _searched_again(doc: Document, runs: list, searched: Sequence[CleanseRun]) -> None:
    """Per repaired model, the newest cleanse run that searched it: whether its verdict flags the
    repaired class, another class, or none, and where the repaired class's trigger now stands."""
    said, unsearched = [], []
    for r in runs:
        if r.settings.mitigation == "filter":  # its model is the one the cleanse run searched
            continue
        run = next((c for c in searched if r.id in c.inspected), None)
        if run is None:
            unsearched.append(r.id)
            continue
        i, target = run.inspected.index(r.id), int(r.param("target"))
        norms = run.norms[run.norms["model"] == i]
        median = float(norms["norm"].median())
        repaired = norms[norms["class"] == target].iloc[0]
        flagged = [int(c) for c in norms[norms["flagged"].astype(bool)]["class"]]
        what = f"Searched again by cleanse run {short(run.id)}, the model that run {short(r.id)} repaired "
        if target in flagged:
            what += (
                f"still has class {target} flagged, at anomaly index {repaired['anomaly_index']:.2f}: the repair "
                "left a small trigger of it."
            )
        else:
            if flagged:
                what += (
                    f"has class{'es' * (len(flagged) > 1)} {', '.join(map(str, flagged))} flagged, not the repaired "
                    f"class {target}: a repair can uncover a class's natural small trigger that the backdoor's had "
                    "hidden (compare that class in a clean model)"
                )
            else:
                what += "has no class flagged"
            what += f"; {standing(target, float(repaired['norm']), median, float(repaired['anomaly_index']))}."
        said.append(what)
    if unsearched:
        said.append(
            "Search a repaired model again, as a check that needs no real trigger: "
            + ", ".join(f"`twml cleanse --run {run}`" for run in unsearched)
            + "."
        )
    if said:  # nothing to say when every repair is a filter, whose model is the one already searched
        doc.add(Para(" ".join(said)))
