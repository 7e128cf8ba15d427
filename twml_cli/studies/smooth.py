"""`twml smooth`: randomized smoothing at one sigma per run: a Gaussian-noise-trained base
classifier (or a given model), then CERTIFY on evenly spaced test images."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import attacks, config, figures, models, results, runtime, smoothing, training
from .common import (
    Data,
    Hooks,
    Run,
    artifacts,
    check_fits,
    data_name,
    device,
    evenly_spaced,
    load_data,
    load_model,
    model_source,
    new_model,
    with_augmentation,
)
from .train import record_training

COMMAND = "smooth"
SWEEP_FIGURES = (results.SIGMA_FIGURE,)  # a sweep's own figure, beside the sweep's metrics figure


@dataclass
class Inputs:
    settings: config.Smoothing
    device: torch.device
    data: Data
    model: models.Classifier  # the given model, or a fresh one to train with noise
    given: bool
    indices: list[int]  # the test examples certified


@dataclass
class Outcome:
    settings: config.Smoothing
    model: models.Classifier
    training: training.TrainResult | None  # None when the model was given
    accuracy: float  # base classifier, clean test images
    table: dict[str, np.ndarray]  # per example: idx, label, predict, radius, correct, time_s

    @property
    def certify_time_s(self) -> float:
        return float(self.table["time_s"].sum())

    @property
    def max_radius(self) -> float:
        """The largest radius CERTIFY can return with this n and alpha."""
        s = self.settings
        return smoothing.max_certifiable_radius(s.sigma, s.n, s.cert_alpha)


def run_name(s: config.Smoothing) -> str:
    """'gaussian sigma=0.05': how the base classifier was trained, and σ; a given model's: 'sigma=0.05'."""
    return f"sigma={s.sigma:g}" if s.model_run else f"{s.training} sigma={s.sigma:g}"


def tags(s: config.Smoothing) -> dict[str, str]:
    return {f"twml.{k}": v for k, v in model_source(s.model_run).items()} if s.model_run else {}


def prepare(s: config.Smoothing) -> Inputs:
    dev = device(s)
    given = load_model(s.model_run, dev) if s.model_run else None
    data = load_data(data_name(s.dataset, given, "digits"), s, given)
    if given is not None:
        check_fits(given, data.info, f"model {s.model_run}")
    indices = evenly_spaced(len(data.test), s.num_examples).tolist()
    s = dataclasses.replace(with_augmentation(s, data), dataset=data.info.name, num_examples=len(indices)).resolved()
    model = given if given is not None else new_model(s, data.info, dev)
    return Inputs(s, dev, data, model, given is not None, indices)


def compute(inputs: Inputs, hooks: Hooks = Hooks()) -> Outcome:
    s, model = inputs.settings, inputs.model
    result = None
    if not inputs.given:
        method = s.perturbation()
        mode = s.compile_mode(inputs.device, s.epochs * len(inputs.data.train) * method.copies)
        with runtime.phase("train"):
            result = training.train(
                model, inputs.data.train, s.train_config(), method, hooks=hooks.training(s), compile_mode=mode
            )
    base = models.compiled(model, s.compile_mode(inputs.device, len(inputs.indices) * (s.n0 + s.n)))
    smoothed = smoothing.Smooth(base, model.spec.num_classes, s.sigma, seed=s.seed)
    with runtime.phase("evaluate"):
        accuracy = attacks.accuracy(model, inputs.data.test, s.eval_batch_size)
        table = smoothing.certify_dataset(
            smoothed,
            inputs.data.test,
            inputs.indices,
            s.n0,
            s.n,
            s.cert_alpha,
            s.certify_batch_size,
            hooks.progress,
            done=hooks.done_rows,
            save_rows=hooks.save_rows,
            grid=s.radii if s.adaptive else None,
            futility=s.futility,
        )
    return Outcome(s, model, result, accuracy, table)


def extra_params(inputs: Inputs) -> dict[str, str]:
    if inputs.given:
        return {**model_source(inputs.settings.model_run), "model": inputs.model.spec.arch}
    return {"method": "noise" if inputs.settings.training == "gaussian" else inputs.settings.training}


def record(run: Run, outcome: Outcome) -> None:
    if outcome.training is not None:
        run.log_model(outcome.model, outcome.settings.register)  # first: the metrics below are linked to it
        record_training(run, outcome.training)
    run.log_metrics({**results.metrics(metrics(outcome)), **table_metrics(outcome)})
    table = outcome.table
    grid = smoothing.radius_grid(float(table["radius"].max()))
    curve = smoothing.certified_accuracy(table["radius"], table["correct"], grid)
    with artifacts(run) as folder:
        pd.DataFrame(table).to_csv(folder / results.CERTIFY_CSV, index=False)
        pd.DataFrame({"radius": grid, "certified_accuracy": curve}).to_csv(folder / results.CURVE_CSV, index=False)
        figures.save_both(
            figures.certified_accuracy_figure({outcome.settings.sigma: (grid, curve)}), folder / results.CURVE_FIGURE
        )


def sweep_keep(o: Outcome) -> dict[str, np.ndarray]:
    """What a sweep's parent needs of each run: its certificates' radii and correctness."""
    return {"radius": o.table["radius"], "correct": o.table["correct"]}


