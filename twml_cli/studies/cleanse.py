"""`twml cleanse`: Neural Cleanse (Wang et al., 2019) on each model: reversed triggers, the MAD
outlier test, and the verdict: which model is backdoored, toward which class."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import attacks, cleanse, config, figures, models, results
from ..data import MemoryDataSet
from ..runtime import Timer
from .common import Hooks, Run, artifacts, check_fits, data_name, device, in_memory, load_data, load_model, model_source

COMMAND = "cleanse"


@dataclass
class Inputs:
    settings: config.Cleanse
    device: torch.device
    data: MemoryDataSet
    models: list[models.Classifier]
    sources: list[str]  # each model's run id or folder
    x_clean: torch.Tensor  # the clean training images the trigger search uses


@dataclass
class Finding:
    model: int
    target: int
    anomaly_index: float
    success_rate: float  # the reversed trigger on clean test images of other classes


@dataclass
class Inspection:
    """Neural Cleanse on one model."""

    source: str
    accuracy: float
    reversed: cleanse.ReversedTriggers
    test: cleanse.OutlierTest
    seconds: float

    @property
    def anomaly_index(self) -> float:
        """The largest anomaly index among classes below the median norm (0 when none)."""
        below = self.reversed.norms < self.test.median
        return float(self.test.anomaly_index[below].max()) if below.any() else 0.0


@dataclass
class Outcome:
    settings: config.Cleanse
    inspections: list[Inspection]
    findings: list[Finding] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "; ".join(f"model {f.model} class {f.target}" for f in self.findings) or "none"

    @property
    def strongest(self) -> Finding | None:
        return max(self.findings, key=lambda f: f.anomaly_index) if self.findings else None


def run_name(s: config.Cleanse) -> str:
    return "neural-cleanse"


def prepare(s: config.Cleanse) -> Inputs:
    """`s.model_runs` must name the models (the runner fills in the newest runs by default)."""
    dev = device(s)
    loaded = [load_model(r, dev) for r in s.model_runs]
    data = in_memory(load_data(data_name(s.dataset, loaded[0], "digits"), s, loaded[0]), COMMAND)
    for uri, model in zip(s.model_runs, loaded):
        check_fits(model, data.info, f"model {uri}")
    x_train = data.train.x.cpu()
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(s.seed))[: s.search_images]
    s = dataclasses.replace(s, dataset=data.info.name, search_images=len(pick))
    sources = [next(iter(model_source(r).values())) for r in s.model_runs]
    return Inputs(s, dev, data, loaded, sources, x_train[pick])


def compute(inputs: Inputs, hooks: Hooks = Hooks()) -> Outcome:
    s = inputs.settings
    x_test, y_test = inputs.data.test.x.cpu(), inputs.data.test.y.cpu()
    outcome = Outcome(s, [])
    for i, (model, source) in enumerate(zip(inputs.models, inputs.sources)):
        accuracy = attacks.accuracy(model, inputs.data.test, s.eval_batch_size)
        with Timer(inputs.device) as timer:
            rev = cleanse.reverse_engineer_all(
                model, inputs.x_clean, model.spec.num_classes, s.cleanse_config(), progress=hooks.progress
            )
        test = cleanse.mad_outlier_test(rev.norms, s.anomaly_threshold)
        outcome.inspections.append(Inspection(source, accuracy, rev, test, timer.seconds))
        for c in np.flatnonzero(test.flagged):
            rate = cleanse.reversed_trigger_success(model, rev, int(c), x_test, y_test)
            outcome.findings.append(Finding(i, int(c), float(test.anomaly_index[c]), rate))
    return outcome


def extra_params(inputs: Inputs) -> dict[str, str]:
    return {f"model{i}": source for i, source in enumerate(inputs.sources)}


def norms_table(outcome: Outcome) -> pd.DataFrame:
    """One row per (model, class): the schema of norms.csv."""
    rows = []
    for i, ins in enumerate(outcome.inspections):
        rev, test = ins.reversed, ins.test
        for j, c in enumerate(rev.classes):
            rows.append(
                {
                    "model": i,
                    "run_id": ins.source,
                    "class": c,
                    "norm": rev.norms[j],
                    "anomaly_index": test.anomaly_index[j],
                    "flagged": bool(test.flagged[j]),
                    "reached_threshold": bool(rev.reached[j]),
                    "rounds": int(rev.rounds[j]),
                }
            )
    return pd.DataFrame(rows)


def record(run: Run, outcome: Outcome) -> None:
    metrics: dict[str, float] = {}
    for i, ins in enumerate(outcome.inspections):
        metrics.update(
            results.metrics(results.CleanseModelMetrics(ins.accuracy, ins.anomaly_index, ins.seconds), f"model{i}_")
        )
    if outcome.strongest is not None:
        metrics[results.BACKDOOR_SUCCESS] = outcome.strongest.success_rate
    run.log_metrics(metrics)
    run.set_tags({results.VERDICT_TAG: outcome.verdict})
    panels, arrays = [], {}
    with artifacts(run) as folder:
        for i, ins in enumerate(outcome.inspections):
            rev = ins.reversed
            for j, c in enumerate(rev.classes):
                figures.save_image(rev.masks[j], _mkdir(folder / "masks") / f"model{i}_class{c}_mask.png")
                figures.save_image(
                    rev.masks[j] * rev.patterns[j], _mkdir(folder / "triggers") / f"model{i}_class{c}_trigger.png"
                )
            arrays[f"model{i}_masks"], arrays[f"model{i}_patterns"] = rev.masks.numpy(), rev.patterns.numpy()
            panels.append(
                {
                    "name": f"model {i} ({ins.source[:8]})",
                    "norms": rev.norms,
                    "median": ins.test.median,
                    "mad": ins.test.mad,
                    "threshold": outcome.settings.anomaly_threshold,
                    "flagged": ins.test.flagged,
                    "masks": rev.masks,
                    "patterns": rev.patterns,
                }
            )
        for f in outcome.findings:
            rev = outcome.inspections[f.model].reversed
            j = rev.classes.index(f.target)
            sub = _mkdir(folder / "backdoor" / f"model{f.model}_class{f.target}")
            figures.save_image(rev.masks[j], sub / results.MASK_PNG)
            figures.save_image(rev.masks[j] * rev.patterns[j], sub / results.TRIGGER_PNG)
        if outcome.strongest is not None:  # the most anomalous flagged class, also at the top level
            f = outcome.strongest
            for name in (results.TRIGGER_PNG, results.MASK_PNG):
                (folder / name).write_bytes(
                    (folder / "backdoor" / f"model{f.model}_class{f.target}" / name).read_bytes()
                )
        norms_table(outcome).to_csv(folder / results.NORMS_CSV, index=False)
        np.savez(folder / results.REVERSED_NPZ, **arrays)  # type: ignore[arg-type]  # numpy's stubs type **kwds poorly
        figures.save(figures.norms_figure(panels), folder / results.NORMS_FIGURE)
        figures.save(figures.mask_grid_figure(panels), folder / results.MASK_GRID_FIGURE)


def summarize(outcome: Outcome) -> list[str]:
    lines = []
    for i, (ins, source) in enumerate(zip(outcome.inspections, outcome.settings.model_runs)):
        lines.append(f"Accuracy of model {i} ({_short(source)}): {ins.accuracy:.4f}")
        lines += [
            f"Norm of trigger targeting class {c} in model {i}: {n:.4f}"
            for c, n in zip(ins.reversed.classes, ins.reversed.norms)
        ]
    for f in outcome.findings:
        lines += [
            f"Backdoor is at model {f.model} class {f.target} (anomaly index {f.anomaly_index:.2f})",
            f"Backdoor success rate: {f.success_rate:.4f}",
        ]
    if not outcome.findings:
        lines.append(
            f"No backdoor found: no class has an anomaly index above {outcome.settings.anomaly_threshold:g} below the "
            "median norm"
        )
    return lines


def _short(source: str) -> str:
    """'run be5a1e18' for a run id (as the report prints it), else the model as given."""
    run = source.removeprefix("runs:/").split("/")[0]
    if len(run) == 32 and all(c in "0123456789abcdef" for c in run):
        return f"run {run[:8]}"
    return source


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
