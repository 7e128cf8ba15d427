"""The studies as the CLI runs them: data, model, algorithm, MLflow run, console lines.

Each function validates all of its input before it creates a run, so bad input never
leaves a run behind. The algorithms themselves live in training.py, attacks.py,
smoothing.py, backdoor.py and cleanse.py.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import attacks, backdoor, cleanse, config, data, figures, models, smoothing, tracking, training
from .errors import TwmlError
from .runtime import Progress, Timer, describe_device, no_progress, resolve_device

REPORT_RADII = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Context:
    experiment: str = "twml"
    preset: str = config.DEFAULT_PRESET
    echo: Callable[[str], None] = print
    progress: Progress = no_progress


# ---------------------------------------------------------------- shared steps


def _device(cfg: dict) -> torch.device:
    try:
        return resolve_device(cfg.get("device", "auto"))
    except ValueError as err:
        raise TwmlError(str(err)) from None


def _load_data(name: str, cfg: dict):
    train, test = data.load_dataset(name, cfg.get("data_dir"))
    return train, test, data.describe(name, train, test)


def _new_model(cfg: dict, info: data.DataInfo, device: torch.device) -> models.Classifier:
    torch.manual_seed(int(cfg["seed"]))
    spec = models.ModelSpec.for_data(cfg["model"], info, cfg.get("model_kwargs"))
    return models.prepare(models.create_model(spec), device)


def _check_fits(model: models.Classifier, info: data.DataInfo, what: str) -> None:
    spec = model.spec
    if (spec.in_chans, tuple(spec.input_size)) != (info.in_chans, tuple(info.input_size)) or spec.num_classes < info.num_classes:
        raise TwmlError(
            f"{what} takes {spec.in_chans}x{spec.input_size[0]}x{spec.input_size[1]} images of {spec.num_classes} classes, "
            f"but data set '{info.name}' has {info.in_chans}x{info.input_size[0]}x{info.input_size[1]} images of {info.num_classes}"
        )


def _train_configs(cfg: dict) -> tuple[training.TrainConfig, attacks.PGDConfig]:
    train_cfg = config.build(training.TrainConfig, cfg)
    pgd_cfg = config.build(
        attacks.PGDConfig, {"eps": cfg["eps"], "alpha": cfg["pgd_alpha"], "steps": cfg["pgd_steps"], "restarts": cfg["pgd_restarts"]}
    )
    return train_cfg, pgd_cfg


def _common_params(cfg: dict, ctx: Context, device: torch.device, dataset: str) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "seed": cfg["seed"],
        "preset": ctx.preset,
        **tracking.environment_params(describe_device(device)),
    }


def _training_params(cfg: dict, train_cfg: training.TrainConfig) -> dict[str, Any]:
    return {
        "model": cfg["model"],
        "model_kwargs": cfg.get("model_kwargs") or {},
        "epochs": train_cfg.epochs,
        "batch_size": train_cfg.batch_size,
        "lr": train_cfg.lr,
        "momentum": train_cfg.momentum,
        "weight_decay": train_cfg.weight_decay,
        "schedule": train_cfg.schedule,
    }


def _fit(model, train_set, train_cfg, perturbation, run: tracking.Run, ctx: Context) -> training.TrainResult:
    """Train, then log the per-epoch curves and the training time."""
    result = training.train(model, *train_set.tensors, train_cfg, perturbation, ctx.progress)
    epochs = [h.epoch for h in result.history]
    run.log_series("train_loss", epochs, [h.loss for h in result.history])
    run.log_series("train_accuracy", epochs, [h.accuracy for h in result.history])
    run.log_metrics({"train_time_s": result.train_time_s, "images_per_s": result.images_per_s, "sgd_steps": result.steps})
    return result


def _temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="twml-")


# ---------------------------------------------------------------- twml train


def train(cfg: dict, ctx: Context, free: bool = False) -> str:
    """Standard or free adversarial training, then clean accuracy and PGD. Returns the run id."""
    device = _device(cfg)
    train_cfg, pgd_cfg = _train_configs(cfg)
    try:
        perturbation = training.FreeAdversarial(cfg["eps"], cfg["m"]) if free else training.Perturbation()
    except ValueError as err:
        raise TwmlError(str(err)) from None
    train_set, test_set, info = _load_data(cfg["dataset"], cfg)
    model = _new_model(cfg, info, device)
    method = perturbation.name
    run_name = f"free-m{perturbation.replays}" if free else "standard"

    with tracking.start_run(ctx.experiment, "train", run_name=run_name) as run:
        run.log_params(
            {
                **_common_params(cfg, ctx, device, info.name),
                **_training_params(cfg, train_cfg),
                "method": method,
                "m": perturbation.replays,
                "eps": pgd_cfg.eps,
                "pgd_steps": pgd_cfg.steps,
                "pgd_alpha": pgd_cfg.alpha,
                "pgd_restarts": pgd_cfg.restarts,
            }
        )
        run.log_json(cfg, "config.json")
        result = _fit(model, train_set, train_cfg, perturbation, run, ctx)
        robust = attacks.evaluate_robustness(
            model, *test_set.tensors, pgd_cfg, cfg["eval_batch_size"], cfg["seed"], ctx.progress
        )
        run.log_metrics(_robustness_metrics(robust))
        run.log_model(model)

    label = "free adversarial" if free else "standard"
    ctx.echo(f"Time (in seconds) to complete {label} training{f' (m={perturbation.replays})' if free else ''}: {result.train_time_s:.4f}")
    _echo_robustness(ctx, robust, pgd_cfg)
    ctx.echo(f"Run id: {run.id}")
    return run.id


def _robustness_metrics(r: attacks.RobustnessResult) -> dict[str, float]:
    return {
        "accuracy": r.accuracy,
        "pgd_success_rate": r.pgd_success_rate,
        "robust_accuracy": r.robust_accuracy,
        "attack_time_s": r.attack_time_s,
    }


def _echo_robustness(ctx: Context, r: attacks.RobustnessResult, pgd_cfg: attacks.PGDConfig) -> None:
    ctx.echo(f"Model accuracy: {r.accuracy:.4f}")
    ctx.echo(
        f"Success rate of untargeted white-box PGD (eps={pgd_cfg.eps:g}, {pgd_cfg.steps} steps, "
        f"{pgd_cfg.restarts} restart{'s' if pgd_cfg.restarts > 1 else ''}): {r.pgd_success_rate:.4f}"
    )
    ctx.echo(f"Robust accuracy: {r.robust_accuracy:.4f}")


# ---------------------------------------------------------------- twml attack


def _model_source(uri: str) -> dict[str, str]:
    """How a run names the model it used: a run id, or a local folder."""
    if Path(uri).is_dir():
        return {"model_path": str(Path(uri).resolve())}
    return {"model_run": tracking.run_id_of(uri)}


def attack(cfg: dict, ctx: Context, model_uri: str, dataset: str | None = None) -> str:
    """PGD with other settings against any logged model, logged as its own run."""
    device = _device(cfg)
    _, pgd_cfg = _train_configs(cfg)
    model = models.load_model(model_uri, device)
    name = dataset or model.spec.dataset or cfg["dataset"]
    _, test_set, info = _load_data(name, cfg)
    _check_fits(model, info, f"model {model_uri}")
    source = _model_source(model_uri)

    with tracking.start_run(ctx.experiment, "attack", run_name="attack", tags={f"twml.{k}": v for k, v in source.items()}) as run:
        run.log_params(
            {
                **_common_params(cfg, ctx, device, info.name),
                **source,
                "model": model.spec.arch,
                "eps": pgd_cfg.eps,
                "pgd_steps": pgd_cfg.steps,
                "pgd_alpha": pgd_cfg.alpha,
                "pgd_restarts": pgd_cfg.restarts,
            }
        )
        robust = attacks.evaluate_robustness(
            model, *test_set.tensors, pgd_cfg, cfg["eval_batch_size"], cfg["seed"], ctx.progress
        )
        run.log_metrics(_robustness_metrics(robust))
    _echo_robustness(ctx, robust, pgd_cfg)
    ctx.echo(f"Run id: {run.id}")
    return run.id


# ---------------------------------------------------------------- twml smooth


def _sigmas(cfg: dict) -> list[float]:
    sigmas = cfg["sigma"] if isinstance(cfg["sigma"], (list, tuple)) else [cfg["sigma"]]
    for s in sigmas:
        if not isinstance(s, (int, float)) or not s > 0:
            raise TwmlError(f"sigma must be > 0, got {s}")
    return [float(s) for s in sigmas]


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The radius certify returns when all n samples vote for the top class."""
    from scipy.stats import norm

    return sigma * float(norm.ppf(float(smoothing.lower_confidence_bound(n, n, alpha))))


