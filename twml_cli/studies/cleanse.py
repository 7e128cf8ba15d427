"""`twml cleanse`: Neural Cleanse (Wang et al., 2019) on each model: reversed triggers, the MAD
outlier test, and the verdict: which model is backdoored, toward which class."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import attacks, cleanse, config, distributed, figures, models, results, runtime
from ..data import MemoryDataSet
from ..runtime import Progress, Timer
from .common import (
    Hooks,
    Run,
    artifacts,
    check_fits,
    data_name,
    device,
    in_memory,
    load_model,
    model_source,
    source_run,
)

COMMAND = "cleanse"
SEARCH_SEED_STRIDE = 1000  # search i is seeded with seed + 1000 i: its own clean images and random starts
# A single search flags a class of some clean models (docs/neural-cleanse-measurements.md: 12% to
# 15% of 240 on the 8x8 digits, depending on the search's seed); the default, two that must both
# flag it, 2.5%.
SINGLE_SEARCH_CAUTION = (
    "One search per model; before acting on a flag, confirm it with twml cleanse --searches 2 "
    "(the default: two independent searches must both flag it)"
)


@dataclass
class Inputs:
    settings: config.Cleanse
    device: torch.device
    data: MemoryDataSet
    models: list[models.Classifier]
    sources: list[str]  # each model's run id or folder
    x_clean: torch.Tensor  # the clean images the trigger search uses (of the split search_split names)
    x_more: list[torch.Tensor] = field(default_factory=list)  # those of the further searches (--searches)
    repaired: list[int | None] = field(default_factory=list)  # per model: the class twml mitigate repaired, if any


@dataclass
class Finding:
    model: int
    target: int
    anomaly_index: float
    success_rate: float  # the reversed trigger on clean test images of other classes


@dataclass
class Search:
    """One further independent trigger search of a model (--searches)."""

    reversed: cleanse.ReversedTriggers
    test: cleanse.OutlierTest


@dataclass
class Inspection:
    """Neural Cleanse on one model: its first search (whose triggers are kept) and any further
    independent ones, which vote: a class is flagged when `needed` of the searches flag it."""

    source: str
    accuracy: float
    reversed: cleanse.ReversedTriggers
    test: cleanse.OutlierTest
    seconds: float
    more: list[Search] = field(default_factory=list)
    needed: int = 1

    @property
    def tests(self) -> list[cleanse.OutlierTest]:
        return [self.test] + [m.test for m in self.more]

    @property
    def signed_indices(self) -> np.ndarray:
        """(searches, classes): each search's anomaly index of each class, negative above its median."""
        return np.stack([np.where(t.below, t.anomaly_index, -t.anomaly_index) for t in self.tests])

    @property
    def _rank(self) -> int:
        """Where the agreed index lies among the searches run, highest first: the `needed`-th, or
        the lowest when fewer ran (a class that no search left could have flagged; see settled)."""
        return min(self.needed, len(self.tests)) - 1

    @property
    def agreed_index(self) -> np.ndarray:
        """Per class, the signed index that `needed` of the searches reach (one search: its own; all
        of them: the lowest; more than half of three: the median), so that a class is flagged
        exactly when it lies above the threshold."""
        ranked = -np.sort(-self.signed_indices, axis=0)
        return ranked[self._rank]

    @property
    def votes(self) -> np.ndarray:
        """Per class, how many searches flag it."""
        return np.sum([t.flagged for t in self.tests], axis=0)

    @property
    def flagged(self) -> np.ndarray:
        """The verdict: classes flagged by `needed` of the searches (one: the paper's test)."""
        return self.votes >= self.needed

    @property
    def anomaly_index(self) -> float:
        """The largest anomaly index among classes below the median norm (0 when none); with
        several searches, of the agreed indices."""
        return float(max(self.agreed_index.max(), 0.0))

    @property
    def ceiling(self) -> float:
        """The largest index `needed` of the searches could agree on, whatever the norms: the
        `needed`-th largest of their ceilings (each the index of a norm of 0, median / MAD)."""
        return sorted((t.ceiling for t in self.tests), reverse=True)[self._rank]

    def blind(self, threshold: float) -> bool:
        """Whether no class could have been flagged, whatever its norm: fewer than `needed` of the
        searches have a ceiling above the threshold."""
        return self.ceiling <= threshold


