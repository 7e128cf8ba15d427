"""`twml report`: the write-up, in Markdown and PDF, built only from an experiment's logged runs.

Its sections follow the seed write-up (free adversarial training, randomized smoothing,
Neural Cleanse) plus the setting. Every sentence is computed from logged numbers; a study
with no runs gets one line naming the command that produces it. One document model is
rendered twice, to Markdown and to PDF (fpdf2, DejaVu fonts shipped with matplotlib, so
sigma renders and no LaTeX or system package is needed).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import figures, tracking
from .smoothing import ABSTAIN, certified_accuracy

REPORT_RADII = (0.0, 0.05, 0.1, 0.25, 0.5)


# ---------------------------------------------------------------- document model


@dataclass
class Heading:
    text: str
    level: int = 1


@dataclass
class Para:
    text: str  # may hold **bold** and `code`


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    path: Path
    caption: str
    width: float = 0.8  # fraction of the text width in the PDF


@dataclass
class FigureRow:
    """Small figures side by side (one after the other in Markdown)."""

    figures: list[Figure]


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


def to_markdown(doc: Document, relative_to: Path) -> str:
    out = [f"# {doc.title}", ""]
    figure_no = 0
    for b in doc.blocks:
        if isinstance(b, Heading):
            out += ["#" * (b.level + 1) + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            out += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            out += ["| " + " | ".join(r) + " |" for r in b.rows] + [""]
        elif isinstance(b, (Figure, FigureRow)):
            for f in b.figures if isinstance(b, FigureRow) else [b]:
                figure_no += 1
                out += [f"![{f.caption}]({f.path.relative_to(relative_to).as_posix()})", "", f"*Figure {figure_no}: {f.caption}*", ""]
    return "\n".join(out)


def to_pdf(doc: Document, path: Path) -> None:
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    fonts = Path(figures.matplotlib.get_data_path()) / "fonts" / "ttf"
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_font("Sans", "", str(fonts / "DejaVuSans.ttf"))
    pdf.add_font("Sans", "B", str(fonts / "DejaVuSans-Bold.ttf"))
    pdf.add_font("Sans", "I", str(fonts / "DejaVuSans-Oblique.ttf"))
    pdf.add_font("Mono", "", str(fonts / "DejaVuSansMono.ttf"))
    pdf.add_page()
    pdf.set_font("Sans", "B", 18)
    pdf.multi_cell(0, 9, doc.title, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)

    def inline(text: str, size: float = 10) -> None:
        """Text with **bold** and `code` spans from the current position, wrapped at the margins."""
        for part in re.split(r"(\*\*.+?\*\*|`.+?`)", text):
            if part.startswith("**") and part.endswith("**") and len(part) > 4:
                pdf.set_font("Sans", "B", size)
                pdf.write(5.2, part[2:-2])
            elif part.startswith("`") and part.endswith("`") and len(part) > 2:
                pdf.set_font("Mono", "", size - 0.5)
                pdf.write(5.2, part[1:-1])
            elif part:
                pdf.set_font("Sans", "", size)
                pdf.write(5.2, part)
        pdf.ln(6.5)

    figure_no = 0
    for b in doc.blocks:
        if isinstance(b, Heading):
            if pdf.get_y() > pdf.h - pdf.b_margin - (60 if b.level == 1 else 35):  # keep it with what follows
                pdf.add_page()
            pdf.ln(2)
            pdf.set_font("Sans", "B", {1: 14, 2: 11.5}.get(b.level, 10.5))
            pdf.multi_cell(0, 7, b.text, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(1)
        elif isinstance(b, Para):
            inline(b.text)
        elif isinstance(b, Bullets):
            left = pdf.l_margin
            for item in b.items:  # a hanging indent: wrapped lines align after the bullet
                pdf.set_font("Sans", "", 10)
                pdf.set_x(left + 1)
                pdf.write(5.2, "\u2022")
                pdf.set_left_margin(left + 5)
                pdf.set_x(left + 5)
                inline(item)
                pdf.set_left_margin(left)
        elif isinstance(b, Table):
            size = 8 if len(b.header) <= 8 else 7
            pdf.set_font("Sans", "", size)
            widths = [  # wide enough for every cell and for the longest word of the header
                max([len(c.replace("`", "").replace("**", "")) for c in cells] + [len(w) for w in head.split()]) + 2
                for head, *cells in zip(b.header, *b.rows)
            ]
            with pdf.table(col_widths=widths, text_align="CENTER", line_height=4.6, first_row_as_headings=True) as table:
                header = table.row()
                for h in b.header:
                    header.cell(h.replace("`", ""))
                for r in b.rows:
                    row = table.row()
                    for cell in r:
                        row.cell(cell.replace("`", "").replace("**", ""))
            pdf.ln(3)
        elif isinstance(b, (Figure, FigureRow)):
            row = b.figures if isinstance(b, FigureRow) else [b]
            widths = [pdf.epw * f.width for f in row]
            heights = [w * _aspect(f.path) for w, f in zip(widths, row)]
            if pdf.get_y() + max(heights) + 12 > pdf.h - pdf.b_margin:
                pdf.add_page()
            gap = 8
            x = pdf.l_margin + (pdf.epw - sum(widths) - gap * (len(row) - 1)) / 2
            top = pdf.get_y()
            for f, w, h in zip(row, widths, heights):
                figure_no += 1
                pdf.image(str(f.path), x=x, y=top, w=w)
                pdf.set_xy(x - gap / 2, top + h + 1)
                pdf.set_font("Sans", "I", 8.5)
                pdf.multi_cell(w + gap, 4.5, f"Figure {figure_no}: {f.caption}", align="C")
                x += w + gap
            pdf.set_xy(pdf.l_margin, top + max(heights) + 1 + 4.5 * 2 + 2)
    pdf.output(str(path))


def _aspect(path: Path) -> float:
    from PIL import Image

    with Image.open(path) as img:
        return img.height / img.width


# ---------------------------------------------------------------- wording from numbers


def f4(v: float) -> str:
    return f"{v:.4f}"


def secs(v: float) -> str:
    return f"{v:.1f} s"


def change(before: float, after: float, fmt=f4, points: bool = True) -> str:
    """'rose from A to B (+d points)', 'fell from ...', or 'stayed at A'."""
    if abs(after - before) < 5e-5:
        return f"stayed at {fmt(before)}"
    verb = "rose" if after > before else "fell"
    delta = f" ({(after - before) * 100:+.2f} points)" if points else f" (x{after / before:.2f})" if before else ""
    return f"{verb} from {fmt(before)} to {fmt(after)}{delta}"


def short(run_id: str) -> str:
    return run_id[:8]


def _p(run, key: str, default: str = "") -> str:
    return run.data.params.get(key, default)


def _m(run, key: str) -> float:
    return run.data.metrics.get(key, float("nan"))


# ---------------------------------------------------------------- sections


def adversarial_section(doc: Document, runs: list, attack_runs: list, fig_dir: Path) -> None:
    doc.add(Heading("1 Free adversarial training"))
    if not runs:
        doc.add(Para("No finished `twml train` runs in this experiment: run `twml train`, `twml train --free --m 4` and `twml train --free --m 7`."))
        return
    doc.add(
        Para(
            "Every finished training run. PGD is untargeted, white-box, L-inf with a random start; its success rate "
            "counts every misclassified adversarial example (inputs already misclassified included), and robust "
            "accuracy is its complement. Run ids are shortened; section 4 lists them whole."
        ),
        Table(
            ["method", "m", "data", "model", "eps", "epochs", "train time", "accuracy", "PGD success", "robust acc.", "PGD", "run"],
            [
                [
                    _p(r, "method"), _p(r, "m"), _p(r, "dataset"), _p(r, "model"), f"{float(_p(r, 'eps', 'nan')):.4g}",
                    _p(r, "epochs"), secs(_m(r, "train_time_s")), f4(_m(r, "accuracy")), f4(_m(r, "pgd_success_rate")),
                    f4(_m(r, "robust_accuracy")), f"{_p(r, 'pgd_steps')}x{_p(r, 'pgd_restarts')}", short(r.info.run_id),
                ]
                for r in runs
            ],
        ),
    )  # fmt: skip
    labels = [f"{_p(r, 'method')}" + (f" m={_p(r, 'm')}" if _p(r, "method") == "free" else "") + f"\n{short(r.info.run_id)}" for r in runs]
    bars = figures.adversarial_bars_figure(labels, [_m(r, "accuracy") for r in runs], [_m(r, "pgd_success_rate") for r in runs])
    fig = figures.save(bars, fig_dir / "adversarial-training.png")
    doc.add(Figure(fig, "Benign accuracy and PGD success rate of every training run", 0.75))

    # The questions compare the newest run of each kind trained like the newest standard run.
    standard = next((r for r in runs if _p(r, "method") == "standard"), None)
    like = (lambda r: all(_p(r, k) == _p(standard, k) for k in ("dataset", "model", "eps", "epochs"))) if standard else (lambda r: True)
    free: dict[int, object] = {}
    for r in runs:
        if _p(r, "method") == "free" and like(r):
            free.setdefault(int(_p(r, "m")), r)

    doc.add(Heading("How much time did it take to train each of the models?", 2))
    items = []
    if standard is not None:
        items.append(f"standard training: **{secs(_m(standard, 'train_time_s'))}**")
    for m, r in sorted(free.items()):
        ratio = f" ({_m(r, 'train_time_s') / _m(standard, 'train_time_s'):.2f}x standard)" if standard is not None else ""
        items.append(f"free adversarial training, m = {m}: **{secs(_m(r, 'train_time_s'))}**{ratio}")
    doc.add(Bullets(items))
    if standard is not None and free:
        steps = {m: int(_m(r, "sgd_steps")) for m, r in free.items()}
        same = all(s == int(_m(standard, "sgd_steps")) for s in steps.values())
        doc.add(
            Para(
                f"Free training replays each minibatch m times and makes ceil(epochs / m) passes, so at "
                f"{_p(standard, 'epochs')} epochs of budget it makes "
                + ("the same number of SGD steps as standard training" if same else "slightly more SGD steps than standard training (epochs not divisible by m)")
                + f" ({int(_m(standard, 'sgd_steps'))} for standard; "
                + ", ".join(f"{s} for m = {m}" for m, s in sorted(steps.items()))
                + "), so the times above compare equal SGD budgets."
            )
        )

    doc.add(Heading("What was the effect of adversarial training on benign accuracy and robustness?", 2))
    if standard is None or not free:
        doc.add(Para("This needs a standard and a free run trained alike: run `twml train` and `twml train --free --m 4`."))
    else:
        m0 = 4 if 4 in free else min(free)
        r = free[m0]
        acc_delta = _m(r, "accuracy") - _m(standard, "accuracy")
        rob_delta = _m(standard, "pgd_success_rate") - _m(r, "pgd_success_rate")
        doc.add(
            Para(
                f"With free adversarial training (m = {m0}, eps = {float(_p(r, 'eps')):.4g}) benign accuracy "
                f"{change(_m(standard, 'accuracy'), _m(r, 'accuracy'))} and the success rate of untargeted white-box PGD "
                f"{change(_m(standard, 'pgd_success_rate'), _m(r, 'pgd_success_rate'))}; robust accuracy "
                f"{change(_m(standard, 'robust_accuracy'), _m(r, 'robust_accuracy'))}."
            ),
            Para(_tradeoff(acc_delta, rob_delta)),
        )

    doc.add(Heading("Increasing m: what is the impact on training time, benign accuracy and robustness?", 2))
    if len(free) < 2:
        doc.add(Para("This needs free runs with two values of m: run `twml train --free --m 4` and `twml train --free --m 7`."))
    else:
        lo, hi = (4, 7) if {4, 7} <= set(free) else (min(free), max(free))
        a, b = free[lo], free[hi]
        doc.add(
            Para(
                f"From m = {lo} to m = {hi}, training time {change(_m(a, 'train_time_s'), _m(b, 'train_time_s'), secs, points=False)}, "
                f"benign accuracy {change(_m(a, 'accuracy'), _m(b, 'accuracy'))} and the PGD success rate "
                f"{change(_m(a, 'pgd_success_rate'), _m(b, 'pgd_success_rate'))}; robust accuracy "
                f"{change(_m(a, 'robust_accuracy'), _m(b, 'robust_accuracy'))}."
            ),
            Para(
                f"At an equal SGD budget a larger m makes fewer passes over the data ({int(np.ceil(int(_p(a, 'epochs')) / lo))} "
                f"against {int(np.ceil(int(_p(b, 'epochs')) / hi))}) with more ascent steps on each minibatch."
            ),
        )
    if attack_runs:
        doc.add(
            Heading("Stronger attacks on logged models", 2),
            Para("`twml attack` re-evaluations; a robustness claim should survive more steps and restarts."),
            Table(
                ["model run", "eps", "PGD", "accuracy", "PGD success", "robust acc.", "run"],
                [
                    [short(_p(r, "model_run") or _p(r, "model_path")), f"{float(_p(r, 'eps', 'nan')):.4g}",
                     f"{_p(r, 'pgd_steps')}x{_p(r, 'pgd_restarts')}", f4(_m(r, "accuracy")), f4(_m(r, "pgd_success_rate")),
                     f4(_m(r, "robust_accuracy")), short(r.info.run_id)]
                    for r in attack_runs
                ],
            ),
        )  # fmt: skip


def _tradeoff(acc_delta: float, rob_delta: float) -> str:
    acc = f"{abs(acc_delta) * 100:.2f} points of benign accuracy"
    rob = f"{abs(rob_delta) * 100:.2f} points of PGD success rate"
    if rob_delta > 0 and acc_delta < 0:
        return f"Adversarial training traded {acc} for {rob}: a small loss of accuracy for a large gain in robustness." if rob_delta > 2 * -acc_delta else f"Adversarial training traded {acc} for {rob}."
    if rob_delta > 0:
        return f"Here adversarial training cost no benign accuracy (it gained {acc}) and removed {rob}."
    return f"Here adversarial training did not make the model more robust: the PGD success rate changed by {-rob_delta * 100:+.2f} points."


def smoothing_section(doc: Document, runs: list, fig_dir: Path) -> None:
    doc.add(Heading("2 Randomized smoothing"))
    if not runs:
        doc.add(Para("No finished `twml smooth` runs in this experiment: run `twml smooth --sigma 0.05 --sigma 0.20`."))
        return
    newest: dict[float, object] = {}
    for r in runs:
        newest.setdefault(float(_p(r, "sigma")), r)
    tables = {}
    for sigma, r in newest.items():
        path = tracking.download_artifact(r.info.run_id, "certify.csv")
        if path:
            tables[sigma] = pd.read_csv(path)
    if not tables:
        doc.add(Para("The smoothing runs hold no `certify.csv`; run `twml smooth` again."))
        return
    top = max(float(t["radius"].max()) for t in tables.values())
    grid = np.linspace(0, max(top, 1e-3) * 1.1, 301)
    curves = {s: (grid, certified_accuracy(t["radius"].to_numpy(), t["correct"].to_numpy(), grid)) for s, t in tables.items()}
    fig = figures.certified_accuracy_figure(curves)
    fig.savefig(fig_dir / "randomized-smoothing-acc-vs-radius.pdf", bbox_inches="tight")
    png = figures.save(fig, fig_dir / "randomized-smoothing-acc-vs-radius.png")
    first = newest[min(tables)]
    doc.add(
        Para(
            f"The newest run of each σ. Each base classifier was trained with Gaussian noise at its σ; CERTIFY (Cohen et al., 2019) "
            f"used n0 = {_p(first, 'n0')}, n = {_p(first, 'n')}, α = {_p(first, 'alpha')} on {_p(first, 'num_examples')} evenly "
            f"spaced test images. Certified accuracy at radius r counts the examples classified correctly with a certified L2 "
            f"radius of at least r (abstentions count as wrong); radii are in [0, 1] pixel units."
        ),
        Figure(png, "randomized-smoothing-acc-vs-radius: certified accuracy against L2 radius, one curve per σ", 0.7),
        Table(
            ["σ", "accuracy (base)"] + [f"cert. acc. r={r:g}" for r in REPORT_RADII] + ["abstain", "ACR", "max radius", "run"],
            [
                [f"{s:g}", f4(_m(newest[s], "accuracy"))]
                + [f4(a) for a in certified_accuracy(t["radius"].to_numpy(), t["correct"].to_numpy(), np.array(REPORT_RADII))]
                + [f4(float((t["predict"] == ABSTAIN).mean())), f4(_m(newest[s], "average_certified_radius")),
                   f4(float(t["radius"].max())), short(newest[s].info.run_id)]
                for s, t in sorted(tables.items())
            ],
        ),
    )  # fmt: skip
    doc.add(Heading("What is the outcome of increasing σ?", 2))
    if len(tables) < 2:
        doc.add(Para("This needs two noise levels: run `twml smooth --sigma 0.05 --sigma 0.20`."))
        return
    lo, hi = min(tables), max(tables)
    a, b = tables[lo], tables[hi]
    ra, rb = float(a["radius"].max()), float(b["radius"].max())
    cert = lambda t, r: float(certified_accuracy(t["radius"].to_numpy(), t["correct"].to_numpy(), np.array([r]))[0])  # noqa: E731
    n, alpha = int(_p(newest[lo], "n")), float(_p(newest[lo], "alpha"))
    cap = float(np.exp(np.log(alpha) / n))
    from scipy.stats import norm

    doc.add(
        Para(
            f"From σ = {lo:g} to σ = {hi:g} the largest certified radius {change(ra, rb, points=False)}, the average certified "
            f"radius {change(_m(newest[lo], 'average_certified_radius'), _m(newest[hi], 'average_certified_radius'), points=False)}, "
            f"certified accuracy at r = 0 {change(cert(a, 0), cert(b, 0))} and the abstain rate "
            f"{change(float((a['predict'] == ABSTAIN).mean()), float((b['predict'] == ABSTAIN).mean()))}. At r = {ra:.3f}, the "
            f"largest radius σ = {lo:g} certifies, σ = {hi:g} still certifies {f4(cert(b, ra))} of the examples."
        ),
        Para(
            f"The certified radius is σ·Φ⁻¹(p_A): at the same confidence p_A it grows in proportion to σ. With n = {n} and "
            f"α = {alpha:g}, p_A cannot be certified above {cap:.4f}, so no radius beyond {norm.ppf(cap):.2f}σ is possible: "
            f"{norm.ppf(cap) * lo:.3f} for σ = {lo:g} and {norm.ppf(cap) * hi:.3f} for σ = {hi:g}. "
            + (
                "A larger σ smooths the classifier more, moving its decision boundary farther from the data, and here its "
                "certified accuracy falls more slowly with the radius (larger average certified radius)"
                if _m(newest[hi], "average_certified_radius") > _m(newest[lo], "average_certified_radius")
                else "Here the larger σ did not certify more on average (smaller average certified radius)"
            )
            + (
                f"; the price is accuracy at small radii, as the base classifier sees noisier images (clean accuracy "
                f"{change(_m(newest[lo], 'accuracy'), _m(newest[hi], 'accuracy'))})."
                if cert(b, 0) < cert(a, 0)
                else f"; here that cost no accuracy at r = 0 (clean accuracy of the base classifier "
                f"{change(_m(newest[lo], 'accuracy'), _m(newest[hi], 'accuracy'))})."
            )
        ),
    )


def cleanse_section(doc: Document, runs: list, backdoor_runs: list, fig_dir: Path) -> None:
    doc.add(Heading("3 Neural Cleanse"))
    if not runs:
        doc.add(Para("No finished `twml cleanse` runs in this experiment: run `twml train`, `twml backdoor` and `twml cleanse`."))
        return
    run = runs[0]
    rid = run.info.run_id
    norms_path = tracking.download_artifact(rid, "norms.csv")
    if not norms_path:
        doc.add(Para(f"The cleanse run {short(rid)} holds no `norms.csv`; run `twml cleanse` again."))
        return
    norms = pd.read_csv(norms_path)
    models = sorted(norms["model"].unique())
    model_runs = {i: norms[norms["model"] == i]["run_id"].iloc[0] for i in models}
    doc.add(
        Para(
            f"The newest cleanse run ({short(rid)}) inspected {len(models)} models: "
            + "; ".join(f"model {i} = run {short(str(model_runs[i]))}" for i in models)
            + f". For every class t it searched the smallest mask m and pattern p with (1 - m)·x + m·p classified as t on "
            f"{_p(run, 'num_images')} clean training images (attack success at least {_p(run, 'threshold')}, up to "
            f"{_p(run, 'steps')} rounds, all classes of a model in one batch), then applied the MAD outlier test to the L1 "
            f"norms of the masks: anomaly index |l - median| / (1.4826 · MAD), classes below the median with an index above "
            f"{_p(run, 'anomaly_threshold')} are flagged."
        )
    )
    doc.add(Heading("Which model is backdoored? Which class is the backdoor targeting?", 2))
    header = ["class"] + [h for i in models for h in (f"norm, model {i}", f"anomaly index, model {i}")]
    rows = []
    for c in sorted(norms["class"].unique()):
        row = [str(c)]
        for i in models:
            hit = _row(norms, i, c)
            mark = " **(flagged)**" if bool(hit["flagged"]) else ""
            row += [f"{hit['norm']:.4f}{mark}", f"{hit['anomaly_index']:.2f}"]
        rows.append(row)
    doc.add(Table(header, rows))
    flagged = norms[norms["flagged"].astype(bool)]
    threshold = float(_p(run, "anomaly_threshold"))
    accuracy = {i: _m(run, f"model{i}_accuracy") for i in models}
    lines = [f"Accuracy of model {i}: **{f4(accuracy[i])}**; largest anomaly index below the median: {_m(run, f'model{i}_anomaly_index'):.2f}" for i in models]
    doc.add(Bullets(lines))
    if flagged.empty:
        doc.add(Para(f"**No backdoor found**: no class of any model has an anomaly index above {_p(run, 'anomaly_threshold')} below its median norm."))
    else:
        for _, f in flagged.iterrows():
            i, c = int(f["model"]), int(f["class"])
            others = norms[(norms["model"] == i) & (norms["class"] != c)]["norm"]
            doc.add(
                Para(
                    f"**Backdoor is at model {i} class {c}**: its reversed trigger has L1 norm {f['norm']:.4f} against "
                    f"{others.min():.4f} to {others.max():.4f} for the other classes of that model (anomaly index "
                    f"{f['anomaly_index']:.2f}). Stamped on clean test images of other classes, it sends "
                    f"{f4(_m(run, 'backdoor_success_rate'))} of them to class {c} (backdoor success rate)."
                    + _thin_margin(f["anomaly_index"], threshold)
                )
            )
    truth = {i: b for i in models for b in backdoor_runs if b.info.run_id == str(model_runs[i])}
    for i, b in truth.items():
        target, size = int(_p(b, "target")), int(_p(b, "trigger_size"))
        hit = not flagged[(flagged["model"] == i) & (flagged["class"] == target)].empty
        doc.add(
            Para(
                f"Ground truth, from the `twml backdoor` run that made model {i} (Neural Cleanse read only its weights): a "
                f"{size}x{size} white square at the {_p(b, 'position')} corner ({size * size} pixels) sending images to class "
                f"{target}, with attack success {f4(_m(b, 'attack_success_rate'))}. "
                + ("The verdict names that model and class." if hit else f"Neural Cleanse did not flag class {target} of model {i} "
                   f"(its anomaly index: {_row(norms, i, target)['anomaly_index']:.2f}).")
            )
        )

    doc.add(Heading("How does the backdoor look?", 2))
    got = {name: tracking.download_artifact(rid, name) for name in ("trigger.png", "mask.png", "mask-grid.png", "norms.png", "reversed-triggers.npz")}
    for name in ("trigger.png", "mask.png", "mask-grid.png", "norms.png"):
        if got[name]:
            shutil.copy(got[name], fig_dir / f"cleanse-{name}")
    if not flagged.empty and got["trigger.png"] and got["mask.png"]:
        f = flagged.sort_values("anomaly_index", ascending=False).iloc[0]
        i, c = int(f["model"]), int(f["class"])
        if got["reversed-triggers.npz"]:
            with np.load(got["reversed-triggers.npz"], allow_pickle=False) as z:
                mask = z[f"model{i}_masks"][c]
            doc.add(Para(f"The reversed mask of model {i} class {c} has L1 norm {f['norm']:.4f}. " + _describe_mask(mask, truth.get(i))))
        doc.add(
            FigureRow(
                [
                    Figure(fig_dir / "cleanse-trigger.png", f"Trigger for the backdoor (mask · pattern), model {i} class {c}", 0.25),
                    Figure(fig_dir / "cleanse-mask.png", f"Mask for the backdoor, model {i} class {c}", 0.25),
                ]
            )
        )
    elif flagged.empty:
        doc.add(Para("No class was flagged, so there is no backdoor trigger to show; every reversed mask is in the grid below."))
    if got["mask-grid.png"]:
        doc.add(Figure(fig_dir / "cleanse-mask-grid.png", "Reversed masks and triggers of every class of every model (red: flagged)", 0.95))
    if got["norms.png"]:
        doc.add(Figure(fig_dir / "cleanse-norms.png", "L1 norms of the reversed masks, with the median and the detection threshold", 0.95))

    doc.add(Heading("Does the backdoor maintain benign accuracy?", 2))
    if flagged.empty:
        doc.add(Para("No model was found backdoored; benign accuracies: " + ", ".join(f"model {i} {f4(a)}" for i, a in accuracy.items()) + "."))
    else:
        bad = sorted({int(v) for v in flagged["model"]})
        clean = [i for i in models if i not in bad]
        for i in bad:
            if clean:
                j = clean[0]
                doc.add(
                    Para(
                        f"Model {i} (backdoored) classifies clean test images with accuracy {f4(accuracy[i])} against "
                        f"{f4(accuracy[j])} for model {j}, a difference of {(accuracy[i] - accuracy[j]) * 100:+.2f} points: "
                        + ("the backdoor keeps benign accuracy." if accuracy[i] >= accuracy[j] - 0.03 else "the backdoor costs benign accuracy.")
                    )
                )
            else:
                doc.add(Para(f"Model {i} (backdoored) has benign accuracy {f4(accuracy[i])}; no clean model was inspected beside it."))


def _row(norms: pd.DataFrame, model: int, c: int) -> pd.Series:
    """The norms.csv row of class c of model `model`."""
    return norms[(norms["model"] == model) & (norms["class"] == c)].iloc[0]


def _thin_margin(index: float, threshold: float) -> str:
    """A caution when a flagged class sits close to the detection threshold."""
    if index >= 1.5 * threshold:
        return ""
    return (
        f" An index of {index:.2f} against a threshold of {threshold:g} is a thin margin: another training seed or device "
        f"can move it across the line, so check the verdict on backdoored models trained with other `--seed` values."
    )


def _describe_mask(mask: np.ndarray, backdoor_run=None) -> str:
    """Where the reversed mask is strong, and how that compares with the injected trigger."""
    from .backdoor import Trigger

    rows, cols = np.nonzero(mask > 0.5)
    if len(rows) == 0:
        return "No pixel of it exceeds 0.5: the trigger is spread thinly."
    where = (
        ", ".join(f"({r}, {c})" for r, c in zip(rows, cols))
        if len(rows) <= 12
        else f"rows {rows.min()}-{rows.max()}, columns {cols.min()}-{cols.max()}"
    )
    text = f"{len(rows)} of its {mask.size} pixels exceed 0.5, at (row, column) {where} of the {mask.shape[0]}x{mask.shape[1]} image."
    if backdoor_run is not None:
        trigger = Trigger(int(_p(backdoor_run, "trigger_size")), _p(backdoor_run, "position"))
        r, c = trigger.region(*mask.shape)
        inside = np.zeros(mask.shape, dtype=bool)
        inside[r, c] = True
        hits = int((inside & (mask > 0.5)).sum())
        text += (
            f" The injected square covers rows {r.start}-{r.stop - 1}, columns {c.start}-{c.stop - 1}: {hits} of the "
            f"{len(rows)} strong pixels lie inside it, and the mask puts {mask[inside].sum() / mask.sum():.0%} of its "
            f"weight there ({inside.sum() / mask.size:.0%} of the image)."
        )
    return text


def setting_section(doc: Document, experiment: str, all_runs: list, uri: str) -> None:
    doc.add(Heading("4 Setting"))
    newest = all_runs[0]
    datasets = sorted({_p(r, "dataset") for r in all_runs if _p(r, "dataset")})
    archs = sorted({_p(r, "model") for r in all_runs if _p(r, "model")})
    devices = sorted({_p(r, "device") for r in all_runs if _p(r, "device")})
    doc.add(
        Bullets(
            [
                f"MLflow experiment `{experiment}` in `{uri}`: browse it with `mlflow ui`",
                f"data set: {', '.join(datasets) or 'n/a'}; model: {', '.join(archs) or 'n/a'}; preset: {_p(newest, 'preset', 'n/a')}",
                f"device: {', '.join(devices) or 'n/a'}",
                f"twml {_p(newest, 'twml_version')}, torch {_p(newest, 'torch_version')}, timm {_p(newest, 'timm_version')}, "
                f"Python {_p(newest, 'python_version')}",
            ]
        ),
        Para("Every run this report read, newest first:"),
        Table(
            ["command", "run name", "run id", "started (UTC)"],
            [
                [r.data.tags.get(tracking.COMMAND_TAG, ""), r.info.run_name or "", r.info.run_id,
                 pd.Timestamp(r.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M:%S")]
                for r in all_runs
            ],
        ),
    )  # fmt: skip


# ---------------------------------------------------------------- build


@dataclass
class ReportFiles:
    markdown: Path
    pdf: Path
    figures: Path
    run_id: str


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "report"


def build(experiment: str, out: Path, uri: str) -> ReportFiles:
    """Write <out>/<experiment>.md and .pdf with figures in <out>/<experiment>/, and log them
    as artifacts of a run tagged twml.command=report."""
    commands = ("train", "attack", "smooth", "backdoor", "cleanse")
    runs = {c: tracking.find_runs(experiment, c) for c in commands}
    all_runs = sorted((r for rs in runs.values() for r in rs), key=lambda r: r.info.start_time, reverse=True)
    out = Path(out)
    fig_dir = out / slug(experiment)
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    fig_dir.mkdir(parents=True)
    doc = Document(f"Trustworthy ML with twml: experiment '{experiment}'")
    if not all_runs:
        doc.add(Para(f"No finished runs in experiment '{experiment}': run `twml reproduce`, or the single commands, first."))
    adversarial_section(doc, runs["train"], runs["attack"], fig_dir)
    smoothing_section(doc, runs["smooth"], fig_dir)
    cleanse_section(doc, runs["cleanse"], runs["backdoor"], fig_dir)
    if all_runs:
        setting_section(doc, experiment, all_runs, uri)
    md = out / f"{slug(experiment)}.md"
    pdf = out / f"{slug(experiment)}.pdf"
    md.write_text(to_markdown(doc, out))
    to_pdf(doc, pdf)
    with tracking.start_run(experiment, "report", run_name="report") as run:
        run.log_params({"experiment": experiment, "runs": len(all_runs)})
        run.log_json([r.info.run_id for r in all_runs], "sources.json")
        run.log_file(md)
        run.log_file(pdf)
        run.log_dir(fig_dir, "figures")
    return ReportFiles(md, pdf, fig_dir, run.id)