def certified_curve(table: dict[str, np.ndarray], radii: np.ndarray) -> np.ndarray:
    return smoothing.certified_accuracy(table["radius"], table["correct"], radii)


def radius_grid(top: float, points: int = 201) -> np.ndarray:
    return np.linspace(0.0, max(top, 1e-3) * 1.1, points)


def smooth(cfg: dict, ctx: Context, model_run: str | None = None, dataset: str | None = None) -> list[str]:
    """For each sigma: a noise-trained base classifier (or the given model), then CERTIFY on
    evenly spaced test examples. One run per sigma; returns their ids."""
    device = _device(cfg)
    sigmas = _sigmas(cfg)
    n0, n, alpha = int(cfg["n0"]), int(cfg["n"]), float(cfg["alpha"])
    try:
        smoothing.check_certify_args(n0, n, alpha, int(cfg["certify_batch_size"]))
    except ValueError as err:
        raise TwmlError(str(err)) from None
    if int(cfg["num_examples"]) < 1:
        raise TwmlError(f"num examples must be >= 1, got {cfg['num_examples']}")
    train_cfg, _ = _train_configs(cfg)
    given = models.load_model(model_run, device) if model_run else None
    name = dataset or (given.spec.dataset if given is not None else None) or cfg["dataset"]
    train_set, test_set, info = _load_data(name, cfg)
    if given is not None:
        _check_fits(given, info, f"model {model_run}")
    x_test, y_test = test_set.tensors
    num = min(int(cfg["num_examples"]), len(x_test))
    indices = np.linspace(0, len(x_test) - 1, num).round().astype(int).tolist()

    tables: dict[float, dict] = {}
    run_ids: list[str] = []
    for sigma in sigmas:
        tags = {f"twml.{k}": v for k, v in _model_source(model_run).items()} if model_run else None
        with tracking.start_run(ctx.experiment, "smooth", run_name=f"sigma={sigma:g}", tags=tags) as run:
            params = {
                **_common_params(cfg, ctx, device, info.name),
                "sigma": sigma,
                "n0": n0,
                "n": n,
                "alpha": alpha,
                "num_examples": num,
                "certify_batch_size": cfg["certify_batch_size"],
            }
            if given is not None:
                model = given
                params.update({**_model_source(model_run), "model": given.spec.arch})
                run.log_params(params)
            else:
                model = _new_model(cfg, info, device)
                run.log_params({**params, **_training_params(cfg, train_cfg), "method": "noise"})
                _fit(model, train_set, train_cfg, training.GaussianNoise(sigma, cfg["seed"]), run, ctx)
                run.log_model(model)
            run.log_json({**cfg, "sigma": sigma}, "config.json")
            accuracy = attacks.accuracy(model, x_test, y_test, cfg["eval_batch_size"])
            smoothed = smoothing.Smooth(model, model.spec.num_classes, sigma, seed=int(cfg["seed"]))
            with Timer(device) as timer:
                table = smoothing.certify_dataset(
                    smoothed, x_test, y_test, indices, n0, n, alpha, int(cfg["certify_batch_size"]), ctx.progress
                )
            tables[sigma] = table
            _log_certification(run, sigma, table, accuracy, timer.seconds, num * (n0 + n))
        run_ids.append(run.id)
        _echo_certification(ctx, sigma, table, accuracy, max_certifiable_radius(sigma, n, alpha), run.id)

    if len(sigmas) > 1:  # every run of the call gets the figure with all its sigmas
        top = max(float(t["radius"].max()) for t in tables.values())
        grid = radius_grid(top)
        fig = figures.certified_accuracy_figure({s: (grid, certified_curve(t, grid)) for s, t in tables.items()})
        with _temp_dir() as tmp:
            for ext in ("png", "pdf"):
                fig.savefig(Path(tmp) / f"randomized-smoothing-acc-vs-radius.{ext}", dpi=150, bbox_inches="tight")
            for run_id in run_ids:
                tracking.Run(run_id).log_dir(tmp)
        figures.plt.close(fig)
    return run_ids


