"""`twml mitigate`: repair each model a cleanse run flagged, with the trigger Neural Cleanse reversed
(unlearning, --mitigation prune, or --mitigation filter, which rejects the images that excite what
the trigger excites and leaves the model as it is), and measure the real trigger before and after
when the model came from `twml backdoor`."""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

import numpy as np
import pandas as pd
import torch

from .. import attacks, backdoor, cleanse, config, figures, mitigation, models, results, runtime
from ..data import MemoryDataSet
from ..errors import TwmlError
from .common import Hooks, Run, artifacts, check_fits, data_name, device, in_memory, load_model

COMMAND = "mitigate"


@dataclass
class Finding:
    """One flagged (model, class) of a cleanse run, with what is known of its real trigger."""

    model_uri: str
    model_index: int  # in the cleanse run
    target: int
    anomaly_index: float
    mask: torch.Tensor  # the reversed trigger
    pattern: torch.Tensor
    trigger: backdoor.Trigger | None = None  # the real one, from the backdoor run that made the model
    trigger_target: int | None = None
    more: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)  # other searches'

    @property
    def triggers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every reversed trigger of the class, one per search: unlearning stamps them all."""
        return [(self.mask, self.pattern), *self.more]


@dataclass
class Inputs:
    settings: config.Mitigate
    device: torch.device
    data: MemoryDataSet
    finding: Finding
    model: models.Classifier


@dataclass(frozen=True)
class Filtering:
    """An input filter and its profile of the test images (the mean activation of its neurons; above
    its threshold, rejected): clean ones, those stamped with the first search's reversed trigger (as
    measure() stamps them) and with the real one (of classes other than its target; None if
    unknown)."""

    input_filter: mitigation.InputFilter
    profiles: dict[str, np.ndarray]  # "clean", "reversed", and "real" where known

    def share(self, kind: str) -> float | None:
        """The fraction of those test images it rejects (None: the real trigger is unknown)."""
        values = self.profiles.get(kind)
        return None if values is None else float((values > self.input_filter.threshold).mean())

    @property
    def clean(self) -> float:
        return cast(float, self.share("clean"))

    @property
    def reversed(self) -> float:
        return cast(float, self.share("reversed"))

    @property
    def real(self) -> float | None:
        return self.share("real")


@dataclass
class Outcome:
    settings: config.Mitigate
    finding: Finding
    model: models.Classifier  # repaired (a filter leaves it as it was)
    metrics: results.MitigationMetrics
    real: results.RealTriggerMetrics | None
    change: results.AccuracyChange  # the clean test images it lost and gained
    pruned: mitigation.PruneResult | None
    unlearned: mitigation.Unlearned | None = None
    filtering: Filtering | None = None


def findings(cleanse_run: str) -> list[Finding]:
    """What a logged cleanse run flagged (read from MLflow, like a model from a run id)."""
    from .. import tracking

    run = tracking.get_run(cleanse_run)
    if run.data.tags.get(results.COMMAND_TAG) != "cleanse":
        raise TwmlError(f"run '{cleanse_run}' is not a cleanse run")
    table, arrays = (
        tracking.download_artifact(cleanse_run, name) for name in (results.NORMS_CSV, results.REVERSED_NPZ)
    )
    if not table or not arrays:
        raise TwmlError(
            f"cleanse run '{cleanse_run}' holds no {results.NORMS_CSV} or {results.REVERSED_NPZ}: run twml cleanse "
            "again"
        )
    norms = pd.read_csv(table)
    out = []
    with np.load(arrays, allow_pickle=False) as z:
        for _, row in norms[norms["flagged"].astype(bool)].iterrows():
            i, c = int(row["model"]), int(row["class"])
            (mask, pattern), *more = _triggers(z, i, c)
            f = Finding(str(row["run_id"]), i, c, float(row["anomaly_index"]), mask, pattern, more=more)
            if not Path(f.model_uri).is_dir():
                made = tracking.get_run(f.model_uri)
                if made.data.tags.get(results.COMMAND_TAG) == "backdoor":
                    p = made.data.params
                    f.trigger, f.trigger_target = (
                        backdoor.Trigger(int(p["trigger_size"]), p["position"]),
                        int(p["target"]),
                    )
            out.append(f)
    if not out:
        raise TwmlError(f"cleanse run '{cleanse_run}' flagged no model: there is nothing to mitigate")
    return out


def _triggers(z, i: int, c: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Class c's reversed (mask, pattern) in model i, one per search of the cleanse run, the first's first."""
    keys = itertools.takewhile(lambda k: k[0] in z, (results.reversed_keys(i, k) for k in itertools.count()))
    return [(torch.from_numpy(z[masks][c]), torch.from_numpy(z[patterns][c])) for masks, patterns in keys]


def run_name(s: config.Mitigate) -> str:
    return s.mitigation