@dataclass
class Outcome:
    settings: config.Cleanse
    inspections: list[Inspection]
    findings: list[Finding] = field(default_factory=list)
    at_once: int = 1  # models searched at the same time (models_at_once): their times overlap
    repaired: list[int | None] = field(default_factory=list)  # per model: the class twml mitigate repaired, if any

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
    data = in_memory(data_name(s.dataset, loaded[0], "digits"), s, COMMAND, loaded[0])
    for uri, model in zip(s.model_runs, loaded):
        check_fits(model, data.info, f"model {uri}")
    pool = (data.train if s.search_split == "train" else data.test).x.cpu()
    picks = [
        torch.randperm(len(pool), generator=torch.Generator().manual_seed(search_seed(s, i)))[: s.search_images]
        for i in range(s.searches)
    ]
    s = dataclasses.replace(s, dataset=data.info.name, search_images=len(picks[0]))
    sources = [next(iter(model_source(r).values())) for r in s.model_runs]
    repaired = [repaired_class(r) for r in s.model_runs]
    return Inputs(s, dev, data, loaded, sources, pool[picks[0]], [pool[p] for p in picks[1:]], repaired)


def repaired_class(uri: str) -> int | None:
    """The class a `twml mitigate` run repaired, when `uri` names that run (its model is the
    repaired one); None for any other run, a folder or a models:/ URI."""
    run = source_run(uri)
    if run is None or run.data.tags.get(results.COMMAND_TAG) != "mitigate" or "target" not in run.data.params:
        return None
    return int(run.data.params["target"])


def search_seed(s: config.Cleanse, i: int) -> int:
    """The seed of search i: the run's for the first (the paper's single search), then apart."""
    return s.seed + SEARCH_SEED_STRIDE * i


def compute(inputs: Inputs, hooks: Hooks = Hooks()) -> Outcome:
    s = inputs.settings
    x_test, y_test = inputs.data.test.x.cpu(), inputs.data.test.y.cpu()

    def inspect(i: int, progress: Progress) -> tuple[Inspection, list[Finding]]:
        model, source = inputs.models[i], inputs.sources[i]
        accuracy = attacks.accuracy(model, inputs.data.test, s.eval_batch_size)
        searches: list[Search] = []
        with Timer(inputs.device) as timer:
            for k, x_clean in enumerate([inputs.x_clean, *inputs.x_more]):
                if settled([m.test.flagged for m in searches], s.searches, s.votes_needed):
                    break  # no further search could change the verdict
                search = dataclasses.replace(s.cleanse_config(), seed=search_seed(s, k))
                rev = cleanse.reverse_engineer_all(model, x_clean, model.spec.num_classes, search, progress=progress)
                searches.append(Search(rev, cleanse.mad_outlier_test(rev.norms, s.anomaly_threshold)))
        first, *more = searches
        ins = Inspection(source, accuracy, first.reversed, first.test, timer.seconds, more, s.votes_needed)
        agreed = ins.agreed_index
        found = []
        for c in np.flatnonzero(ins.flagged):
            rate = cleanse.reversed_trigger_success(model, ins.reversed, int(c), x_test, y_test)
            found.append(Finding(i, int(c), float(agreed[c]), rate))
        return ins, found

    n, at_once = len(inputs.models), models_at_once(inputs)
    inspected = runtime.side_by_side(
        inspect,
        list(range(n)),
        at_once,
        hooks.progress,
        n * s.searches * s.search_steps,
        f"cleanse ({n} models, {at_once} at a time"
        + (f", up to {s.searches} searches each)" if s.searches > 1 else ")"),
    )
    found = [f for _, each in inspected for f in each]
    return Outcome(s, [ins for ins, _ in inspected], found, at_once, inputs.repaired)


def models_at_once(inputs: Inputs) -> int:
    """How many models are searched at the same time: on a CPU, in one process, with the search
    on one intra-op thread (as the embedded digits' small batches choose), one per core, each on
    a Python thread of its own; a model's searches give the same numbers either way (a test
    checks it). Elsewhere one after another."""
    if inputs.device.type != "cpu" or distributed.world_size() > 1 or torch.get_num_threads() > 1:
        return 1
    return max(1, min(len(inputs.models), runtime.machine_cores()[0]))