def _log_certification(run: tracking.Run, sigma: float, table: dict, accuracy: float, seconds: float, samples: int) -> None:
    radius, correct = table["radius"], table["correct"]
    grid = radius_grid(float(radius.max()))
    curve = certified_curve(table, grid)
    metrics = {
        "accuracy": accuracy,
        "certified_accuracy": float(certified_curve(table, np.array([0.0]))[0]),
        "abstain_rate": float(np.mean(table["predict"] == smoothing.ABSTAIN)),
        "average_certified_radius": smoothing.average_certified_radius(radius, correct),
        "max_certified_radius": float(radius.max()),
        "certify_time_s": seconds,
        "samples_per_s": samples / seconds,
        **{f"certified_accuracy_r{r:g}": float(a) for r, a in zip(REPORT_RADII, certified_curve(table, np.array(REPORT_RADII)))},
    }
    run.log_metrics(metrics)
    with _temp_dir() as tmp:
        pd.DataFrame(table).to_csv(Path(tmp) / "certify.csv", index=False)
        pd.DataFrame({"radius": grid, "certified_accuracy": curve}).to_csv(Path(tmp) / "certified-accuracy-vs-radius.csv", index=False)
        fig = figures.certified_accuracy_figure({sigma: (grid, curve)})
        for ext in ("png", "pdf"):
            fig.savefig(Path(tmp) / f"randomized-smoothing-acc-vs-radius.{ext}", dpi=150, bbox_inches="tight")
        figures.plt.close(fig)
        run.log_dir(tmp)