def prepare(s: config.Mitigate, finding: Finding) -> Inputs:
    dev = device(s)
    model = load_model(finding.model_uri, dev)
    data = in_memory(data_name(s.dataset, model, "digits"), s, COMMAND, model)
    check_fits(model, data.info, f"model {finding.model_uri}")
    return Inputs(dataclasses.replace(s, dataset=data.info.name), dev, data, finding, model)


class Measured(NamedTuple):
    """What measure() found: which clean test images the model classifies right, the reversed
    trigger's success, and the real trigger's (None if unknown)."""

    right: torch.Tensor
    reversed_success: float
    real: float | None

    @property
    def accuracy(self) -> float:
        return int(self.right.sum()) / len(self.right)


def measure(model, inputs: Inputs) -> Measured:
    """The model on the test images, clean and stamped."""
    f, (x, y) = inputs.finding, (inputs.data.test.x.cpu(), inputs.data.test.y.cpu())
    right = attacks.classified_right(model, inputs.data.test, inputs.settings.eval_batch_size)
    reversed_success = backdoor.stamped_success_rate(
        model, x[y != f.target], f.target, lambda z: cleanse.stamp(z, f.mask.to(z.device), f.pattern.to(z.device))
    )
    real = None
    if f.trigger is not None and f.trigger_target is not None:
        real = backdoor.attack_success_rate(model, x, y, f.trigger_target, f.trigger)
    return Measured(right, reversed_success, real)


def compute(inputs: Inputs, hooks: Hooks = Hooks()) -> Outcome:
    s, f = inputs.settings, inputs.finding
    with runtime.phase("evaluate"):
        before = measure(inputs.model, inputs)
    if s.mitigation == "filter":
        with runtime.phase("evaluate"):
            filtering = _filter(inputs)
            after = measure(mitigation.Filtered(inputs.model, filtering.input_filter), inputs)
        return Outcome(s, f, inputs.model, *_compared(before, after), None, None, filtering)
    repaired = copy.deepcopy(inputs.model)
    pruned = unlearned = None
    x, y = inputs.data.train.x.cpu(), inputs.data.train.y.cpu()
    if s.mitigation == "unlearn":
        with runtime.phase("train"):
            unlearned = mitigation.unlearn(repaired, x, y, f.triggers, s.unlearn_config())
    else:
        with runtime.phase("evaluate"):  # pruning updates no weights by gradient
            pruned = mitigation.prune(repaired, x, y, f.target, f.mask, f.pattern, s.prune_step, s.prune_stop)
    with runtime.phase("evaluate"):
        after = measure(repaired, inputs)
    return Outcome(s, f, repaired, *_compared(before, after), pruned, unlearned)


def _compared(
    b: Measured, a: Measured
) -> tuple[results.MitigationMetrics, results.RealTriggerMetrics | None, results.AccuracyChange]:
    """measure()'s figures before (b) and after (a), as the metrics a run logs."""
    metrics = results.MitigationMetrics(b.accuracy, a.accuracy, b.reversed_success, a.reversed_success)
    real = results.RealTriggerMetrics(b.real, a.real) if b.real is not None and a.real is not None else None
    change = results.AccuracyChange(int((b.right & ~a.right).sum()), int((~b.right & a.right).sum()))
    return metrics, real, change


def _filter(inputs: Inputs) -> Filtering:
    """The input filter of the flagged class's reversed triggers (every search's, as unlearning stamps
    them), calibrated on the clean training images, and what it rejects of the test images."""
    s, f, model = inputs.settings, inputs.finding, inputs.model
    x, y = inputs.data.train.x.cpu(), inputs.data.train.y.cpu()
    fitted = mitigation.fit_filter(model, x, y, f.target, f.triggers, s.filter_neurons, s.filter_rejects)
    tx, ty = inputs.data.test.x.cpu(), inputs.data.test.y.cpu()
    profile = functools.partial(mitigation.profiles, model, fitted)
    found = {"clean": profile(tx), "reversed": profile(cleanse.stamp(tx[ty != f.target], f.mask, f.pattern))}
    if f.trigger is not None and f.trigger_target is not None:
        found["real"] = profile(f.trigger.apply(tx[ty != f.trigger_target]))
    return Filtering(fitted, {k: v.numpy() for k, v in found.items()})


def extra_params(inputs: Inputs) -> dict:
    f = inputs.finding
    source = {"model_path": f.model_uri} if Path(f.model_uri).is_dir() else {"model_run": f.model_uri}
    return {
        **source,
        "model": inputs.model.spec.arch,
        "target": f.target,
        "anomaly_index": round(f.anomaly_index, 4),
        "reversed_triggers": len(f.triggers) if inputs.settings.mitigation != "prune" else 1,  # pruning: the first's
    }


def tags(s: config.Mitigate) -> dict[str, str]:
    return {"twml.cleanse_run": s.cleanse_run}


