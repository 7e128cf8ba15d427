"""`twml reproduce`: the whole write-up in one command, under one parent run; with `--curves`,
also the sweeps its curve sections need (free training against m, robustness against eps,
smoothing across sigmas, each over several seeds)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .. import config, distributed, tracking
from . import backdoor
from .runner import Session, _parent, execute, execute_all, mitigate_all

SIGMAS = (0.05, 0.20)
CURVE_M = (1, 2, 4, 7)  # divide the digits preset's 28 epochs: equal SGD steps
CURVE_EPS = (0.025, 0.05, 0.1, 0.15, 0.2)
CURVE_SIGMAS = (0.12, 0.25, 0.5)


def reproduce(preset: config.Preset, overrides: dict, session: Session, out: Path, curve_seeds: int = 0):
    """The whole write-up: standard, free m=4 and m=7 training; smoothing at sigma 0.05 and
    0.20; a BadNets model; Neural Cleanse on the standard and the backdoored model; its
    mitigation (unlearning, pruning and the input filter); with curve_seeds > 0 the curve sweeps over that many
    seeds (from --seed on); the report. Every setting is checked before the first run starts."""
    from .. import report

    base = config.resolve_one("train", preset, overrides)
    trainings = [
        dataclasses.replace(base, method="standard"),
        *(dataclasses.replace(base, method="free", m=m) for m in (4, 7)),
    ]
    smoothing = config.resolve("smooth", preset, overrides)[0]
    smoothings = [dataclasses.replace(smoothing, sigma=sigma) for sigma in SIGMAS]
    poisoning = config.resolve_one("backdoor", preset, overrides)
    cleansing = config.resolve_one("cleanse", preset, overrides)
    mitigating = config.resolve_one("mitigate", preset, overrides)
    backdoor.prepare(poisoning)  # its data-dependent checks (target class, trigger size) too
    seeds = [base.seed + k for k in range(curve_seeds)]
    curves = _curve_settings(preset, overrides, seeds) if curve_seeds else None
    if distributed.rank() == 0:
        tracking.experiment_id(session.experiment)  # the store and experiment exist before any step runs
    ids: dict = {}  # run ids (and the cleanse run's outcome) the later steps need
    began = time.perf_counter()
    with _parent(session, "reproduce", "reproduce" + (" --curves" if curve_seeds else "")) as (nested, _):
        steps = [
            ("standard training", lambda: ids.update(standard=execute("train", trainings[0], nested)[0])),
            ("free adversarial training, m = 4", lambda: execute("train", trainings[1], nested)),
            ("free adversarial training, m = 7", lambda: execute("train", trainings[2], nested)),
            ("randomized smoothing, sigma = 0.05 and 0.20", lambda: execute_all("smooth", smoothings, nested)),
            ("BadNets backdoor", lambda: ids.update(backdoor=execute("backdoor", poisoning, nested)[0])),
            (
                "Neural Cleanse on the standard and the backdoored model",
                lambda: ids.update(
                    cleanse=execute(
                        "cleanse", dataclasses.replace(cleansing, model_runs=[ids["standard"], ids["backdoor"]]), nested
                    )
                ),
            ),
            (
                "mitigation of what Neural Cleanse flagged: unlearning, pruning, then the input filter",
                lambda: repair(ids["cleanse"]),
            ),
        ]
        if curves is not None:
            n = f"{len(seeds)} seeds"
            steps += [
                (
                    f"curves: free training at m = {', '.join(map(str, CURVE_M))}, {n}",
                    lambda: ids.update(free=execute_all("train", curves["free"], nested)),
                ),
                (
                    f"curves: standard and fast training, {n}",
                    lambda: ids.update(others=execute_all("train", curves["others"], nested)),
                ),
                (
                    f"curves: PGD at eps = {', '.join(f'{e:g}' for e in CURVE_EPS)} on the standard, free m = 4 and "
                    "7, and fast models",
                    lambda: execute_all("attack", _attacks(curves, ids), nested),
                ),
                (
                    f"curves: smoothing at sigma = {', '.join(f'{s:g}' for s in CURVE_SIGMAS)}, {n}",
                    lambda: execute_all("smooth", curves["smooth"], nested),
                ),
            ]

        def repair(cleansed) -> None:
            run_id, outcome = cleansed
            if not outcome.findings:
                session.echo("Neural Cleanse flagged no model, so there is nothing to mitigate.")
                return
            for method in ("unlearn", "prune", "filter"):
                mitigate_all(dataclasses.replace(mitigating, cleanse_run=run_id, mitigation=method), nested)

        total = len(steps) + 1
        for k, (title, step) in enumerate(steps, 1):
            session.echo(f"\n[{k}/{total}] {title}  ({time.perf_counter() - began:.0f} s elapsed)")
            step()
        if distributed.rank() != 0:
            return None
        session.echo(f"\n[{total}/{total}] report  ({time.perf_counter() - began:.0f} s elapsed)")
        files = report.build(session.experiment, out, tracking.tracking_uri(), parent=nested.parent)
    session.echo(f"\nDone in {time.perf_counter() - began:.0f} s.")
    session.echo(f"Report: {files.markdown} and {files.pdf} (figures in {files.figures}/)")
    session.echo("Browse every run, metric and image: mlflow ui   (then open http://127.0.0.1:5000)")
    return files


def _curve_settings(preset: config.Preset, overrides: dict, seeds: list[int]) -> dict:
    """Every cell of the curve sweeps, resolved (and so checked) before anything runs."""
    given = {**overrides, "seed": seeds}
    attack = config.resolve("attack", preset, {**given, "eps": list(CURVE_EPS), "model_run": "to be trained"})
    return {
        "free": config.resolve("train", preset, {**given, "method": "free", "m": list(CURVE_M)}),
        "others": config.resolve("train", preset, {**given, "method": ["standard", "fast"]}),
        "attack": [
            dataclasses.replace(s, seed=seeds[0]) for s in attack if s.seed == seeds[0]
        ],  # one PGD seed; the models' seeds replicate
        "smooth": config.resolve("smooth", preset, {**given, "sigma": list(CURVE_SIGMAS)}),
    }


def _attacks(curves: dict, ids: dict) -> list:
    """The robustness-curve cells: every eps on each standard, free m = 4 and 7 and fast model
    the curve sweeps trained (their run ids are known only then), one model after another."""
    trained = [*zip(ids["others"], curves["others"]), *zip(ids["free"], curves["free"])]
    order = [("standard", None), ("free", 4), ("free", 7), ("fast", None)]
    models = [rid for method, m in order for rid, s in trained if s.method == method and (m is None or s.m == m)]
    return [dataclasses.replace(t, model_run=run) for run in models for t in curves["attack"]]
