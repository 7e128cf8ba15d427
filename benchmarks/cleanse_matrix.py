"""Neural Cleanse's detection matrix: plant BadNets triggers at every position, for several
targets, trigger sizes and training seeds, and check that the trigger search finds each one,
and only it; inspect one clean model per seed for false alarms; repair every detected model by
unlearning. Through each study's compute() (no MLflow), as `twml backdoor`, `twml cleanse`
and `twml mitigate` would run.

    python benchmarks/cleanse_matrix.py                           # the whole matrix: 5 x 3 x 2 x 5 = 150 cells
    python benchmarks/cleanse_matrix.py --jobs 2                  # two cells at a time, one thread each
    python benchmarks/cleanse_matrix.py --positions centre --sizes 2 --seeds 0,1
    python benchmarks/cleanse_matrix.py --cells 0:30              # a slice of the matrix
    python benchmarks/cleanse_matrix.py --clean-seeds 0-9,100-109 --positions none   # clean models only
    python benchmarks/cleanse_matrix.py --mitigate                # unlearning on every detected cell
    python benchmarks/cleanse_matrix.py --mitigate --unlearn-seed 1000   # ... with other images stamped
    python benchmarks/cleanse_matrix.py --mitigate --renormalize  # ... and after BatchNorm statistics re-estimated
    python benchmarks/cleanse_matrix.py --mitigate --recheck      # ... and twml cleanse on every repaired model
    python benchmarks/cleanse_matrix.py --dataset digits16 --jobs 2     # the same digits at 16x16
    python benchmarks/cleanse_matrix.py --dataset mine.npz --jobs 2     # a data set of one's own
    python benchmarks/cleanse_matrix.py --cpu-bf16 --jobs 2       # the search in bf16, as on a GPU

A cell is (seed, position, target, trigger size). Trained models are kept in --out and reused
by later runs (and across cells: one clean model per seed); each cell's result is one JSON
line in --out/cells.jsonl, keyed by the cell and the search settings (the preset's defaults
with the overrides; a model is retrained when its training settings changed), so an
interrupted matrix resumes where it stopped. Each line is one search; a model gets as many
independent searches as the preset's `searches` (two on the digits, seeded with the training seed
plus 0 and 1000, as twml cleanse seeds them) and the verdict of its `agreement` (on the digits, both
must flag a class), unless --search-seeds and --agree say otherwise. The summary (detection
rate, false alarms, norm ratios, repairs, why each missed cell was missed) is printed at the end
and written to --out/matrix.md with the Markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

POSITIONS = ("bottom-right", "bottom-left", "top-left", "top-right", "centre")
DATASET = "digits"


@dataclasses.dataclass(frozen=True)
class Cell:
    seed: int
    position: str | None = None  # None: the clean model of this seed
    target: int = 0
    size: int = 1

    @property
    def name(self) -> str:
        return (
            f"seed{self.seed}-clean"
            if self.position is None
            else f"seed{self.seed}-{self.position}-t{self.target}-s{self.size}"
        )


def parse_ints(text: str) -> list[int]:
    """'0-4' or '0,3,7' or '0-9,100-109'."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        elif part:
            out.append(int(part))
    return out


# ---------------------------------------------------------------- one cell (runs in a worker)


def _settings(command: str, **overrides):
    from twml_cli import config

    return config.resolve_one(command, config.load_preset(), {k: v for k, v in overrides.items() if v is not None})


def _resolved(command: str, **overrides) -> dict:
    """The settings a step runs with, the preset's defaults and the overrides together, as a run
    would log them, less where and how it runs (the threads are keyed apart) and model_runs (a
    path): what --out's cached results are keyed by, so that a changed default is recomputed
    rather than read back."""
    from twml_cli import config

    settings = _settings(command, **overrides)
    # a setting added since results were cached, at the value they ran with: left out of the key,
    # so that those results are read back rather than recomputed
    before = config.logged_before(type(settings))
    return {
        k: v
        for k, v in config.params(settings).items()
        if k not in (*config.RUNTIME_ONLY, "model_runs") and not (k in before and before[k] == v)
    }


def _data_kind(dataset: str) -> str:
    """The prefix of a data set's model folders: none for the embedded digits, the name of another
    embedded set, an .npz file's name and the hash of its bytes (a changed file trains anew)."""
    if dataset == DATASET:
        return ""
    if not dataset.endswith(".npz"):
        return f"{dataset}-"
    return f"{Path(dataset).stem}-{hashlib.sha1(Path(dataset).read_bytes()).hexdigest()[:8]}-"


def dataset_arg(text: str) -> str:
    """--dataset: an embedded set's name, or an .npz file (its absolute path, as the results key it)."""
    if text in (DATASET, "digits16"):
        return text
    if text.endswith(".npz") and Path(text).is_file():
        return str(Path(text).resolve())
    raise argparse.ArgumentTypeError(f"{text}: use {DATASET}, digits16 or an existing .npz file")


def _model(out: Path, cell: Cell, threads: int, dataset: str = DATASET) -> tuple[str, dict]:
    """The cell's model trained on `dataset` with `threads` intra-op threads (trained now unless
    --out already holds it: a CPU's numbers depend on the thread count) and its figures."""
    from twml_cli.models import save_model
    from twml_cli.studies import backdoor, train

    kind = f"{_data_kind(dataset)}threads{threads}"
    folder = out / "models" / kind / cell.name
    facts = folder / "facts.json"
    if cell.position is None:
        command, overrides = "train", {"seed": cell.seed, "pgd_steps": 1, "dataset": dataset}
    else:
        command = "backdoor"
        overrides = {
            "seed": cell.seed,
            "target": cell.target,
            "position": cell.position,
            "trigger_size": cell.size,
            "dataset": dataset,
        }
    settings = key(_resolved(command, **overrides))
    if facts.is_file():
        info = json.loads(facts.read_text())
        if info.pop("settings", None) == settings:
            return str(folder), info
    began = time.perf_counter()  # no model yet, or one trained with other settings: train it
    if cell.position is None:
        outcome = train.compute(train.prepare(_settings(command, **overrides)))
        model, info = outcome.model, {"accuracy": outcome.robustness.accuracy}
    else:
        outcome = backdoor.compute(backdoor.prepare(_settings(command, **overrides)))
        model, info = outcome.model, {"accuracy": outcome.accuracy, "attack_success": outcome.attack_success_rate}
    save_model(model, folder)
    info["train_s"] = round(time.perf_counter() - began, 1)
    facts.write_text(json.dumps({**info, "settings": settings}))
    return str(folder), info