def record_sweep(folder, settings_list: list, axes: list[str], kept: list[dict]) -> None:
    """A smoothing sweep's curves: certified accuracy against radius for each cell (mean over
    seeds, a band of one standard deviation), their envelope (the best cell at each radius, as
    Cohen et al. plot their sigmas) and each cell's average certified radius."""
    groups = [a for a in axes if a != "seed"]
    named = [(cell_label(s, groups), k["radius"], k["correct"]) for s, k in zip(settings_list, kept)]
    grid, curves, envelope = bands(named)
    frame = {
        "radius": grid,
        **{f"{name} mean": c.mean for name, c in curves.items()},
        **{f"{name} sd": c.sd for name, c in curves.items()},
        "envelope": envelope,
    }
    pd.DataFrame(frame).to_csv(folder / results.SIGMA_CSV, index=False)
    figures.save_both(figures.certified_accuracy_bands_figure(grid, curves, envelope), folder / results.SIGMA_FIGURE)


def cell_label(s, groups: list[str]) -> str:
    """'σ=0.25' (and any other swept setting) for a cell of a smoothing sweep."""

    def one(g):
        v = getattr(s, g)
        return f"{'σ' if g == 'sigma' else g}={v:g}" if isinstance(v, float) else f"{g}={v}"

    return ", ".join(one(g) for g in groups) or f"σ={s.sigma:g}"


@dataclass
class Band:
    """One cell's certified accuracy against radius over seeds, and its ACR."""

    mean: np.ndarray
    sd: np.ndarray
    acr: float
    acr_sd: float
    seeds: int


def bands(named: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, dict[str, Band], np.ndarray]:
    """(radius grid, a Band per name, the envelope: the best mean at each radius) from
    (name, radii, correct) of every run; runs of one name are its seeds."""
    grid = smoothing.radius_grid(max(float(np.max(radius)) for _, radius, _ in named))
    cells: dict[str, list] = {}
    for name, radius, correct in named:
        cells.setdefault(name, []).append(
            (smoothing.certified_accuracy(radius, correct, grid), smoothing.average_certified_radius(radius, correct))
        )

    def sd(values, axis=None):
        return np.std(values, axis=axis, ddof=1) if len(values) > 1 else np.zeros_like(np.mean(values, axis=axis))

    curves = {
        name: Band(
            np.mean([c for c, _ in v], 0),
            sd([c for c, _ in v], 0),
            float(np.mean([a for _, a in v])),
            float(sd([a for _, a in v])),
            len(v),
        )
        for name, v in cells.items()
    }
    return grid, curves, np.max([c.mean for c in curves.values()], 0)


def metrics(o: Outcome) -> results.CertificationMetrics:
    t = o.table
    return results.CertificationMetrics(
        accuracy=o.accuracy,
        certified_accuracy=float(smoothing.certified_accuracy(t["radius"], t["correct"], np.array([0.0]))[0]),
        abstain_rate=float(np.mean(t["predict"] == smoothing.ABSTAIN)),
        average_certified_radius=smoothing.average_certified_radius(t["radius"], t["correct"]),
        max_certified_radius=float(t["radius"].max()),
        certify_time_s=o.certify_time_s,
        samples_per_s=float(t["samples"].sum()) / o.certify_time_s,
        samples_per_image=float(t["samples"].mean()),
    )


def certified_at(o: Outcome, radii) -> list[float]:
    """Certified accuracy at each radius."""
    return [float(a) for a in smoothing.certified_accuracy(o.table["radius"], o.table["correct"], radii)]


def table_radii(s: config.Smoothing) -> list[float]:
    """Where certified accuracy is reported: the fixed table radii and the ones asked for."""
    return sorted({*smoothing.TABLE_RADII, *s.radii})


def table_metrics(o: Outcome) -> dict[str, float]:
    """certified_accuracy_r{r} at each reported radius."""
    radii = table_radii(o.settings)
    return {results.certified_accuracy_key(r): a for r, a in zip(radii, certified_at(o, radii))}


def summarize(o: Outcome) -> list[str]:
    s, t, r_max = o.settings, o.table, o.max_radius
    if s.adaptive:
        radii = sorted({0.0, *s.radii})
        procedure = [
            f"  Adaptive certification on the grid, at most n = {s.n} samples, futility {s.futility:g}: "
            f"{t['samples'].mean():,.0f} "
            f"samples per image on average ({(s.n0 + s.n) / t['samples'].mean():.1f}x fewer than fixed n)"
        ]
    else:
        radii = [r for r in table_radii(s) if r <= r_max]
        procedure = [f"  Largest certified radius: {t['radius'].max():.4f} (at most {r_max:.4f} with this n and alpha)"]
    accs = certified_at(o, radii)
    return [
        f"sigma = {s.sigma:g}:",
        f"  Base classifier accuracy (clean test): {o.accuracy:.4f}",
        "  Certified accuracy: " + ", ".join(f"r={r:g}: {a:.4f}" for r, a in zip(radii, accs)),
        *procedure,
        f"  Abstain rate: {np.mean(t['predict'] == smoothing.ABSTAIN):.4f}",
    ]
