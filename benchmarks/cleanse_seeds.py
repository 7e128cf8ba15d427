"""Neural Cleanse's verdict over training seeds: for each seed, a clean and a BadNets model trained
on the same data, then the trigger search on both. Counts the seeds where the backdoored model's
target is flagged and the seeds where any class of the clean model is flagged, with every
anomaly index, through each study's compute() (no MLflow).

    python benchmarks/cleanse_seeds.py                          # study 3's default, seeds 0-9
    python benchmarks/cleanse_seeds.py --dataset digits --seeds 5
    python benchmarks/cleanse_seeds.py --target 3 --position top-left --trigger-size 3

Prints one JSON line per seed and a summary line; exits 1 when fewer than --need seeds pass
either count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from twml_cli import config
from twml_cli.models import save_model
from twml_cli.studies import backdoor, cleanse, train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("--dataset", default=None, help="(default: the preset's study-3 data set)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--target", type=int, default=None)
    parser.add_argument("--position", default=None)
    parser.add_argument("--trigger-size", type=int, default=None)
    parser.add_argument("--stem", default=None, help="the models' stem (auto, small, timm)")
    parser.add_argument("--search-steps", type=int, default=None)
    parser.add_argument("--search-images", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--cost-multiplier", type=float, default=None)
    parser.add_argument("--init-cost", type=float, default=None)
    parser.add_argument("--need", type=int, default=9, help="seeds out of --seeds each count must reach")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmark-logs/cleanse-seeds")
    args = parser.parse_args()
    preset = config.load_preset(args.preset)
    common = {k: v for k, v in {"dataset": args.dataset, "device": args.device}.items() if v is not None}
    arch = {"stem": args.stem} if args.stem else {}
    poison = {
        k: v
        for k, v in {"target": args.target, "position": args.position, "trigger_size": args.trigger_size}.items()
        if v is not None
    }
    search = {
        k: v
        for k, v in {
            "search_steps": args.search_steps,
            "search_images": args.search_images,
            "patience": args.patience,
            "cost_multiplier": args.cost_multiplier,
            "init_cost": args.init_cost,
        }.items()
        if v is not None
    }
    detected = clean_ok = 0
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        began = time.perf_counter()
        bad_settings = config.resolve_one("backdoor", preset, {**common, **arch, **poison, "seed": seed})
        same = {
            k: getattr(bad_settings, k) for k in ("dataset", "model", "stem", "epochs")
        }  # the clean model: same data, model, budget
        clean = train.compute(
            train.prepare(config.resolve_one("train", preset, {**common, **same, "seed": seed, "pgd_steps": 1}))
        )
        poisoned = backdoor.compute(backdoor.prepare(bad_settings))
        folder = Path(args.out) / f"seed{seed}"
        paths = [
            str(save_model(m, folder / name)) for name, m in (("clean", clean.model), ("backdoor", poisoned.model))
        ]
        s = config.resolve_one(
            "cleanse",
            preset,
            {**common, **search, "seed": seed, "model_runs": paths, "dataset": poisoned.settings.dataset},
        )
        outcome = cleanse.compute(cleanse.prepare(s))
        target = poisoned.settings.target
        clean_ins, bad_ins = outcome.inspections
        row = {
            "seed": seed,
            "clean_accuracy": round(clean.robustness.accuracy, 4),
            "backdoor_accuracy": round(poisoned.accuracy, 4),
            "attack_success": round(poisoned.attack_success_rate, 4),
            # the verdict of all the searches (one: the paper's test), and the index they agree on
            "target_index": round(abs(float(bad_ins.agreed_index[target])), 2),
            "target_norm": round(float(bad_ins.reversed.norms[target]), 2),
            "target_flagged": bool(bad_ins.flagged[target]),
            "backdoor_flagged": [int(c) for c in np.flatnonzero(bad_ins.flagged)],
            "clean_max_index": round(clean_ins.anomaly_index, 2),
            "clean_flagged": [int(c) for c in np.flatnonzero(clean_ins.flagged)],
            "clean_norms": [round(float(v), 1) for v in clean_ins.reversed.norms],
            "backdoor_norms": [round(float(v), 1) for v in bad_ins.reversed.norms],
            "seconds": round(time.perf_counter() - began, 1),
        }
        detected += row["target_flagged"]
        clean_ok += not row["clean_flagged"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    n = len(rows)
    print(
        f"target flagged in {detected} of {n} seeds; clean model unflagged in {clean_ok} of {n}; "
        f"target index median {np.median([r['target_index'] for r in rows]):.2f} (min "
        f"{min(r['target_index'] for r in rows):.2f}); "
        f"clean max index median {np.median([r['clean_max_index'] for r in rows]):.2f} (max "
        f"{max(r['clean_max_index'] for r in rows):.2f})"
    )
    return 0 if detected >= args.need * n / 10 and clean_ok >= args.need * n / 10 else 1


if __name__ == "__main__":
    sys.exit(main())