def _echo_certification(ctx: Context, sigma: float, table: dict, accuracy: float, r_max: float, run_id: str) -> None:
    radii = [r for r in REPORT_RADII if r <= r_max]
    accs = certified_curve(table, np.array(radii))
    ctx.echo(f"sigma = {sigma:g}:")
    ctx.echo(f"  Base classifier accuracy (clean test): {accuracy:.4f}")
    ctx.echo("  Certified accuracy: " + ", ".join(f"r={r:g}: {a:.4f}" for r, a in zip(radii, accs)))
    ctx.echo(f"  Largest certified radius: {table['radius'].max():.4f} (at most {r_max:.4f} with this n and alpha)")
    ctx.echo(f"  Abstain rate: {np.mean(table['predict'] == smoothing.ABSTAIN):.4f}")
    ctx.echo(f"  Run id: {run_id}")


# ---------------------------------------------------------------- twml backdoor


def backdoor_model(cfg: dict, ctx: Context) -> str:
    """BadNets: poison the training set, train as usual, measure clean accuracy and attack success."""
    device = _device(cfg)
    train_cfg, _ = _train_configs(cfg)
    train_set, test_set, info = _load_data(cfg["dataset"], cfg)
    h, w = info.input_size
    size = cfg.get("trigger_size") or backdoor.default_trigger_size(h, w)
    target = int(cfg["target"])
    if not 0 <= target < info.num_classes:
        raise TwmlError(f"target class {target} is outside the classes 0..{info.num_classes - 1} of '{info.name}'")
    try:
        trigger = backdoor.Trigger(int(size), cfg.get("position", "bottom-right"))
        x_p, y_p, poisoned = backdoor.poison(*train_set.tensors, target, float(cfg["poison_rate"]), trigger, cfg["seed"])
    except ValueError as err:
        raise TwmlError(str(err)) from None
    model = _new_model(cfg, info, device)

    with tracking.start_run(ctx.experiment, "backdoor", run_name=f"badnets-target{target}") as run:
        run.log_params(
            {
                **_common_params(cfg, ctx, device, info.name),
                **_training_params(cfg, train_cfg),
                "method": "badnets",
                "target": target,
                "poison_rate": cfg["poison_rate"],
                "trigger_size": trigger.size,
                "position": trigger.position,
                "poisoned_images": len(poisoned),
            }
        )
        run.log_json(cfg, "config.json")
        result = _fit(model, torch.utils.data.TensorDataset(x_p, y_p), train_cfg, None, run, ctx)
        x_test, y_test = test_set.tensors
        accuracy = attacks.accuracy(model, x_test, y_test, cfg["eval_batch_size"])
        success = backdoor.attack_success_rate(model, x_test, y_test, target, trigger, cfg["eval_batch_size"])
        run.log_metrics({"accuracy": accuracy, "attack_success_rate": success})
        run.log_model(model)
        i = int(poisoned[0])
        with _temp_dir() as tmp:
            figures.save(figures.example_figure(train_set.tensors[0][i], x_p[i], int(train_set.tensors[1][i]), target), Path(tmp) / "example.png")
            figures.save_image(train_set.tensors[0][i], Path(tmp) / "example-clean.png")
            figures.save_image(x_p[i], Path(tmp) / "example-triggered.png")
            run.log_dir(tmp)

    ctx.echo(f"Time (in seconds) to complete training on poisoned data: {result.train_time_s:.4f}")
    ctx.echo(f"Poisoned training images: {len(poisoned)} of {len(x_p)} (target class {target}, {trigger.size}x{trigger.size} {trigger.position} trigger)")
    ctx.echo(f"Model accuracy (clean test): {accuracy:.4f}")
    ctx.echo(f"Attack success rate (triggered test images not of class {target}): {success:.4f}")
    ctx.echo(f"Run id: {run.id}")
    return run.id


