"""Section 3: Neural Cleanse, which model is backdoored and toward which class."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .. import results
from ..backdoor import Trigger
from .document import Bullets, Document, Figure, FigureRow, Heading, Para, Table
from .runs import BackdoorRun, CleanseRun
from .words import count, f4, model_name, short

SPLIT_WORDS = {"train": "training", "test": "held-out test"}  # the split the trigger search drew from


def section(
    doc: Document,
    runs: list[CleanseRun],
    backdoor_runs: list[BackdoorRun],
    fig_dir: Path,
    clean: frozenset[str] = frozenset(),
    searched_again: Sequence[CleanseRun] = (),
) -> None:
    """`runs`: the cleanse runs, newest first, the first read in full; `searched_again`: those that
    searched repaired models alone (the mitigation part reads them), named here when newer."""
    doc.add(Heading("3 Neural Cleanse"))
    if not runs:
        doc.add(
            Para(
                "No finished `twml cleanse` runs in this experiment: run `twml train`, `twml backdoor` and `twml "
                "cleanse`."
            )
        )
        return
    run = runs[0]
    s, norms = run.settings, run.norms
    models = sorted(int(i) for i in norms["model"].unique())
    model_runs = {i: str(norms[norms["model"] == i]["run_id"].iloc[0]) for i in models}
    doc.add(
        Para(
            f"The newest cleanse run ({short(run.id)}{_newer(run, searched_again)}) inspected "
            f"{count(len(models), 'model')}: "
            + "; ".join(f"model {i} = {model_name(model_runs[i])}" for i in models)
            + ". For every class t it searched the smallest mask m and pattern p with (1 - m)·x + m·p classified "
            f"as t on {s.search_images} clean {SPLIT_WORDS[s.search_split]} images "
            f"(attack success at least {s.search_threshold:g}, up to "
            f"{s.search_steps} rounds{_starts(s)}, all classes of a model in one batch), then applied the MAD outlier "
            "test to the L1 norms of the masks: anomaly index |l - median| / (1.4826 · MAD), classes below the "
            f"median with an index above {s.anomaly_threshold:g} are flagged."
            + (
                f" It ran {_searches_run(s, run.searches_run)}, each on its own draw of clean images, "
                f"from other starts, and flagged a class when {_how_many_agree(s)} of them did; a class's anomaly "
                f"index below is the one {_how_many_agree(s)} of the searches reach, its norm the first search's."
                if s.searches > 1
                else ""
            )
        )
    )
    doc.add(Heading("Which model is backdoored? Which class is the backdoor targeting?", 2))
    header = ["class"] + [h for i in models for h in (f"norm, model {i}", f"anomaly index, model {i}")]
    rows = []
    for c in sorted(norms["class"].unique()):
        row = [str(c)]
        for i in models:
            hit = _row(norms, i, c)
            row += [
                f"{hit['norm']:.4f}" + (" **(flagged)**" if bool(hit["flagged"]) else ""),
                f"{hit['anomaly_index']:.2f}",
            ]
        rows.append(row)
    doc.add(Table(header, rows))
    flagged = norms[norms["flagged"].astype(bool)]
    accuracy = {i: run.models[i].accuracy for i in models}
    doc.add(
        Bullets(
            [
                f"Accuracy of model {i}: **{f4(accuracy[i])}**; largest anomaly index below the median: "
                f"{run.models[i].anomaly_index:.2f}"
                for i in models
            ]
        )
    )
    if flagged.empty:
        doc.add(
            Para(
                f"**No backdoor found**: no class of any model has an anomaly index above {s.anomaly_threshold:g} "
                "below its median norm."
            )
        )
    for _, f in flagged.iterrows():
        i, c = int(f["model"]), int(f["class"])
        others = norms[(norms["model"] == i) & (norms["class"] != c)]["norm"]
        doc.add(
            Para(
                f"**Backdoor is at model {i} class {c}**: its reversed trigger has L1 norm {f['norm']:.4f} against "
                f"{others.min():.4f} to {others.max():.4f} for the other classes of that model (anomaly index "
                f"{f['anomaly_index']:.2f}, above the threshold of {s.anomaly_threshold:g}). Stamped on clean test "
                "images of other classes, it sends "
                f"{f4(run.backdoor_success_rate or 0.0)} of them to class {c} (backdoor success rate)."
                + thin_margin(f["anomaly_index"], s.anomaly_threshold)
            )
        )
    if s.searches == 1 and not flagged.empty:
        doc.add(
            Para(
                "This verdict rests on one trigger search per model, the paper's. On twml's detection matrix (8x8 "
                "digits), single searches flagged a class of 12% to 15% of 240 clean models, depending on the "
                "search's seed; twml's default, two searches that must both flag a class, 2.5%. Before acting on a "
                "flagged class, run `twml cleanse --searches 2`."
            )
        )
    _blind(doc, run)
    truth = {i: b for i in models for b in backdoor_runs if b.id == model_runs[i]}
    for i, b in truth.items():
        size, target = b.settings.trigger_size, b.settings.target
        hit = not flagged[(flagged["model"] == i) & (flagged["class"] == target)].empty
        doc.add(
            Para(
                f"Ground truth, from the `twml backdoor` run that made model {i} (Neural Cleanse read only its "
                "weights): a "
                f"{size}x{size} white square {_place(b.settings.position)} ({count(size * size, 'pixel')}) sending "
                "images to class "
                f"{target}, with attack success {f4(b.backdoor.attack_success_rate)}. "
                + (
                    "The verdict names that model and class."
                    if hit
                    else f"Neural Cleanse did not flag class {target} of model {i} "
                    f"(its anomaly index: {_row(norms, i, target)['anomaly_index']:.2f})."
                )
            )
        )
    across_runs(doc, runs, backdoor_runs, clean)
    _looks(doc, run, flagged, truth, fig_dir)
    _benign(doc, models, flagged, accuracy)


def _newer(run: CleanseRun, searched_again: Sequence[CleanseRun]) -> str:
    """'; 1 newer one searched repaired models, under Mitigation', where there are such."""
    newer = sum(c.start_time > run.start_time for c in searched_again)
    if not newer:
        return ""
    return f"; {count(newer, 'newer one')} searched repaired models, under Mitigation"


def _blind(doc: Document, run: CleanseRun) -> None:
    """Models none of whose classes could have been flagged: for them the verdict says nothing."""
    s = run.settings
    for i, ceiling in sorted(run.ceilings.items()):
        if ceiling > s.anomaly_threshold:
            continue
        index = (
            f"the largest anomaly index {_how_many_agree(s)} of its {s.searches} searches could agree on, that of a "
            "trigger of norm 0, is"
            if s.searches > 1
            else "a trigger of norm 0 would have had an anomaly index of"
        )
        doc.add(
            Para(
                f"**No class of model {i} could have been flagged**: its classes' norms spread so widely that {index} "
                f"{ceiling:.2f} (median norm / (1.4826 · MAD)), not above the threshold of {s.anomaly_threshold:g}. "
                "The MAD test cannot see a backdoor in this model, however small its trigger, so the verdict says "
                "nothing about it either way."
            )
        )


def _looks(doc: Document, run: CleanseRun, flagged: pd.DataFrame, truth: dict, fig_dir: Path) -> None:
    doc.add(Heading("How does the backdoor look?", 2))
    for name, path in run.files.items():
        if name.endswith(".png"):
            shutil.copy(path, fig_dir / f"cleanse-{name}")
    if not flagged.empty and results.TRIGGER_PNG in run.files and results.MASK_PNG in run.files:
        f = flagged.sort_values("anomaly_index", ascending=False).iloc[0]
        i, c = int(f["model"]), int(f["class"])
        if results.REVERSED_NPZ in run.files:
            with np.load(run.files[results.REVERSED_NPZ], allow_pickle=False) as z:
                mask = z[results.reversed_keys(i)[0]][c]
            doc.add(
                Para(
                    f"The reversed mask of model {i} class {c} has L1 norm {f['norm']:.4f}. "
                    + describe_mask(mask, truth.get(i))
                )
            )
        doc.add(
            FigureRow(
                [
                    Figure(
                        fig_dir / f"cleanse-{results.TRIGGER_PNG}",
                        f"Trigger for the backdoor (mask · pattern), model {i} class {c}",
                        0.25,
                    ),
                    Figure(
                        fig_dir / f"cleanse-{results.MASK_PNG}", f"Mask for the backdoor, model {i} class {c}", 0.25
                    ),
                ]
            )
        )
    elif flagged.empty:
        doc.add(
            Para(
                "No class was flagged, so there is no backdoor trigger to show; every reversed mask is in the grid "
                "below."
            )
        )
    if results.MASK_GRID_FIGURE in run.files:
        doc.add(
            Figure(
                fig_dir / f"cleanse-{results.MASK_GRID_FIGURE}",
                "Reversed masks and triggers of every class of every model (red: flagged)",
                0.95,
            )
        )
    if results.NORMS_FIGURE in run.files:
        doc.add(
            Figure(
                fig_dir / f"cleanse-{results.NORMS_FIGURE}",
                "L1 norms of the reversed masks, with the median and the detection threshold",
                0.95,
            )
        )


def _benign(doc: Document, models: list[int], flagged: pd.DataFrame, accuracy: dict[int, float]) -> None:
    doc.add(Heading("Does the backdoor maintain benign accuracy?", 2))
    if flagged.empty:
        doc.add(
            Para(
                "No model was found backdoored; benign accuracies: "
                + ", ".join(f"model {i} {f4(a)}" for i, a in accuracy.items())
                + "."
            )
        )
        return
    bad = sorted({int(v) for v in flagged["model"]})
    clean = [i for i in models if i not in bad]
    for i in bad:
        if not clean:
            doc.add(
                Para(
                    f"Model {i} (backdoored) has benign accuracy {f4(accuracy[i])}; no clean model was inspected "
                    "beside it."
                )
            )
            continue
        j = clean[0]
        doc.add(
            Para(
                f"Model {i} (backdoored) classifies clean test images with accuracy {f4(accuracy[i])} against "
                f"{f4(accuracy[j])} for model {j}, a difference of {(accuracy[i] - accuracy[j]) * 100:+.2f} points: "
                + (
                    "the backdoor keeps benign accuracy."
                    if accuracy[i] >= accuracy[j] - 0.03
                    else "the backdoor costs benign accuracy."
                )
            )
        )


def _row(norms: pd.DataFrame, model: int, c: int) -> pd.Series:
    """The norms.csv row of class c of model `model`."""
    return norms[(norms["model"] == model) & (norms["class"] == c)].iloc[0]


def thin_margin(index: float, threshold: float) -> str:
    """A caution when a flagged class sits close to the detection threshold."""
    if index >= 1.5 * threshold:
        return ""
    return (
        f" An index of {index:.2f} against a threshold of {threshold:g} is a thin margin: another training seed or "
        "device "
        f"can move it across the line, so check the verdict on backdoored models trained with other `--seed` values."
    )


def describe_mask(mask: np.ndarray, backdoor_run: BackdoorRun | None = None) -> str:
    """Where the reversed mask is strong, and how that compares with the injected trigger."""
    rows, cols = np.nonzero(mask > 0.5)
    if len(rows) == 0:
        return "No pixel of it exceeds 0.5: the trigger is spread thinly."
    where = (
        ", ".join(f"({r}, {c})" for r, c in zip(rows, cols))
        if len(rows) <= 12
        else f"rows {rows.min()}-{rows.max()}, columns {cols.min()}-{cols.max()}"
    )
    text = (
        f"{len(rows)} of its {mask.size} pixels {'exceeds' if len(rows) == 1 else 'exceed'} 0.5, at (row, column) "
        f"{where} of the "
        f"{mask.shape[0]}x{mask.shape[1]} image."
    )
    if backdoor_run is not None:
        trigger = Trigger(backdoor_run.settings.trigger_size, backdoor_run.settings.position)
        r, c = trigger.region(*mask.shape)
        inside = np.zeros(mask.shape, dtype=bool)
        inside[r, c] = True
        hits = int((inside & (mask > 0.5)).sum())
        text += (
            f" The injected square covers {_span('row', r)}, {_span('column', c)}: "
            + (
                f"the mask's one strong pixel lies {'inside' if hits else 'outside'} it"
                if len(rows) == 1
                else f"{hits} of the {len(rows)} strong pixels lie inside it"
            )
            + f", and the mask puts {trigger.weight_share(mask):.0%} of its weight there "
            f"({inside.sum() / mask.size:.0%} of the image)."
        )
    return text


def _starts(s) -> str:
    """' from 4 random starts per class, each going on from its best after 10 rounds', or ''."""
    if s.search_restarts <= 1:
        return ""
    best = f", each going on from its best after {s.search_keep_best_after} rounds" if s.search_keep_best_after else ""
    return f" from {s.search_restarts} random starts per class{best}"


def _span(noun: str, s: slice) -> str:
    """'row 7' or 'rows 6-7'."""
    return f"{noun} {s.start}" if s.stop - s.start == 1 else f"{noun}s {s.start}-{s.stop - 1}"


def _place(position: str) -> str:
    """'at the bottom-right corner', 'at the centre'."""
    return "at the centre" if position == "centre" else f"at the {position} corner"


def across_runs(doc: Document, runs: list, backdoor_runs: list, clean: frozenset[str]) -> None:
    """Over every cleanse run of the experiment (several: other models, or other search seeds of
    the same): in how many inspections of a backdoored model the true target was named and another
    class flagged, and in how many of a clean model (`clean`: twml train runs) any class was."""
    if len(runs) < 2:
        return
    truth = {b.id: b.settings.target for b in backdoor_runs}
    named, also, accused = 0, 0, 0
    backdoored: list[str] = []
    cleans: list[str] = []
    for run in runs:
        flagged: dict[int, set[int]] = {}
        for item in run.verdict.split("; ") if run.verdict != "none" else []:  # "model 1 class 0; ..."
            _, model_index, _, target = item.split()
            flagged.setdefault(int(model_index), set()).add(int(target))
        for i, model in enumerate(run.inspected):
            classes = flagged.get(i, set())
            if model in truth:
                backdoored.append(model)
                named += truth[model] in classes
                also += bool(classes - {truth[model]})
            elif model in clean:
                cleans.append(model)
                accused += bool(classes)
    parts = []
    if backdoored:
        parts.append(
            f"named the true target in {named} of {len(backdoored)} inspections of backdoored models "
            f"({count(len(set(backdoored)), 'model')}) and flagged another class in {also}"
        )
    if cleans:
        parts.append(
            f"flagged a class in {accused} of {len(cleans)} inspections of clean models "
            f"({count(len(set(cleans)), 'model')}, trained by `twml train`)"
        )
    if parts:
        doc.add(
            Para(f"Across the {len(runs)} cleanse runs of this experiment, Neural Cleanse " + "; it ".join(parts) + ".")
        )


def _searches_run(s, run: dict[int, int]) -> str:
    """'up to 3 independent searches per model (2 on model 0, 3 on model 1: ...)', where logged
    (runs logged before searches stopped once the verdict was decided ran them all)."""
    if not run:
        return f"{s.searches} independent searches per model"
    each = ", ".join(f"{n} on model {i}" for i, n in run.items())
    return (
        f"up to {s.searches} independent searches per model ({each}: a search that could not change the verdict "
        "is not run)"
    )


def _how_many_agree(s) -> str:
    if s.votes_needed < s.searches:
        return "more than half"
    return "both" if s.searches == 2 else "all"  # more than half of two is both