def train_cell(out: Path, cell: Cell, threads: int, dataset: str = DATASET) -> dict:
    import torch

    torch.set_num_threads(threads)
    return {"cell": cell.name, **_model(out, cell, threads, dataset)[1]}


def _search_settings(
    out: Path, cell: Cell, threads: int, model_threads: int, search: dict, seed_offset: int, dataset: str
):
    """The settings of one search of the cell's model, seeded with the training seed plus
    `seed_offset`, and the model's figures; the model is trained with `model_threads` when --out
    lacks it, and the search gets `threads`."""
    import torch

    torch.set_num_threads(model_threads)
    path, facts = _model(out, cell, model_threads, dataset)
    torch.set_num_threads(threads)
    s = _settings("cleanse", seed=cell.seed + seed_offset, model_runs=[path], dataset=dataset, **search, searches=1)
    return s, facts


def run_cell(
    out: Path,
    cell: Cell,
    threads: int,
    search: dict,
    name: str,
    model_threads: int,
    seed_offset: int = 0,
    dataset: str = DATASET,
) -> dict:
    """Neural Cleanse on the cell's model, its search seeded with the training seed plus
    `seed_offset` (which clean images and which random starts); its reversed triggers are kept
    in out/triggers/NAME.npz."""
    from twml_cli.studies import cleanse

    s, facts = _search_settings(out, cell, threads, model_threads, search, seed_offset, dataset)
    began = time.perf_counter()
    inputs = cleanse.prepare(s)
    outcome = cleanse.compute(inputs)
    seconds = time.perf_counter() - began
    (ins,) = outcome.inspections
    rev = ins.reversed
    (out / "triggers").mkdir(exist_ok=True)
    np.savez(
        out / "triggers" / f"{name}.npz",
        masks=rev.masks.numpy(),
        patterns=rev.patterns.numpy(),
        start_norms=rev.start_norms,
    )
    flagged = [int(c) for c in np.flatnonzero(ins.test.flagged)]
    row = {
        "cell": cell.name,
        "seed": cell.seed,
        "position": cell.position,
        "target": cell.target,
        "size": cell.size,
        "threads": threads,
        "model_threads": model_threads,
        "search_seed": cell.seed + seed_offset,
        **{k: round(v, 4) for k, v in facts.items()},
        "flagged": flagged,
        "largest_index": round(ins.anomaly_index, 3),
        "norms": [round(float(v), 3) for v in rev.norms],
        "cleanse_s": round(seconds, 1),
        "search_images": rev.images,
    }
    if cell.position is not None:
        row.update(
            detected=flagged == [cell.target],
            target_index=round(float(ins.test.anomaly_index[cell.target]), 3),
            norm_ratio=round(float(rev.norms[cell.target]) / planted_norm(cell.size, cell.position), 3),
            target_reached=bool(rev.reached[cell.target]),
            planted_search_success=_planted_success(inputs, cell),
        )
    return row


def _planted_success(inputs, cell: Cell) -> float:
    """The planted trigger's success on the clean images the search used, counted as the search
    counts its own (every image, the target's class too): below the search's threshold, the search
    cannot return the planted trigger itself."""
    from twml_cli.backdoor import Trigger, stamped_success_rate

    assert cell.position is not None  # a planted cell
    trigger = Trigger(cell.size, cell.position)
    return round(stamped_success_rate(inputs.models[0], inputs.x_clean, cell.target, trigger.apply), 4)


def planted_success(
    out: Path, cell: Cell, threads: int, model_threads: int, search: dict, seed_offset: int, dataset: str
) -> float:
    """_planted_success for a cell searched before its rows kept it (see main)."""
    from twml_cli.studies import cleanse

    s, _ = _search_settings(out, cell, threads, model_threads, search, seed_offset, dataset)
    return _planted_success(cleanse.prepare(s), cell)


def clean_success(
    out: Path, cells: list[Cell], threads: int, model_threads: int, dataset: str = DATASET
) -> dict[Cell, float]:
    """The planted trigger's attack success on the clean model of each planted cell's seed (the test
    images not of the target, as the backdoored model's is measured), for the seeds whose clean
    model is among `cells`: what a model that was never backdoored gives, and so how low a repair
    can bring it."""
    import torch

    from twml_cli.backdoor import Trigger, attack_success_rate
    from twml_cli.data import load_dataset
    from twml_cli.models import load_model_dir

    torch.set_num_threads(threads)
    _, test = load_dataset(dataset)
    x, y = test.tensors
    planted: dict[int, list[Cell]] = {}
    for c in cells:
        if c.position is not None:
            planted.setdefault(c.seed, []).append(c)
    found = {}
    for clean in (c for c in cells if c.position is None and c.seed in planted):
        model = load_model_dir(_model(out, clean, model_threads, dataset)[0])
        for c in planted[clean.seed]:
            assert c.position is not None
            found[c] = round(attack_success_rate(model, x, y, c.target, Trigger(c.size, c.position)), 4)
    return found


def planted_trigger(cell: Cell, shape: tuple[int, ...]):
    """The planted trigger as a reversed one, (mask (H, W), pattern `shape` (C, H, W)): what a
    perfect search would return. Stamped, it gives the planted trigger's images."""
    import torch

    from twml_cli.backdoor import Trigger

    trigger = Trigger(cell.size, cell.position)
    return trigger.apply(torch.zeros(1, 1, *shape[-2:]))[0, 0], torch.full(shape, trigger.value)