# ---------------------------------------------------------------- twml cleanse


def default_cleanse_runs(experiment: str) -> list[str]:
    """Model 0: the newest finished standard train run; model 1: the newest backdoor run."""
    clean = [r for r in tracking.find_runs(experiment, "train") if r.data.params.get("method") == "standard"]
    poisoned = tracking.find_runs(experiment, "backdoor")
    missing = [cmd for cmd, runs in (("twml train", clean), ("twml backdoor", poisoned)) if not runs]
    if missing:
        raise TwmlError(
            f"no finished run of {' and '.join(missing)} in experiment '{experiment}': run it first, or name models with --run"
        )
    return [clean[0].info.run_id, poisoned[0].info.run_id]


def cleanse_models(cfg: dict, ctx: Context, runs: list[str] | None = None, dataset: str | None = None) -> str:
    """Neural Cleanse on each model: reversed triggers, MAD outlier test, verdict."""
    device = _device(cfg)
    cleanse_cfg = config.build(cleanse.CleanseConfig, cfg)
    threshold = float(cfg["anomaly_threshold"])
    if not threshold > 0:
        raise TwmlError(f"anomaly threshold must be > 0, got {threshold}")
    if int(cfg["num_images"]) < 1:
        raise TwmlError(f"num images must be >= 1, got {cfg['num_images']}")
    runs = list(runs) if runs else default_cleanse_runs(ctx.experiment)
    loaded = [models.load_model(r, device) for r in runs]
    name = dataset or loaded[0].spec.dataset or cfg["dataset"]
    train_set, test_set, info = _load_data(name, cfg)
    for uri, model in zip(runs, loaded):
        _check_fits(model, info, f"model {uri}")
    x_train = train_set.tensors[0]
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(int(cfg["seed"])))[: int(cfg["num_images"])]
    x_clean = x_train[pick]
    x_test, y_test = test_set.tensors
    sources = [_model_source(r) for r in runs]

    with tracking.start_run(ctx.experiment, "cleanse", run_name="neural-cleanse") as run:
        run.log_params(
            {
                **_common_params(cfg, ctx, device, info.name),
                **{f"model{i}": next(iter(s.values())) for i, s in enumerate(sources)},
                "steps": cleanse_cfg.steps,
                "num_images": len(x_clean),
                "batch_size": cleanse_cfg.batch_size,
                "lr": cleanse_cfg.lr,
                "threshold": cleanse_cfg.threshold,
                "patience": cleanse_cfg.patience,
                "init_cost": cleanse_cfg.init_cost,
                "anomaly_threshold": threshold,
            }
        )
        rows, panels, findings, metrics, arrays = [], [], [], {}, {}
        with _temp_dir() as tmp:
            tmp = Path(tmp)
            for i, model in enumerate(loaded):
                acc = attacks.accuracy(model, x_test, y_test, cfg["eval_batch_size"])
                ctx.echo(f"Accuracy of model {i}: {acc:.4f}")
                with Timer(device) as timer:
                    rev = cleanse.reverse_engineer(model, x_clean, model.spec.num_classes, cleanse_cfg, progress=ctx.progress)
                test = cleanse.mad_outlier_test(rev.norms, threshold)
                for c in rev.classes:
                    ctx.echo(f"Norm of trigger targeting class {c} in model {i}: {rev.norms[c]:.4f}")
                below = rev.norms < test.median
                metrics.update(
                    {
                        f"model{i}_accuracy": acc,
                        f"model{i}_anomaly_index": float(test.anomaly_index[below].max()) if below.any() else 0.0,
                        f"model{i}_cleanse_time_s": timer.seconds,
                    }
                )
                for c in rev.classes:
                    rows.append(
                        {
                            "model": i,
                            "run_id": next(iter(sources[i].values())),
                            "class": c,
                            "norm": rev.norms[c],
                            "anomaly_index": test.anomaly_index[c],
                            "flagged": bool(test.flagged[c]),
                            "reached_threshold": bool(rev.reached[c]),
                            "rounds": int(rev.rounds[c]),
                        }
                    )
                    figures.save_image(rev.masks[c], _mkdir(tmp / "masks") / f"model{i}_class{c}_mask.png")
                    figures.save_image(rev.masks[c] * rev.patterns[c], _mkdir(tmp / "triggers") / f"model{i}_class{c}_trigger.png")
                for c in np.flatnonzero(test.flagged):
                    c = int(c)
                    rate = cleanse.reversed_trigger_success(model, rev, c, x_test, y_test)
                    findings.append((i, c, float(test.anomaly_index[c]), rate))
                    folder = _mkdir(tmp / "backdoor" / f"model{i}_class{c}")
                    figures.save_image(rev.masks[c], folder / "mask.png")
                    figures.save_image(rev.masks[c] * rev.patterns[c], folder / "trigger.png")
                arrays[f"model{i}_masks"], arrays[f"model{i}_patterns"] = rev.masks.numpy(), rev.patterns.numpy()
                panels.append(
                    {
                        "name": f"model {i} ({next(iter(sources[i].values()))[:8]})",
                        "norms": rev.norms,
                        "median": test.median,
                        "mad": test.mad,
                        "threshold": threshold,
                        "flagged": test.flagged,
                        "masks": rev.masks,
                        "patterns": rev.patterns,
                    }
                )
            pd.DataFrame(rows).to_csv(tmp / "norms.csv", index=False)
            np.savez(tmp / "reversed-triggers.npz", **arrays)  # plain float arrays: loads with allow_pickle=False
            figures.save(figures.norms_figure(panels), tmp / "norms.png")
            figures.save(figures.mask_grid_figure(panels), tmp / "mask-grid.png")
            if findings:
                i, c, _, rate = max(findings, key=lambda f: f[2])
                metrics["backdoor_success_rate"] = rate
                verdict = "; ".join(f"model {i} class {c}" for i, c, _, _ in findings)
                # the most anomalous flagged class gets trigger.png / mask.png at the top level too
                for f in ("trigger.png", "mask.png"):
                    (tmp / f).write_bytes((tmp / "backdoor" / f"model{i}_class{c}" / f).read_bytes())
            else:
                verdict = "none"
            run.log_metrics(metrics)
            run.set_tags({"twml.verdict": verdict})
            run.log_dir(tmp)

    if findings:
        for i, c, index, rate in findings:
            ctx.echo(f"Backdoor is at model {i} class {c} (anomaly index {index:.2f})")
            ctx.echo(f"Backdoor success rate: {rate:.4f}")
    else:
        ctx.echo(f"No backdoor found: no class has an anomaly index above {threshold:g} below the median norm")
    ctx.echo(f"Run id: {run.id}")
    return run.id


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- twml reproduce

