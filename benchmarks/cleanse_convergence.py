"""Where Neural Cleanse's trigger search loses: run every class of a model from many random
starts, each to the authors' convergence rule, record every start's smallest successful mask
after every round, and read off what any schedule of those starts would have found.

    python benchmarks/cleanse_convergence.py --models benchmark-logs/cleanse-matrix/models/threads1 \\
        --cells seed2-clean,seed4-top-right-t0-s2 --starts 8 --rounds 150
    python benchmarks/cleanse_convergence.py --models benchmark-logs/cleanse-matrix/models/threads1 \\
        --cells all --starts 4 --rounds 50 --jobs 2        # every model of the matrix: about 50 minutes on 2 cores

A schedule R/B/T is: R starts per class, each class going on from its best start after B rounds
(0: all starts to the end), T rounds in all; 1/0/40 is each of the digits default's two searches,
4/10/40 the single search it had before. The starts are
independent rows of one batch (Adam is elementwise, the losses separate, the image order shared),
so a start's trajectory is the same whether the others run or not, and the replay gives what the
search itself would (on a CPU, equal to every digit: compare a schedule with a `twml cleanse
--searches 1` of the model). Models are those of benchmarks/cleanse_matrix.py
(its --out/models/threads1/<cell>); trajectories are cached in --out as one JSON line per model
and settings. Each model's search is seeded with its training seed plus --seed-offset, as
cleanse_matrix.py --search-seeds seeds it. With --searches N, each schedule is replayed as N
independent searches that must all flag a class, as `twml cleanse --searches N --agreement all`
votes (each run only while it could change the verdict): from the
traces of seed offsets 0, 1000, ... (added to --seed-offset), which earlier runs with --seed-offset
must have recorded.

    python benchmarks/cleanse_convergence.py ... --seed-offset 1000    # the second search's traces
    python benchmarks/cleanse_convergence.py ... --searches 2 --schedules 1/0/40,4/10/40
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np

SCHEDULES = "4/10/40,1/0/60,8/5/40,4/10/60,4/30/150,8/30/150,8/0/150"


def record(folder: Path, seed: int, starts: int, rounds: int, overrides: dict) -> dict:
    """Every row's best norm after every round, and the rounds it ran, for one model."""
    import torch

    from twml_cli import cleanse, config
    from twml_cli.studies import cleanse as study

    torch.set_num_threads(1)
    s = config.resolve_one(
        "cleanse", config.load_preset(), {"seed": seed, "model_runs": [str(folder)], "dataset": "digits", **overrides}
    )
    inputs = study.prepare(s)
    search = dataclasses.replace(s.cleanse_config(), restarts=starts, steps=rounds, keep_best_after=0)
    best, success, ran = [], [], []
    began = time.perf_counter()
    model = inputs.models[0]
    cleanse.reverse_engineer(
        model,
        inputs.x_clean,
        model.spec.num_classes,
        search,
        on_round=lambda step, norms, rate, rows: (
            best.append(norms.tolist()),
            success.append(rate.round(6).tolist()),
            ran.append(rows.tolist()),
        ),
    )
    return {"best": best, "success": success, "rounds": ran, "seconds": round(time.perf_counter() - began, 1)}