def planted_share(mask: np.ndarray, cell: Cell) -> float:
    """The share of a reversed mask's L1 weight on the planted trigger's pixels: 1 when the search
    found the planted trigger, near 0 when it found another trigger of the target class."""
    from twml_cli.backdoor import Trigger

    assert cell.position is not None  # a planted cell
    return Trigger(cell.size, cell.position).weight_share(mask)


def where_found(shares: dict[Cell, list[float]], rows: list[dict]) -> list[str]:
    """Where the searches put the target's trigger, over the corner cells (`shares`: each search's
    planted_share, by cell; `rows`: the cells' verdicts, with their repairs when --mitigate), and
    how unlearning fared on detected cells whose every search found another trigger."""
    corner = {c: s for c, s in shares.items() if c.position != "centre"}
    if not corner:
        return []
    each = [v for s in corner.values() for v in s]
    elsewhere = {c for c, s in corner.items() if max(s) < 0.1}
    lines = [
        f"the target's reversed mask on the planted pixels (corner cells, each search): median share of its weight "
        f"{np.median(each):.2f}; under 10%, another trigger of the target, in {sum(v < 0.1 for v in each)} of "
        f"{len(each)} searches, and in every search of {len(elsewhere)} of {len(corner)} cells"
    ]
    names = {c.name for c in elsewhere}
    repaired = [r for r in rows if r.get("detected") and "repair_attack_success" in r and r["position"] != "centre"]
    if repaired:
        kept = {
            group: (sum(r["repair_attack_success"] > 0.05 for r in rs), len(rs))
            for group, rs in (
                ("another trigger in every search", [r for r in repaired if r["cell"] in names]),
                ("the others", [r for r in repaired if r["cell"] not in names]),
            )
        }
        lines.append(
            "detected corner cells keeping attack success above 0.05 after repair: "
            + "; ".join(f"{group}: {k} of {n}" for group, (k, n) in kept.items())
        )
    return lines


def repair_cell(
    out: Path,
    cell: Cell,
    threads: int,
    names: list[str],
    unlearn: dict,
    model_threads: int,
    seed_offset: int = 0,
    dataset: str = DATASET,
    planted: bool = False,
    renormalize: bool = False,
    recheck: dict | None = None,
) -> dict:
    """`twml mitigate` with the detected class's reversed triggers, one per search (`names`: their
    files in out/triggers, the first search's first), the real trigger measured; seeded with the
    training seed plus `seed_offset` (which images are stamped, and their order). `planted`: with
    the planted trigger instead (a control: what the best reversed trigger would give).
    `renormalize`: also the repaired model's clean accuracy and real trigger after its
    normalization statistics are estimated again on the clean training images. `recheck`: also
    twml cleanse on the repaired model, with these search settings (recheck_verdict)."""
    import torch

    from twml_cli.backdoor import Trigger
    from twml_cli.studies import mitigate

    torch.set_num_threads(threads)
    path, _ = _model(out, cell, model_threads, dataset)
    triggers = []
    for name in names:
        with np.load(out / "triggers" / f"{name}.npz", allow_pickle=False) as z:
            triggers.append((torch.from_numpy(z["masks"][cell.target]), torch.from_numpy(z["patterns"][cell.target])))
    if planted:
        triggers = [planted_trigger(cell, triggers[0][1].shape)]
    (mask, pattern), *more = triggers
    finding = mitigate.Finding(
        path, 0, cell.target, 0.0, mask, pattern, Trigger(cell.size, cell.position), cell.target, more
    )
    s = _settings("mitigate", seed=cell.seed + seed_offset, dataset=dataset, **unlearn)
    began = time.perf_counter()
    inputs = mitigate.prepare(s, finding)
    repaired = mitigate.compute(inputs)
    m, real = repaired.metrics, repaired.real
    row = {
        "repair_accuracy_before": round(m.accuracy_before, 4),
        "repair_accuracy_change": round(m.accuracy - m.accuracy_before, 4),
        "repair_attack_success_before": round(real.attack_success_rate_before, 4),
        "repair_attack_success": round(real.attack_success_rate, 4),
        "repair_s": round(time.perf_counter() - began, 1),
        "repair_restarts": len(repaired.unlearned.lost) if repaired.unlearned else 0,  # fine-tunes that lost the images
        "repair_images_lost": repaired.change.test_images_lost,
        "repair_images_gained": repaired.change.test_images_gained,
    }
    if (k := repaired.filtering) is not None:  # what the filter rejects of the test images
        row["repair_clean_rejected"], row["repair_real_rejected"] = round(k.clean, 4), round(k.real or 0.0, 4)
    if renormalize:
        model = renormalized(repaired.model, inputs.data.train.x.cpu())
        again = mitigate.measure(model, inputs)
        row["renormalized_accuracy_change"] = round(again.accuracy - m.accuracy_before, 4)
        row["renormalized_attack_success"] = round(again.real, 4)
    if recheck is not None:
        row.update(recheck_verdict(repaired.model, cell, recheck, dataset))
    return row


def recheck_verdict(model, cell: Cell, search: dict, dataset: str) -> dict:
    """twml cleanse on a repaired model (its search settings `search`, seeded as the cell's own
    searches were): the classes its verdict flags, the target's agreed index and every class's
    (signed: below zero, the class's reversed trigger is larger than the median class's), and
    each search's reversed norms."""
    import tempfile

    from twml_cli import models
    from twml_cli.studies import cleanse

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = models.save_model(model, Path(folder) / "repaired")
        s = _settings("cleanse", seed=cell.seed, model_runs=[str(path)], dataset=dataset, **search)
        (ins,) = cleanse.compute(cleanse.prepare(s)).inspections
    return {
        "recheck_flagged": [int(c) for c in np.flatnonzero(ins.flagged)],
        "recheck_target_index": round(float(ins.agreed_index[cell.target]), 3),
        "recheck_indices": [round(float(i), 3) for i in ins.agreed_index],
        "recheck_norms": [[round(float(n), 3) for n in t.reversed.norms] for t in [ins, *ins.more]],
        "recheck_s": round(time.perf_counter() - began, 1),
    }