REPRODUCE_SIGMAS = [0.05, 0.20]


def reproduce(raw: dict, overrides: dict, ctx: Context, out: Path) -> None:
    """The whole write-up: standard, free m=4 and m=7 training; smoothing at sigma 0.05 and
    0.20; a BadNets model; Neural Cleanse on the standard and the backdoored model; the
    report. Every step is its own run, as the single commands log it."""
    import time

    from . import report

    cfgs = {c: config.resolve(c, raw, overrides) for c in ("train", "smooth", "backdoor", "cleanse")}
    cfgs["smooth"]["sigma"] = REPRODUCE_SIGMAS
    _check_reproduce(cfgs)
    tracking.experiment_id(ctx.experiment)  # the store and experiment exist before any step runs
    ids: dict[str, str] = {}
    steps = [
        ("standard training", lambda: ids.update(standard=train(cfgs["train"], ctx))),
        ("free adversarial training, m = 4", lambda: train({**cfgs["train"], "m": 4}, ctx, free=True)),
        ("free adversarial training, m = 7", lambda: train({**cfgs["train"], "m": 7}, ctx, free=True)),
        ("randomized smoothing, sigma = 0.05 and 0.20", lambda: smooth(cfgs["smooth"], ctx)),
        ("BadNets backdoor", lambda: ids.update(backdoor=backdoor_model(cfgs["backdoor"], ctx))),
        ("Neural Cleanse on the standard and the backdoored model", lambda: cleanse_models(cfgs["cleanse"], ctx, [ids["standard"], ids["backdoor"]])),
    ]
    began = time.perf_counter()
    for k, (title, step) in enumerate(steps, 1):
        ctx.echo(f"\n[{k}/{len(steps) + 1}] {title}  ({time.perf_counter() - began:.0f} s elapsed)")
        step()
    ctx.echo(f"\n[{len(steps) + 1}/{len(steps) + 1}] report  ({time.perf_counter() - began:.0f} s elapsed)")
    files = report.build(ctx.experiment, out, tracking.mlflow.get_tracking_uri())
    ctx.echo(f"\nDone in {time.perf_counter() - began:.0f} s.")
    ctx.echo(f"Report: {files.markdown} and {files.pdf} (figures in {files.figures}/)")
    ctx.echo("Browse every run, metric and image: mlflow ui   (then open http://127.0.0.1:5000)")


def _check_reproduce(cfgs: dict) -> None:
    """Every step's settings, checked before the first run starts."""
    for c in ("train", "smooth", "backdoor"):
        _train_configs(cfgs[c])
    for m in (4, 7):
        try:
            training.FreeAdversarial(cfgs["train"]["eps"], m)
        except ValueError as err:
            raise TwmlError(str(err)) from None
    s = cfgs["smooth"]
    try:
        smoothing.check_certify_args(int(s["n0"]), int(s["n"]), float(s["alpha"]), int(s["certify_batch_size"]))
        backdoor.Trigger(int(cfgs["backdoor"].get("trigger_size") or 1), cfgs["backdoor"].get("position", "bottom-right"))
    except ValueError as err:
        raise TwmlError(str(err)) from None
    config.build(cleanse.CleanseConfig, cfgs["cleanse"])
    for c in cfgs.values():
        _device(c)
        models.check_arch(c["model"]) if "model" in c else None
