"""CPU threads: how fast twml's work runs with 1 thread, with 2 that spin while they wait
(OpenMP's active wait policy; PyTorch's default spins too, 300,000 times before it sleeps),
with 2 that sleep instead of spinning while they wait (OpenMP's passive wait policy), with 2
that spin a while and then sleep (GNU OpenMP's spin count) and with twml's own choice, on a
quiet machine and with a second twml beside it (configured alike).

    python benchmarks/threads.py                    # training, PGD, certification, trigger search (minutes)
    python benchmarks/threads.py --reproduce        # also `twml reproduce` (about 3 minutes a run)
    python benchmarks/threads.py --cases certification --settings "1 thread,twml's choice"

Each measurement runs in a fresh process (OpenMP reads its settings when it starts). The
second twml is `twml train` with a large budget, in its own folder, started first and killed
after. `--repeat K` goes round the settings K times and the table shows each median and range
(a shared machine drifts: round-robin puts the drift on every setting alike). Prints one JSON
line per measurement and the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE_BATCH = "TWML_BENCH_ONE_BATCH"  # the worker runs certification's batches one at a time (no forward_pool)
CASES = ("train", "pgd", "certification", "search")
SETTINGS = {  # name: environment of every twml process (the measured one and the one beside it)
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "2 threads passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    # certification's noisy batches one at a time, each split over both threads (twml runs two at once)
    "2 threads passive one batch at a time": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", ONE_BATCH: "1"},
    "twml's choice": {"OMP_WAIT_POLICY": "PASSIVE"},  # what twml's CLI sets unless told otherwise
    # GNU OpenMP's middle ground: spin this many times, then sleep (unset, it spins 300,000 times)
    "2 threads spin 10000": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"},
    "2 threads spin 100000": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "100000"},
}
CLEAN = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "TWML_THREADS", ONE_BATCH)


def env(extra: dict) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in CLEAN}
    return {**base, **extra, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def worker() -> None:
    """Train the default model, attack it with PGD-10, certify it (n = 1,000, 360 images), run the
    trigger search on it: seconds each, each phase with the threads twml's runner plans for it."""
    import dataclasses

    from twml_cli import config, runtime, smoothing
    from twml_cli.models import save_model
    from twml_cli.studies import cleanse, runner, train

    if os.environ.get(ONE_BATCH):
        runtime.forward_pool = lambda fn, items, device, parallel=True: map(fn, items)  # type: ignore[assignment]
    cases = os.environ.get("TWML_BENCH_CASES", ",".join(CASES)).split(",")

    s = dataclasses.replace(config.resolve_one("train", config.load_preset()), device="cpu")
    inputs = train.prepare(s)
    planned = runner.thread_plan("train", inputs)
    with runtime.planned_threads(*planned):
        outcome = train.compute(inputs)
    test = inputs.data.test
    smoothed = smoothing.Smooth(outcome.model, 10, 0.25, seed=0)
    certifying = runtime.choose_threads(0, 2000 * 64)[0]  # 2,000 noisy 8x8 images a pass
    with runtime.planned_threads(certifying, certifying):
        began = time.perf_counter()
        smoothing.certify_dataset(smoothed, test, list(range(len(test))), 100, 1000, 0.001, 2000)
        certify_s = time.perf_counter() - began
    search_s, searching = None, (0, 0)
    if "search" in cases:
        with tempfile.TemporaryDirectory() as folder:
            save_model(outcome.model, folder)
            searched = cleanse.prepare(
                dataclasses.replace(
                    config.resolve_one("cleanse", config.load_preset()), device="cpu", model_runs=[folder]
                )
            )
            searching = runner.thread_plan("cleanse", searched)
            with runtime.planned_threads(*searching):
                search_s = cleanse.compute(searched).inspections[0].seconds
    print(
        json.dumps(
            {
                "threads": [planned[0], planned[1], certifying, searching[1]],  # train, PGD, certify, search
                "train": outcome.training.train_time_s,
                "pgd": outcome.robustness.attack_time_s,
                "certification": certify_s,
                "search": search_s,
            }
        )
    )


def measure(extra: dict, reproduce: bool, limit: float, cases: str) -> dict:
    out = json.loads(
        subprocess.run(
            [sys.executable, __file__, "--worker"],
            env={**env(extra), "TWML_BENCH_CASES": cases},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]
    )
    if reproduce:
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            try:
                subprocess.run(
                    [sys.executable, "-m", "twml_cli", "reproduce"],
                    cwd=tmp,
                    env=env(extra),
                    capture_output=True,
                    check=True,
                    timeout=limit,
                )
                out["reproduce"] = time.perf_counter() - began
            except subprocess.TimeoutExpired:
                out["reproduce"] = float("inf")  # stopped at --limit
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reproduce", action="store_true")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    parser.add_argument("--loads", default="quiet,loaded", help="quiet, loaded (a second twml beside) or both")
    parser.add_argument("--limit", type=float, default=900, help="seconds a reproduce may take before it is stopped")
    parser.add_argument("--cases", default=",".join(CASES), help="what the worker times (it always trains)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the settings; the table shows the median")
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    results: dict[tuple[str, bool], list[dict]] = {}
    for _ in range(args.repeat):  # round-robin, so that a machine's drift falls on every setting alike
        for name in args.settings.split(","):
            for loaded in [w == "loaded" for w in args.loads.split(",")]:
                row = one(name, loaded, args)
                results.setdefault((name, loaded), []).append(row)
                print(json.dumps(row), flush=True)
    cases = args.cases.split(",") + (["reproduce"] if args.reproduce else [])
    names = args.settings.split(",")
    print("\n| case | " + " | ".join(f"{n}: quiet / beside another twml" for n in names) + " |")
    print("|---|" + "---|" * len(names))

    def cell(n: str, loaded: bool, case: str) -> str:
        values = sorted(row[case] for row in results.get((n, loaded), []) if row.get(case) is not None)
        if not values:
            return "-"
        middle = statistics.median(values)
        shown = [f"> {args.limit:.0f}" if v == float("inf") else f"{v:.2f}" for v in (middle, *values)]
        return f"{shown[0]} s" if len(values) == 1 else f"{shown[0]} s ({shown[1]} to {shown[-1]})"

    for case in cases:
        print(f"| {case} | " + " | ".join(f"{cell(n, False, case)} / {cell(n, True, case)}" for n in names) + " |")


def one(name: str, loaded: bool, args) -> dict:
    """One measurement of setting `name`, alone or with a second twml training beside it."""
    beside = None
    with tempfile.TemporaryDirectory() as tmp:
        if loaded:
            beside = subprocess.Popen(
                [sys.executable, "-m", "twml_cli", "train", "--epochs", "100000", "--checkpoint-every", "0"],
                cwd=tmp,
                env=env(SETTINGS[name]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(15)  # past its start-up, into training
        try:
            row = measure(SETTINGS[name], args.reproduce, args.limit, args.cases)
        finally:
            if beside is not None:
                beside.send_signal(signal.SIGKILL)
                beside.wait()
    return {**row, "setting": name, "loaded": loaded}


if __name__ == "__main__":
    main()