def record(run: Run, outcome: Outcome) -> None:
    if outcome.filtering is None:
        run.log_model(outcome.model)
    else:  # the model is the one the cleanse run searched, unchanged: the run holds the filter
        k = outcome.filtering
        with artifacts(run) as folder:
            mitigation.save_filter(k.input_filter, folder / results.FILTER_FILE)
            stamped = {"the reversed trigger": k.profiles["reversed"]}
            if "real" in k.profiles:
                stamped["the real trigger"] = k.profiles["real"]
            figures.save(
                figures.filter_tradeoff_figure(k.profiles["clean"], stamped, k.input_filter.threshold),
                folder / results.FILTER_FIGURE,
            )
        run.log_metrics(
            {
                "filter_neurons": len(k.input_filter.neurons),
                "penultimate_neurons": k.input_filter.of,
                "filter_threshold": k.input_filter.threshold,
                "filter_clean_rejected": k.clean,
                "filter_reversed_rejected": k.reversed,
                **({"filter_real_rejected": k.real} if k.real is not None else {}),
            }
        )
    run.log_metrics(results.metrics(outcome.metrics) | results.metrics(outcome.change))
    if outcome.real is not None:
        run.log_metrics(results.metrics(outcome.real))
    if outcome.pruned is not None:
        run.log_metrics({"pruned_neurons": outcome.pruned.pruned, "penultimate_neurons": outcome.pruned.neurons})
    if outcome.unlearned is not None:  # the rate unlearning kept: --unlearn-lr, or less after fine-tunes that lost
        u = outcome.unlearned
        run.log_metrics(
            {
                "unlearn_lr_used": u.lr,
                "unlearn_restarts": len(u.lost),
                "unlearn_train_accuracy_before": u.started,  # the unstamped training images, which the restart reads
                "unlearn_train_accuracy": u.ended,
            }
        )


def summarize(o: Outcome) -> list[str]:
    m, f, k = o.metrics, o.finding, o.filtering
    n = len(f.triggers)
    flagged = f"Model {f.model_index} (class {f.target} flagged, anomaly index {f.anomaly_index:.2f})"
    if k is not None:
        lines = [
            f"{flagged}, filtered, its weights unchanged:",
            f"  Rejects an image whose mean activation on the {len(k.input_filter.neurons)} of "
            f"{k.input_filter.of} penultimate neurons {excited_by(n)} most exceeds {k.input_filter.threshold:.4g} "
            f"({o.settings.filter_rejects:.0%} of the clean training images)",
            f"  Clean test images rejected: {k.clean:.4f}",
            f"  Clean accuracy (a rejected image counts as wrong): {m.accuracy_before:.4f} -> {m.accuracy:.4f} "
            f"({o.change.in_words()})",
        ]
    else:
        how = (
            f"pruning {o.pruned.pruned} of {o.pruned.neurons} penultimate neurons"
            if o.pruned is not None
            else "unlearning" + (f" with the {n} searches' reversed triggers" if n > 1 else "")
        )
        lines = [
            f"{flagged}, repaired by {how}:",
            *_restarts(o.unlearned, o.settings.unlearn_restart_fall),
            f"  Clean accuracy: {m.accuracy_before:.4f} -> {m.accuracy:.4f} ({o.change.in_words()})",
        ]
    lines.append(f"  Reversed trigger's success: {m.reversed_success_before:.4f} -> {m.reversed_success:.4f}")
    if o.real is not None:
        lines.append(
            f"  Real trigger's attack success rate: {o.real.attack_success_rate_before:.4f} -> "
            f"{o.real.attack_success_rate:.4f}"
        )
    if k is not None and k.real is not None:
        lines.append(f"  Test images carrying the real trigger rejected: {k.real:.4f}")
    return lines


def excited_by(triggers: int) -> str:
    """Which reversed triggers a filter's neurons are those most excited by, in words, with the verb."""
    return "the reversed trigger excites" if triggers == 1 else f"the {triggers} searches' reversed triggers excite"


def _restarts(u: mitigation.Unlearned | None, fall: float) -> list[str]:
    """A line for each fine-tune that lost the clean training images and was not kept, and one more
    when none kept them."""
    if u is None:
        return []
    last = min([u.lr, *(lr for lr, _ in u.lost)])
    lines = [
        f"  Unlearning at lr {lr:g} lost the clean training images (accuracy {u.started:.4f} -> {acc:.4f})"
        + (f": started again at lr {lr / 2:g}" if lr > last else "")
        for lr, acc in u.lost
    ]
    if u.ended < u.started - fall:
        lines.append(
            f"  No fine-tune kept them within {fall * 100:g} points: kept the one at lr {u.lr:g}, which "
            f"ended highest ({u.started:.4f} -> {u.ended:.4f})"
        )
    return lines
