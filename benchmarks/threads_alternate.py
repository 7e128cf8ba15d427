"""PGD-10 and the trigger search at 1 and at 2 intra-op threads, alternating in one process, so
that a shared machine's drift falls on both counts alike (benchmarks/threads.py starts a fresh
process per setting, whose differences drift can hide).

    python benchmarks/threads_alternate.py                       # quiet: 20 PGD runs, 4 searches each way
    python benchmarks/threads_alternate.py --beside              # beside a `twml train` (one thread)

Trains the digits default (seed 0) first. Sleeping threads (OMP_WAIT_POLICY=PASSIVE), as twml's
CLI sets. Prints the median and range of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pgd", type=int, default=20, help="PGD runs at each count")
    parser.add_argument("--searches", type=int, default=4, help="trigger searches at each count")
    parser.add_argument("--beside", action="store_true", help="with a second twml training beside")
    args = parser.parse_args()

    import torch

    from twml_cli import attacks, config
    from twml_cli.models import save_model
    from twml_cli.studies import cleanse, train

    torch.set_num_threads(1)
    s = dataclasses.replace(config.resolve_one("train", config.load_preset()), device="cpu", pgd_steps=1)
    inputs = train.prepare(s)
    model = train.compute(inputs).model
    pgd = dataclasses.replace(s, pgd_steps=10)
    beside = None
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder)
        searched = cleanse.prepare(
            dataclasses.replace(config.resolve_one("cleanse", config.load_preset()), device="cpu", model_runs=[folder])
        )
        if args.beside:
            beside = subprocess.Popen(
                [sys.executable, "-m", "twml_cli", "train", "--epochs", "100000", "--checkpoint-every", "0"],
                cwd=folder,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(15)  # past its start-up, into training
        seconds: dict[tuple[int, str], list[float]] = {}
        try:
            for k in range(max(args.pgd, args.searches)):
                for threads in (1, 2) if k % 2 == 0 else (2, 1):
                    torch.set_num_threads(threads)
                    if k < args.pgd:
                        began = time.perf_counter()
                        attacks.evaluate_robustness(model, inputs.data.test, pgd.pgd_config(), s.eval_batch_size, 0)
                        seconds.setdefault((threads, "PGD-10"), []).append(time.perf_counter() - began)
                    if k < args.searches:
                        began = time.perf_counter()
                        cleanse.compute(searched)
                        seconds.setdefault((threads, "trigger search"), []).append(time.perf_counter() - began)
        finally:
            if beside is not None:
                beside.send_signal(signal.SIGKILL)
                beside.wait()
    for (threads, what), values in sorted(seconds.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(
            f"{what}, {threads} thread{'s' if threads > 1 else ''}{' beside a twml' if args.beside else ''}: "
            f"median {statistics.median(values):.3f} s ({min(values):.3f} to {max(values):.3f}), "
            f"{len(values)} run{'s' if len(values) > 1 else ''}"
        )


if __name__ == "__main__":
    main()