def replay(trace: dict, starts: int, r: int, b: int, t: int) -> tuple[np.ndarray, int]:
    """Per class, the norm schedule r/b/t would have kept, and the row-rounds it would have cost:
    the search's own choice of the best start (its smallest successful mask, else its most
    successful), from the first r starts."""
    from twml_cli.cleanse import _all_but_best

    best = np.array(trace["best"], dtype=float).reshape(len(trace["best"]), -1, starts)  # (rounds, K, starts)
    rate = np.array(trace["success"]).reshape(best.shape)
    ran = np.array(trace["rounds"]).reshape(len(trace["rounds"]), -1, starts)
    active = np.diff(np.concatenate([np.zeros_like(ran[:1]), ran]), axis=0) > 0
    last = len(best)

    def at(j: int, values: np.ndarray = best) -> np.ndarray:
        return values[min(j, last) - 1]

    norms, cost = np.zeros(best.shape[1]), 0
    for c in range(best.shape[1]):
        if b and r > 1 and b < t:
            keep = int(np.flatnonzero(~_all_but_best(at(b)[c, :r], at(b, rate)[c, :r], r))[0])
            cost += int(active[:b, c, :r].sum() + active[b:t, c, keep].sum())
            norms[c] = at(t)[c, keep]
        else:
            cost += int(active[:t, c, :r].sum())
            norms[c] = at(t)[c, :r].min()
    return norms, cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="a folder of model folders named as cleanse_matrix's cells")
    parser.add_argument(
        "--cells", required=True, help="comma-separated cell names, e.g. seed0-bottom-right-t0-s1, or all of --models"
    )
    parser.add_argument("--starts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--schedules", default=SCHEDULES, help="R/B/T,... (R <= --starts, T <= --rounds)")
    parser.add_argument("--search", default=None, help="other search settings as JSON, e.g. '{\"init_cost\": 0.003}'")
    parser.add_argument(
        "--seed-offset", type=int, default=0, help="added to each model's training seed to seed its search"
    )
    parser.add_argument("--jobs", type=int, default=1, help="models searched at a time, one thread each")
    parser.add_argument(
        "--searches",
        type=int,
        default=1,
        help="replay each schedule as this many searches (seed offsets 0, 1000, ...) that must all flag a class",
    )
    parser.add_argument("--out", default="benchmark-logs/cleanse-convergence")
    args = parser.parse_args()
    from twml_cli.cleanse import mad_outlier_test
    from twml_cli.studies.cleanse import SEARCH_SEED_STRIDE, Inspection, Search, searches_run

    overrides = json.loads(args.search) if args.search else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "traces.jsonl"
    traces = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            traces[entry["key"]] = entry["trace"]
    cells = (
        sorted(p.name for p in Path(args.models).iterdir() if p.is_dir())
        if args.cells == "all"
        else args.cells.split(",")
    )

    def key(cell: str, offset: int = args.seed_offset) -> str:  # offset 0: the keys traces always had
        return json.dumps([cell, args.starts, args.rounds, overrides, *([offset] if offset else [])], sort_keys=True)

    left = [c for c in cells if key(c) not in traces]
    seeds = [int(re.match(r"seed(\d+)", c).group(1)) + args.seed_offset for c in left]
    pool = ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    with pool or contextlib.nullcontext(), log.open("a") as sink:
        run = pool.map if pool else map  # one job: in this process
        folders = [Path(args.models) / c for c in left]
        for c, trace in zip(
            left, run(record, folders, seeds, *(repeat(v) for v in (args.starts, args.rounds, overrides)))
        ):
            traces[key(c)] = trace
            sink.write(json.dumps({"key": key(c), "trace": trace}) + "\n")
            sink.flush()
            print(f"{c}: {trace['seconds']} s", flush=True)
    offsets = [args.seed_offset + SEARCH_SEED_STRIDE * i for i in range(args.searches)]
    missing = [o for o in offsets if any(key(c, o) not in traces for c in cells)]
    if missing:
        raise SystemExit(f"--searches {args.searches}: first trace these models with --seed-offset {missing[0]}")
    traced = {c: [traces[key(c, o)] for o in offsets] for c in cells}
    default_cost = np.mean([replay(tr[0], args.starts, 4, 10, 40)[1] for tr in traced.values()])
    print(
        "| schedule | planted detected | a second class flagged | target's index (median) "
        "| reversed / planted (median) | clean models flagged | clean: largest index "
        "| stamped images, against one 4/10/40 search |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for schedule in args.schedules.split(","):
        r, b, t = (int(v) for v in schedule.split("/"))
        found, planted, second, index, ratio, clean, accused, cost = 0, 0, 0, [], [], [], 0, []
        for cell, each in traced.items():
            replayed = [replay(trace, args.starts, r, b, t) for trace in each]
            tests = [mad_outlier_test(norms) for norms, _ in replayed]
            # twml cleanse's own vote: a class is flagged when every search flags it, the searches run in
            # turn until no further one could change the verdict
            n = searches_run([t.flagged for t in tests], len(tests))
            cost.append(sum(rows for _, rows in replayed[:n]))
            first, *more = tests[:n]
            voted = Inspection(cell, 0.0, None, first, 0.0, [Search(None, s) for s in more], len(tests))
            signed, flagged = voted.agreed_index, np.flatnonzero(voted.flagged).tolist()
            norms = replayed[0][0]  # the first search's, as twml cleanse reports them
            m = re.search(r"-t(\d+)-s(\d+)", cell)
            if m:
                target, size = int(m.group(1)), int(m.group(2))
                planted += 1
                found += flagged == [target]
                second += any(c != target for c in flagged)
                index.append(abs(signed[target]))  # one search: its anomaly index
                ratio.append(norms[target] / size**2)
            else:
                accused += bool(flagged)
                clean.append(f"{max(signed.max(), 0.0):.2f}{' flagged' if flagged else ''}")
        print(
            f"| {schedule} | {found} / {planted} | {second} | {np.median(index) if index else float('nan'):.2f} | "
            f"{np.median(ratio) if ratio else float('nan'):.2f} | {accused} / {len(clean)} | "
            f"{', '.join(clean) if 0 < len(clean) <= 5 else ''} | {np.mean(cost) / default_cost:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