def renormalized(model, x, batch_size: int = 128):
    """A copy of the model whose BatchNorm statistics are estimated again on x, as the plain mean
    over its batches, the weights as they are: what training on in train mode would start from."""
    import copy

    from twml_cli.mitigation import estimate_norm_statistics

    model = copy.deepcopy(model)
    estimate_norm_statistics(model, x, batch_size)
    return model


# ---------------------------------------------------------------- the matrix


def key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def planted_norm(size: int, position: str) -> float:
    """The L1 norm of the planted trigger's mask: a size x size square of ones."""
    from twml_cli.backdoor import Trigger

    return float(Trigger(size, position).size ** 2)


def paired(repaired: list[dict], repair: str) -> str:
    """The test images each repair changed, and which accuracy changes McNemar's exact test tells
    from chance at 0.05 (on 360 images a point is 3.6 of them)."""
    from twml_cli.results import AccuracyChange

    def significant(r: dict) -> bool:
        return AccuracyChange(r["repair_images_lost"], r["repair_images_gained"]).p_value() < 0.05

    changed = [r["repair_images_lost"] + r["repair_images_gained"] for r in repaired]
    down = [r for r in repaired if r["repair_images_lost"] > r["repair_images_gained"] and significant(r)]
    up = [r for r in repaired if r["repair_images_gained"] > r["repair_images_lost"] and significant(r)]
    fell = [r for r in repaired if r["repair_accuracy_change"] < -0.01]
    q1, q2, q3 = np.percentile(changed, [25, 50, 75])
    return (
        f"{repair}: test images a repair changed, median {q2:g} (quartiles {q1:g} to {q3:g}, at most {max(changed)}); "
        f"McNemar's exact test below 0.05: accuracy down in {len(down)}, up in {len(up)}; of the {len(fell)} that "
        f"lose more than a point, {sum(significant(r) for r in fell)} below 0.05"
    )