def settled(flags: list[np.ndarray], searches: int, needed: int) -> bool:
    """Whether the verdict of `searches` searches, `needed` of which must flag a class, is decided
    by the flags (per class) of those run so far: every class already has `needed` votes, or could not reach
    them with every search left. Two searches that must both flag a class stop after the first
    when it flags none; three of which two must agree run the third only where the first two differ."""
    if not flags:
        return False
    votes = np.sum(flags, axis=0)
    left = searches - len(flags)
    return bool(np.all((votes >= needed) | (votes + left < needed)))


def searches_run(flags: list[np.ndarray], needed: int) -> int:
    """How many of these searches (each one's flags per class, in order) twml cleanse runs when
    `needed` of them must flag a class: up to the first after which the verdict is settled."""
    return next(k for k in range(1, len(flags) + 1) if settled(flags[:k], len(flags), needed))


def extra_params(inputs: Inputs) -> dict[str, str]:
    return {f"model{i}": source for i, source in enumerate(inputs.sources)}


def searched_models(params: dict[str, str]) -> list[str]:
    """The models a logged cleanse run searched, read back from the params extra_params wrote (model0,
    model1, ...): run ids where they were runs, else the sources as given."""
    sources, i = [], 0
    while source := params.get(f"model{i}"):
        sources.append(results.run_in(source) or source)
        i += 1
    return sources


def norms_table(outcome: Outcome) -> pd.DataFrame:
    """One row per (model, class): the schema of norms.csv. The norm, the rounds and whether the
    threshold was reached are the first search's (whose triggers are kept); with several
    searches, the anomaly index is the agreed one (see Inspection.agreed_index), and the row also
    gives how many searches flagged the class and the lowest and highest of their indices
    (negative: above that search's median)."""
    rows = []
    for i, ins in enumerate(outcome.inspections):
        rev, signed, agreed, flagged, votes = ins.reversed, ins.signed_indices, ins.agreed_index, ins.flagged, ins.votes
        for j, c in enumerate(rev.classes):
            row = {
                "model": i,
                "run_id": ins.source,
                "class": c,
                "norm": rev.norms[j],
                "anomaly_index": abs(agreed[j]),
                "flagged": bool(flagged[j]),
                "reached_threshold": bool(rev.reached[j]),
                "rounds": int(rev.rounds[j]),
            }
            if ins.more:
                row.update(
                    flagged_by=int(votes[j]),
                    searches=len(ins.tests),
                    anomaly_index_lowest=signed[:, j].min(),
                    anomaly_index_highest=signed[:, j].max(),
                )
            rows.append(row)
    return pd.DataFrame(rows)


