"""`twml report`: the write-up, in Markdown and PDF, built only from an experiment's logged runs.

Its sections follow the seed write-up (free adversarial training, randomized smoothing,
Neural Cleanse) plus the setting; each lives in a module of its own and reads typed run
records (runs.py). Every sentence is computed from logged numbers; a study with no runs
gets one line naming the command that produces it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import tracking
from ..errors import TwmlError
from . import adversarial, cleanse, curves, mitigation, smoothing
from .document import Bullets, Document, Heading, Para, Table, to_markdown, to_pdf
from .runs import Logged, Runs, load


@dataclass
class ReportFiles:
    markdown: Path
    pdf: Path
    figures: Path
    run_id: str


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "report"


def check_out(out: Path) -> None:
    """Refuse an --out that cannot hold the report before any work starts."""
    out = Path(out)
    where = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not where.is_dir():
        raise TwmlError(f"--out '{out}': '{where}' is a file, not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        raise TwmlError(f"--out '{out}': cannot write in '{where}'")


def build(experiment: str, out: Path, uri: str, parent: str | None = None) -> ReportFiles:
    """Write <out>/<experiment>.md and .pdf with figures in <out>/<experiment>/, and log them
    as artifacts of a run tagged twml.command=report (nested under `parent` if given). An
    experiment with no runs at all is refused: there is nothing to write up."""
    if not tracking.list_runs(experiment):
        raise TwmlError(
            f"experiment '{experiment}' has no runs in {uri}: run `twml reproduce` or a study first, or name another "
            "--experiment"
        )
    runs = load(experiment)
    out = Path(out)
    fig_dir = out / slug(experiment)
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    fig_dir.mkdir(parents=True)
    doc = document(experiment, runs, fig_dir, uri)
    md, pdf = out / f"{slug(experiment)}.md", out / f"{slug(experiment)}.pdf"
    md.write_text(to_markdown(doc, out))
    to_pdf(doc, pdf)
    with tracking.start_run(experiment, "report", run_name="report", parent=parent) as run:
        run.log_params({"experiment": experiment, "runs": len(runs.all)})
        run.log_json([r.id for r in runs.all], "sources.json")
        run.log_file(md)
        run.log_file(pdf)
        run.log_dir(fig_dir, "figures")
    return ReportFiles(md, pdf, fig_dir, run.id)


def document(experiment: str, runs: Runs, fig_dir: Path, uri: str) -> Document:
    doc = Document(f"Trustworthy ML with twml: experiment '{experiment}'")
    if not runs.all:
        doc.add(
            Para(f"No finished runs in experiment '{experiment}': run `twml reproduce`, or the single commands, first.")
        )
    drawn = runs.sweep("attack", "eps")  # its runs are the robustness curves
    adversarial.section(
        doc, runs.train, runs.attack, fig_dir, frozenset(drawn.table["run_id"]) if drawn else frozenset()
    )
    curves.m_curve(doc, runs, fig_dir)
    curves.robustness_curves(doc, runs, fig_dir)
    smoothing.section(doc, runs.smooth, fig_dir)
    smoothing.training_methods(doc, runs.smooth, fig_dir)
    curves.sigma_curves(doc, runs, fig_dir)
    cleanse.section(doc, runs.cleanse, runs.backdoor, fig_dir, frozenset(r.id for r in runs.train), runs.searched_again)
    mitigation.section(doc, runs.mitigate, runs.cleanse[0] if runs.cleanse else None, runs.searched_again, fig_dir)
    if runs.all:
        setting_section(doc, experiment, runs.all, uri)
    return doc


def setting_section(doc: Document, experiment: str, all_runs: list[Logged], uri: str) -> None:
    doc.add(Heading("4 Setting"))
    newest = all_runs[0]

    def values(key: str) -> str:
        return ", ".join(sorted({r.param(key) for r in all_runs if r.param(key)})) or "n/a"

    doc.add(
        Bullets(
            [
                f"MLflow experiment `{experiment}` in `{uri}`: browse it with `mlflow ui`",
                f"data set: {values('dataset')}; model: {values('model')}; preset: {newest.param('preset', 'n/a')}",
                f"device: {values('device')}",
                f"twml {newest.param('twml_version')}, torch {newest.param('torch_version')}, timm "
                f"{newest.param('timm_version')}, "
                f"Python {newest.param('python_version')}",
            ]
        ),
        Para("Every run this report read, newest first:"),
        Table(
            ["command", "run name", "run id", "started (UTC)"],
            [
                [r.command, r.name, r.id, pd.Timestamp(r.start_time, unit="ms").strftime("%Y-%m-%d %H:%M:%S")]
                for r in all_runs
            ],
        ),
    )