def summary(rows: list[dict], repair: str = "unlearning") -> list[str]:
    planted = [r for r in rows if r["position"] is not None]
    clean = [r for r in rows if r["position"] is None]
    lines = []
    if planted:
        detected = [r for r in planted if r["detected"]]
        second = [r for r in planted if set(r["flagged"]) - {r["target"]}]
        ratios = [r["norm_ratio"] for r in detected]
        lines.append(
            f"planted cells: {len(planted)}; detected (the target flagged, and only it): {len(detected)} "
            f"({100 * len(detected) / len(planted):.1f}%); a second class flagged: {len(second)} "
            f"({100 * len(second) / len(planted):.1f}%)"
        )
        if ratios:
            lines.append(
                f"reversed / planted norm over detected cells: median {np.median(ratios):.2f}, "
                f"quartiles {np.percentile(ratios, 25):.2f} to {np.percentile(ratios, 75):.2f}, largest "
                f"{max(ratios):.2f}"
            )
        for field in ("position", "size", "target"):
            groups = {}
            for r in planted:
                groups.setdefault(r[field], []).append(r["detected"])
            lines.append(f"detected by {field}: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in groups.items()))
        repaired = [r for r in detected if "repair_attack_success" in r]
        filtered = [r for r in repaired if "repair_real_rejected" in r]
        if filtered:  # its accuracy counts the clean images it rejects: not a repair's accuracy to compare
            rejected_clean, real = ([r[f"repair_{k}_rejected"] for r in filtered] for k in ("clean", "real"))
            attack = [r["repair_attack_success"] for r in filtered]
            lines.append(
                f"{repair}: test images carrying the planted trigger rejected, median {np.median(real):.4f} (lowest "
                f"{min(real):.4f}, under 0.95 in {sum(v < 0.95 for v in real)} of {len(filtered)}); clean test images "
                f"rejected, median {np.median(rejected_clean):.4f} ({min(rejected_clean):.4f} to "
                f"{max(rejected_clean):.4f}); attack success after above 0.05 in {sum(a > 0.05 for a in attack)} "
                f"(largest {max(attack):.4f})"
            )
        elif repaired:
            ok = [r for r in repaired if r["repair_attack_success"] <= 0.05 and r["repair_accuracy_change"] >= -0.01]
            changes = [r["repair_accuracy_change"] for r in repaired]
            lines.append(
                f"{repair}: {len(ok)} of {len(repaired)} repaired (attack success <= 0.05, accuracy within 1 point); "
                f"attack success after: largest {max(r['repair_attack_success'] for r in repaired):.4f}; "
                f"accuracy change {min(changes):+.4f} to {max(changes):+.4f} (median {np.median(changes):+.4f})"
                + (
                    f"; started again at half the rate after losing the clean training images: {len(restarted)}"
                    if (restarted := [r for r in repaired if r.get("repair_restarts")])
                    else ""
                )
            )
        if counted := [r for r in repaired if "repair_images_lost" in r]:
            lines.append(paired(counted, repair))
        rechecked = [r for r in repaired if "recheck_flagged" in r]
        if rechecked:
            after = [r["recheck_target_index"] for r in rechecked]
            lines.append(
                f"twml cleanse on the repaired models: the target flagged in "
                f"{sum(r['target'] in r['recheck_flagged'] for r in rechecked)} of {len(rechecked)}, any class in "
                f"{sum(bool(r['recheck_flagged']) for r in rechecked)}; the target's agreed index median "
                f"{np.median(after):.2f} ({min(after):.2f} to {max(after):.2f}), against "
                f"{np.median([r['target_index'] for r in rechecked]):.2f} before repair"
            )
        renormed = [r for r in repaired if "renormalized_attack_success" in r]
        if renormed:
            attack = [r["renormalized_attack_success"] for r in renormed]
            change = [r["renormalized_accuracy_change"] for r in renormed]
            lines.append(
                f"{repair}, then the normalization statistics estimated again on the clean training images: "
                f"attack success above 0.05 in {sum(a > 0.05 for a in attack)} of {len(renormed)} (median "
                f"{np.median(attack):.4f}, {min(attack):.4f} to {max(attack):.4f}); accuracy change {min(change):+.4f} "
                f"to {max(change):+.4f} (median {np.median(change):+.4f})"
            )
        floor = [r for r in planted if "clean_attack_success" in r]
        if floor:
            worst = max(floor, key=lambda r: r["clean_attack_success"])
            kept = [r for r in repaired if r["repair_attack_success"] > 0.05 and "clean_attack_success" in r]
            after = [f"{r['repair_attack_success']:.4f} (clean: {r['clean_attack_success']:.4f})" for r in kept]
            lines.append(
                f"the planted trigger on the clean model of its seed (never backdoored): attack success median "
                f"{np.median([r['clean_attack_success'] for r in floor]):.4f}, above 0.05 in "
                f"{sum(r['clean_attack_success'] > 0.05 for r in floor)} of {len(floor)} cells (largest "
                f"{worst['clean_attack_success']:.4f}, {worst['cell']})"
                + ("; where a repair left more than 0.05: " + ", ".join(after) if after else "")
            )
        lines.append(f"trigger search per model: median {np.median([r['cleanse_s'] for r in planted]):.1f} s")
    if "searches" in rows[0]:  # several searches: those twml cleanse runs before the verdict is decided
        counts = np.bincount([r["searches"] for r in rows])
        lines.append(
            f"searches run per model: mean {np.mean([r['searches'] for r in rows]):.2f}, mean time "
            f"{np.mean([r['cleanse_s'] for r in rows]):.1f} s ("
            + ", ".join(f"{n} on {k} models" for n, k in enumerate(counts) if k)
            + ")"
        )
    if clean:
        flagged = [r for r in clean if r["flagged"]]
        lines.append(
            f"clean models: {len(clean)}; any class flagged: {len(flagged)} ({100 * len(flagged) / len(clean):.1f}%); "
            f"largest index median {np.median([r['largest_index'] for r in clean]):.2f}, max "
            f"{max(r['largest_index'] for r in clean):.2f}"
        )
    return lines


def bound(rows: list[dict], threshold: float) -> list[str]:
    """What a better search for the target alone could reach on these models: the paper's MAD test
    rerun with the target's norm put to the planted mask's L1 norm (a search that finds exactly the
    planted trigger), then to 0, the other nine classes' norms as searched."""
    from twml_cli.cleanse import mad_outlier_test

    planted = [r for r in rows if r["position"] is not None]
    if not planted:
        return []
    counts = []
    for at_zero in (False, True):
        detected = second = 0
        for r in planted:
            norms = np.array(r["norms"], dtype=float)
            norms[r["target"]] = 0.0 if at_zero else planted_norm(r["size"], r["position"])
            flagged = mad_outlier_test(norms, threshold).flagged
            detected += bool(flagged[r["target"]]) and flagged.sum() == 1
            second += bool(flagged.sum() - flagged[r["target"]])
        counts.append(f"{detected} ({100 * detected / len(planted):.1f}%), a second class in {second}")
    return [
        f"with the target's norm put to the planted mask's (a search that finds exactly the planted trigger), "
        f"the other classes' as searched: detected {counts[0]}; put to 0: detected {counts[1]}"
    ]


MISSES = {  # why a planted cell was missed (see misses), and how the summary says it
    "second class": "another class flagged",
    "MAD": "under the threshold even at the planted norm",
    "unreachable": "the planted trigger short of the search's threshold, and nothing as small found",
    "search": "the search's (at the planted norm, which the planted trigger reaches, it would be flagged)",
}


def reachable(each: list[dict], agree: int, success: float) -> bool:
    """Whether a trigger as small as the planted one was within reach of enough of a cell's
    searches (`agree`): the planted trigger reaches a search's threshold `success` on its own images
    (`planted_search_success`), or the search found a trigger no larger that does (`target_reached`:
    the target's mask reached the threshold; else its norm is the last mask's)."""
    found = [r["planted_search_success"] >= success or (r["norm_ratio"] <= 1 and r["target_reached"]) for r in each]
    return sum(found) >= agree


def misses(runs: list[list[dict]], rows: list[dict], agree: int, success: float, anomaly: float) -> list[dict]:
    """Why each missed planted cell was missed (MISSES), the first that holds: the verdict flags
    another class; the paper's MAD test (threshold `anomaly`), rerun with the target's norm put to
    the planted mask's in every search and the other classes' as searched, still flags it in fewer
    than `agree` searches; no trigger as small as the planted one was within reach of enough
    searches (`reachable`); or else the search, which missed a trigger that would have been flagged."""
    from twml_cli.cleanse import mad_outlier_test

    out = []
    for row, each in zip(rows, zip(*runs)):
        if row["position"] is None or row["detected"]:
            continue
        t, norm = row["target"], planted_norm(row["size"], row["position"])
        at_planted = 0
        for r in each:
            norms = np.array(r["norms"], dtype=float)
            norms[t] = norm
            at_planted += bool(mad_outlier_test(norms, anomaly).flagged[t])
        if set(row["flagged"]) - {t}:
            why = "second class"
        elif at_planted < agree:
            why = "MAD"
        elif not reachable(each, agree, success):
            why = "unreachable"
        else:
            why = "search"
        out.append(
            {
                "cell": row["cell"],
                "why": why,
                "planted_success": [r["planted_search_success"] for r in each],
                "index": [r["target_index"] for r in each],
                "ratio": [r["norm_ratio"] for r in each],
                "flagged": row["flagged"],
            }
        )
    return out


def why_missed(runs: list[list[dict]], rows: list[dict], agree: int, success: float, anomaly: float) -> list[str]:
    """The summary line and the table of `misses`."""
    missed = misses(runs, rows, agree, success, anomaly)
    if not missed:
        return []
    planted = sum(r["position"] is not None for r in rows)
    lines = [
        f"missed: {len(missed)} of {planted}; "
        + "; ".join(f"{text}: {sum(m['why'] == k for m in missed)}" for k, text in MISSES.items()),
        "",
        "| cell | why | planted trigger's success on each search's images | target's index in each search | "
        "reversed / planted norm in each search | flagged |",
        "|---|---|---|---|---|---|",
    ]
    for m in missed:
        lines.append(
            f"| {m['cell']} | {m['why']} | {', '.join(f'{s:.4f}' for s in m['planted_success'])} | "
            f"{', '.join(f'{v:.2f}' for v in m['index'])} | {', '.join(f'{v:.2f}' for v in m['ratio'])} | "
            f"{m['flagged'] or '-'} |"
        )
    return lines


def breakdown(rows: list[dict]) -> list[str]:
    """One row per trigger (position and size) over its targets and seeds: how often detected,
    the medians of attack success, the target's index and the norm ratio."""
    head = [
        "| position | size | detected | a second class flagged | attack success (median) | target's index (median, "
        "lowest) | reversed / planted norm (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    body = []
    planted = [r for r in rows if r["position"] is not None]
    for size in sorted({r["size"] for r in planted}):
        for position in dict.fromkeys(r["position"] for r in planted):
            group = [r for r in planted if r["position"] == position and r["size"] == size]
            if not group:
                continue
            found = sum(r["detected"] for r in group)
            second = sum(bool(set(r["flagged"]) - {r["target"]}) for r in group)
            index = [r["target_index"] for r in group]
            body.append(
                f"| {position} | {size}x{size} | {found}/{len(group)} | {second} | "
                f"{np.median([r['attack_success'] for r in group]):.3f} | "
                f"{np.median(index):.2f}, {min(index):.2f} | {np.median([r['norm_ratio'] for r in group]):.2f} |"
            )
    return head + body


def table(rows: list[dict]) -> list[str]:
    head = [
        "| seed | position | target | size | attack success | accuracy | detected | flagged | target's index | "
        "reversed / planted norm | search s | after unlearning: attack success | accuracy change | "
        "the clean model's attack success |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    body = []
    for r in sorted(
        rows, key=lambda r: (r["position"] is None, r["position"] or "", r["size"], r["target"], r["seed"])
    ):
        if r["position"] is None:
            body.append(
                f"| {r['seed']} | clean | | | | {r['accuracy']:.4f} | | {r['flagged'] or '-'} | largest "
                f"{r['largest_index']:.2f} | | {r['cleanse_s']} | | | |"
            )
            continue
        repair = (
            f"{r['repair_attack_success']:.4f} | {r['repair_accuracy_change']:+.4f}"
            if "repair_attack_success" in r
            else " | "
        )
        body.append(
            f"| {r['seed']} | {r['position']} | {r['target']} | {r['size']}x{r['size']} | {r['attack_success']:.4f} | "
            f"{r['accuracy']:.4f} | "
            f"{'yes' if r['detected'] else 'NO'} | {r['flagged'] or '-'} | {r['target_index']:.2f} | "
            f"{r['norm_ratio']:.2f} | {r['cleanse_s']} | {repair} | "
            + (f"{r['clean_attack_success']:.4f} |" if "clean_attack_success" in r else " |")
        )
    return head + body


def agreement(runs: list[list[dict]], agree: int) -> list[dict]:
    """One row per cell from several independent searches of it: a class is flagged when at least
    `agree` searches flag it; the target's index and the norm ratio are their medians, with the
    lowest and highest index kept. The time, the stamped images and `searches` are those of the
    searches twml cleanse runs: in order, until no further one could change the verdict."""
    from twml_cli.studies.cleanse import searches_run

    rows = []
    for each in zip(*runs):
        classes = len(each[0]["norms"])
        flags = [np.isin(np.arange(classes), r["flagged"]) for r in each]
        run = searches_run(flags, agree)
        votes = np.bincount([c for r in each for c in r["flagged"]], minlength=classes)
        row = {
            **each[0],
            "flagged": [int(c) for c in np.flatnonzero(votes >= agree)],
            "largest_index": float(np.median([r["largest_index"] for r in each])),
            "cleanse_s": round(sum(r["cleanse_s"] for r in each[:run]), 1),
            "search_images": sum(r.get("search_images", 0) for r in each[:run]),
            "searches": run,
        }
        if row["position"] is not None:
            index = [r["target_index"] for r in each]
            row.update(
                detected=row["flagged"] == [row["target"]],
                target_index=float(np.median(index)),
                target_index_range=[min(index), max(index)],
                norm_ratio=float(np.median([r["norm_ratio"] for r in each])),
            )
        rows.append(row)
    return rows


def pooled(runs: list[list[dict]], how: str) -> list[dict]:
    """One row per cell from several independent searches of it, their norms pooled class by class
    (`how`: "min", the smallest trigger any search found, or "mean") and the paper's MAD test run
    once on the pooled norms."""
    from twml_cli.cleanse import mad_outlier_test

    rows = []
    for each in zip(*runs):
        norms = getattr(np, how)([r["norms"] for r in each], axis=0)
        test = mad_outlier_test(norms)
        row = {
            **each[0],
            "flagged": [int(c) for c in np.flatnonzero(test.flagged)],
            "largest_index": float(np.where(test.below, test.anomaly_index, 0.0).max()),  # below the median only
            "norms": [round(float(v), 3) for v in norms],
            "cleanse_s": round(sum(r["cleanse_s"] for r in each), 1),
            "searches": len(each),
        }
        if row["position"] is not None:
            t = row["target"]
            row.update(
                detected=row["flagged"] == [t],
                target_index=float(test.anomaly_index[t]),
                norm_ratio=float(norms[t]) / planted_norm(row["size"], row["position"]),
            )
        rows.append(row)
    return rows


def bf16_on_cpu() -> None:
    """(In a worker.) The trigger search's forward passes in bf16 autocast on a CPU too, as
    runtime.autocast runs them on CUDA: what a GPU's precision does to the verdicts, measured on
    the CPU's models."""
    import torch

    from twml_cli import cleanse

    cleanse.autocast = lambda device: torch.autocast(device.type, dtype=torch.bfloat16)


def _run(log: Path, todo: dict, jobs: int, submit, what: str, initializer=None) -> dict:
    """Results by key: those `log` holds, and the rest computed (`submit(pool, cell, key)`, in
    processes started with `initializer`) and appended to it as they finish."""
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            done[entry["key"]] = entry["row"]
    left = {k: c for k, c in todo.items() if k not in done}
    print(f"{len(todo)} to do, {len(todo) - len(left)} already in {log}; {what}", flush=True)
    began = time.perf_counter()
    with ProcessPoolExecutor(jobs, initializer=initializer) as pool, log.open("a") as sink:
        futures = {submit(pool, c, k): k for k, c in left.items()}
        for n, future in enumerate(as_completed(futures), 1):
            k, row = futures[future], future.result()
            done[k] = row
            sink.write(json.dumps({"key": k, "row": row}) + "\n")
            sink.flush()
            print(f"[{n}/{len(left)}, {time.perf_counter() - began:.0f} s] {json.dumps(row)}", flush=True)
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--positions", default=",".join(POSITIONS), help="comma-separated, or 'none' for clean models only"
    )
    parser.add_argument("--targets", default="0,3,7")
    parser.add_argument("--sizes", default="1,2")
    parser.add_argument("--seeds", default="0-4", help="training seeds of the planted cells")
    parser.add_argument("--clean-seeds", default=None, help="seeds of the clean models (default: --seeds)")
    parser.add_argument("--cells", default=None, help="a slice START:STOP of the planted cells, in matrix order")
    parser.add_argument("--jobs", type=int, default=1, help="cells at a time, each in its own process")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per job (default: cores / jobs)")
    parser.add_argument(
        "--model-threads", type=int, default=None, help="the threads the models are trained with (default: --threads)"
    )
    parser.add_argument(
        "--search", default=None, help="trigger-search settings as JSON, e.g. '{\"search_restarts\": 1}'"
    )
    parser.add_argument(
        "--search-seeds",
        default=None,
        help="offsets added to the training seed to seed the search (its clean images and starts); several: "
        "independent searches per model, and the verdict of --agree of them (default: as twml cleanse, the "
        "preset's searches, 0,1000 on the digits)",
    )
    parser.add_argument(
        "--agree",
        type=int,
        default=None,
        help="with several search seeds: a class is flagged when at least this "
        "many searches flag it (default: as the preset's agreement, both of two on the digits)",
    )
    parser.add_argument(
        "--pool",
        choices=("min", "mean"),
        help="with several search seeds: instead of a vote, one MAD test on each class's smallest (min) or "
        "mean norm over the searches",
    )
    parser.add_argument(
        "--mitigate",
        action="store_true",
        help='repair every detected cell (unlearning, or --unlearn \'{"mitigation": "prune"}\' or "filter")',
    )
    parser.add_argument("--unlearn", default=None, help="mitigate settings as JSON, e.g. '{\"unlearn_lr\": 0.002}'")
    parser.add_argument(
        "--first-trigger",
        action="store_true",
        help="repair with the first search's reversed trigger alone (twml mitigate stamps every search's)",
    )
    parser.add_argument(
        "--renormalize",
        action="store_true",
        help="also measure each repair after its BatchNorm statistics are estimated again on the clean training images",
    )
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="also run twml cleanse (the --search settings) on every repaired model: is the target still flagged?",
    )
    parser.add_argument(
        "--planted-trigger",
        action="store_true",
        help="a control: repair every detected cell with its planted trigger, not the reversed ones",
    )
    parser.add_argument(
        "--unlearn-seed",
        type=int,
        default=0,
        help="an offset added to the training seed to seed unlearning (which images are stamped, and their order)",
    )
    parser.add_argument(
        "--dataset",
        default=DATASET,
        type=dataset_arg,
        help="the embedded 8x8 digits, the same images at 16x16, or an .npz file with x_train, y_train, "
        "x_test, y_test (models kept apart in --out)",
    )
    parser.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="on a CPU, run the trigger search's forward passes in bf16 autocast, as twml does on CUDA "
        "(kept apart in --out)",
    )
    parser.add_argument("--train-only", action="store_true", help="only train (and keep) the models")
    parser.add_argument("--out", default="benchmark-logs/cleanse-matrix")
    args = parser.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    model_threads = args.model_threads or threads
    search = json.loads(args.search) if args.search else {}
    verdict = dict(search)  # the whole search, several searches and their agreement too (for --recheck)
    unlearn = json.loads(args.unlearn) if args.unlearn else {}
    if unlearn.get("mitigation") == "filter" and (args.renormalize or args.recheck):  # before any work
        parser.error("a filter leaves the model as it was: --renormalize and --recheck repair nothing to check")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    positions = [] if args.positions == "none" else args.positions.split(",")
    planted = [
        Cell(seed, p, t, size)
        for p, size, t, seed in itertools.product(
            positions, parse_ints(args.sizes), parse_ints(args.targets), parse_ints(args.seeds)
        )
    ]
    if args.cells:
        start, stop = (int(v) if v else None for v in args.cells.split(":"))
        planted = planted[start:stop]
    clean = [Cell(seed) for seed in parse_ints(args.clean_seeds if args.clean_seeds is not None else args.seeds)]
    cells = clean + planted

    if args.train_only:
        with ProcessPoolExecutor(args.jobs) as pool:
            for k, future in enumerate(
                as_completed([pool.submit(train_cell, out, c, model_threads, args.dataset) for c in cells]), 1
            ):
                print(f"[{k}/{len(cells)}] {json.dumps(future.result())}", flush=True)
        return 0
    from twml_cli.studies.cleanse import SEARCH_SEED_STRIDE

    preset = _settings("cleanse", dataset=args.dataset, **search)
    search.pop("searches", None)
    search.pop("agreement", None)
    searched = _resolved("cleanse", dataset=args.dataset, **search, searches=1)  # each search's own settings
    offsets = (
        parse_ints(args.search_seeds)
        if args.search_seeds is not None
        else [SEARCH_SEED_STRIDE * i for i in range(preset.searches)]
    )
    agree = args.agree or dataclasses.replace(preset, searches=len(offsets)).votes_needed
    runs = []  # per search seed: the cells' keys and rows
    for offset in offsets:
        keyed = (searched, offset) if offset else (searched,)  # offset 0: the keys single searches always had
        keyed += ("cpu-bf16",) if args.cpu_bf16 else ()
        keyed += (_data_kind(args.dataset),) if args.dataset.endswith(".npz") else ()  # the file's bytes
        search_key = {
            c: key(c.name, threads, *keyed) if model_threads == threads else key(c.name, threads, model_threads, *keyed)
            for c in cells
        }
        done = _run(
            out / "cells.jsonl",
            {search_key[c]: c for c in cells},
            args.jobs,
            lambda pool, c, k, offset=offset: pool.submit(
                run_cell, out, c, threads, search, k, model_threads, offset, args.dataset
            ),
            f"{args.jobs} job(s) of {threads} thread(s), models trained with {model_threads}; search "
            f"{search or 'as the preset'}{' in bf16' if args.cpu_bf16 else ''}, "
            f"seeded with the training seed + {offset}",
            bf16_on_cpu if args.cpu_bf16 else None,
        )
        runs.append((search_key, [done[search_key[c]] for c in cells]))
    search_key, rows = runs[0]
    if len(runs) > 1:
        for offset, (_, each) in zip(offsets, runs):
            print(f"search seed = training seed + {offset}: " + "; ".join(summary(each)[:1]))
        searches = [r for _, r in runs]
        rows = pooled(searches, args.pool) if args.pool else agreement(searches, agree)
    repair = "unlearning"
    if args.mitigate:
        unlearned = _resolved("mitigate", dataset=args.dataset, **unlearn)
        repair = {"prune": "pruning", "filter": "filtering"}.get(unlearned["mitigation"], repair)
        if args.unlearn_seed:  # offset 0: the keys repairs always had
            unlearned = {**unlearned, "seed_offset": args.unlearn_seed}
        names = {  # the triggers of the searches twml cleanse runs, which twml mitigate stamps in turn
            c: [keys[c] for keys, _ in runs][: 1 if args.first_trigger else r.get("searches")]
            for c, r in zip(cells, rows)
        }
        if args.planted_trigger:
            names = {c: n[:1] for c, n in names.items()}  # its shape only
            unlearned = {**unlearned, "trigger": "planted"}
        if args.renormalize:
            unlearned = {**unlearned, "renormalize": True}
        if args.recheck:
            unlearned = {**unlearned, "recheck": _resolved("cleanse", dataset=args.dataset, **verdict)}
        repair_key = {c: key(*names[c], unlearned) for c in cells}  # one search: the keys repairs always had
        repairs = _run(
            out / "repairs.jsonl",
            {repair_key[c]: c for c, r in zip(cells, rows) if r.get("detected")},
            args.jobs,
            lambda pool, c, k: pool.submit(
                repair_cell,
                out,
                c,
                threads,
                names[c],
                unlearn,
                model_threads,
                args.unlearn_seed,
                args.dataset,
                args.planted_trigger,
                args.renormalize,
                verdict if args.recheck else None,
            ),
            f"{repair} {unlearn or 'as the preset'}",
        )
        rows = [{**r, **repairs.get(repair_key[c], {})} for c, r in zip(cells, rows)]
    floor = clean_success(out, cells, threads, model_threads, args.dataset)
    rows = [{**r, "clean_attack_success": floor[c]} if c in floor else r for c, r in zip(cells, rows)]
    lines = summary(rows, repair)
    if len(runs) == 1 or args.pool:  # the norms the verdict was computed on
        lines += bound(rows, searched["anomaly_threshold"])
    why = []
    if not args.pool:  # why each missed cell was missed, by each search's norms
        searches = [r for _, r in runs]
        for offset, (keys, each) in zip(offsets, runs):
            for c, r in zip(cells, each):
                if c.position is not None and "planted_search_success" not in r:  # searched before rows kept it
                    r["planted_search_success"] = planted_success(
                        out, c, threads, model_threads, search, offset, args.dataset
                    )
                    with np.load(out / "triggers" / f"{keys[c]}.npz", allow_pickle=False) as z:
                        r["target_reached"] = bool(np.isfinite(z["start_norms"][c.target]).any())
        why = why_missed(searches, rows, agree, searched["search_threshold"], searched["anomaly_threshold"])
        lines += why[:1]
        shares: dict[Cell, list[float]] = {}
        for keys, _ in runs:
            for c in cells:
                if c.position is not None:
                    with np.load(out / "triggers" / f"{keys[c]}.npz", allow_pickle=False) as z:
                        shares.setdefault(c, []).append(planted_share(z["masks"][c.target], c))
        lines += where_found(shares, rows)
    print("\n".join(lines))
    (out / "matrix.md").write_text(
        "\n".join(
            [
                f"{args.dataset}; search: {search or 'as the preset'}; {threads} thread(s) per job",
                "",
                *lines,
                "",
                *breakdown(rows),
                "",
                *why[2:],
                "",
                *table(rows),
            ]
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