def record(run: Run, outcome: Outcome) -> None:
    metrics: dict[str, float] = {}
    for i, ins in enumerate(outcome.inspections):
        metrics.update(
            results.metrics(results.CleanseModelMetrics(ins.accuracy, ins.anomaly_index, ins.seconds), f"model{i}_")
        )
        metrics[f"model{i}_{results.ANOMALY_CEILING}"] = ins.ceiling
        if outcome.settings.searches > 1:
            metrics[f"model{i}_{results.SEARCHES_RUN}"] = len(ins.tests)
    if outcome.strongest is not None:
        metrics[results.BACKDOOR_SUCCESS] = outcome.strongest.success_rate
    run.log_metrics(metrics)
    run.log_params({results.MODELS_AT_ONCE: outcome.at_once})
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
            # every search's triggers (twml mitigate stamps them all), the first's under the keys they always had
            for k, search in enumerate([rev, *(m.reversed for m in ins.more)]):
                masks, patterns = results.reversed_keys(i, k)
                arrays[masks], arrays[patterns] = search.masks.numpy(), search.patterns.numpy()
            panels.append(
                {
                    "name": f"model {i} ({_panel(ins.source)})",
                    "norms": rev.norms,
                    "median": ins.test.median,
                    "mad": ins.test.mad,
                    "threshold": outcome.settings.anomaly_threshold,
                    "flagged": ins.flagged,
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
    searches = outcome.settings.searches
    for i, ins in enumerate(outcome.inspections):
        if len(ins.tests) < searches:
            lines.append(
                f"Model {i}: {len(ins.tests)} of {searches} searches run; no further one could have changed its verdict"
            )
        split = np.flatnonzero((ins.votes > 0) & ~ins.flagged)
        lines += [
            f"Class {c} of model {i}: flagged by {ins.votes[c]} of {len(ins.tests)} searches, fewer than the "
            f"{ins.needed} needed"
            for c in split
        ]
    threshold = outcome.settings.anomaly_threshold
    for i, ins in enumerate(outcome.inspections):
        if ins.blind(threshold):
            ceilings = ", ".join(f"{t.ceiling:.2f}" for t in ins.tests)
            above = sum(t.ceiling > threshold for t in ins.tests)
            lines.append(
                f"No class of model {i} could have been flagged: a trigger of norm 0 would have an anomaly index "
                + (
                    f"of {ceilings} in its {len(ins.tests)} searches (median norm / MAD), above {threshold:g} in "
                    f"{above}, fewer than the {ins.needed} needed"
                    if ins.more
                    else f"of {ceilings} (median norm / MAD), not above {threshold:g}"
                )
            )
    for f in outcome.findings:
        ins = outcome.inspections[f.model]
        agreed = (
            f"; flagged by {ins.votes[f.target]} of {len(ins.tests)} searches, their indices "
            f"{ins.signed_indices[:, f.target].min():.2f} to {ins.signed_indices[:, f.target].max():.2f}"
            if ins.more
            else ""
        )
        lines += [
            f"Backdoor is at model {f.model} class {f.target} (anomaly index {f.anomaly_index:.2f}{agreed})",
            f"Backdoor success rate: {f.success_rate:.4f}",
            *_after_repair(outcome, f),
        ]
    if not outcome.findings:
        lines.append(f"No backdoor found: no class has an anomaly index above {threshold:g} below the median norm")
    elif outcome.settings.searches == 1:
        lines.append(SINGLE_SEARCH_CAUTION)
    for i, (ins, was) in enumerate(zip(outcome.inspections, outcome.repaired)):
        if was is not None and not ins.flagged[was]:  # a repair that holds: where its class stands now
            norms = ins.reversed.norms
            lines.append(
                f"Model {i} was repaired for class {was} (twml mitigate), which is no longer flagged: "
                + standing(was, float(norms[was]), float(np.median(norms)), abs(float(ins.agreed_index[was])))
            )
    return lines


def standing(c: int, norm: float, median: float, index: float) -> str:
    """Where a repaired class's smallest trigger stands among its model's: its norm (the first
    search's) against the median class's, and its anomaly index where it is below the median."""
    if norm >= median:
        return f"class {c}'s smallest trigger is now larger than the median class's ({norm:.2f} against {median:.2f})"
    return f"class {c}'s smallest trigger is now {norm:.2f} against a median of {median:.2f}, anomaly index {index:.2f}"


def _after_repair(outcome: Outcome, f: Finding) -> list[str]:
    """What a flag on a model that twml mitigate repaired means: its own class still has a small
    trigger, or another class's natural trigger stands out now that the backdoor's no longer
    widens the spread of the norms (docs: "Searching the repaired model again")."""
    was = outcome.repaired[f.model] if f.model < len(outcome.repaired) else None
    if was is None:
        return []
    if was == f.target:
        return [
            f"Model {f.model} was repaired for class {was} (twml mitigate), and a small trigger of it is still found"
        ]
    return [
        f"Model {f.model} was repaired for class {was} (twml mitigate), not class {f.target}: a repair can uncover a "
        f"natural trigger that the backdoor's small one had hidden; compare class {f.target} in a clean model"
    ]


def _short(source: str) -> str:
    """'run be5a1e18' for a run id (as the report prints it), else the model as given."""
    run = results.run_in(source)
    return f"run {run[:8]}" if run else source


def _panel(source: str) -> str:
    """A model's name in a figure: its run id's first 8 characters, a models:/ URI, or its folder's
    name (not the path's first 8 characters)."""
    short = _short(source)
    if short != source or source.startswith("models:/"):
        return short.removeprefix("run ")
    return Path(source).name


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
