"""Ctrl-C inside a store write: does the run still end KILLED?

    python benchmarks/interrupts.py                      # 121 points inside finalize_logged_model
    python benchmarks/interrupts.py --points 40 --jobs 2 --method log_batch

A real Ctrl-C lands wherever the main thread happens to be; most of the time that is PyTorch,
and the few milliseconds a run spends in the tracking store are hard to hit by hand. This
sends the process SIGINT (what Ctrl-C sends) at chosen points inside one of MLflow's
SQLAlchemy store methods instead: `twml train --epochs 1` runs once to count the Python lines
SQLAlchemy executes inside the method's first call, then once per point, with the signal
sent at that line. A point passes when twml exits 130 with its one line and the run is KILLED,
or FINISHED where the work was done: the interrupt landed while the run's end was written
(exit 130, "... ended FINISHED"), or in a weakref callback, where Python swallows it, with no
later step of the work asking whether to stop (exit 0, nothing printed). Anything else (a store
error, exit 2, a run left RUNNING or FAILED, a traceback) is a failure, listed with where the
signal was sent. Prints one line per point and a summary."""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

COMMAND = ("train", "--epochs", "1", "--pgd-steps", "1", "--threads", "1")
PASS = "twml: interrupted; the MLflow run ended"


def child(method: str, point: int) -> None:
    """Run twml with SIGINT sent at the `point`-th SQLAlchemy line inside the first
    call of SqlAlchemyStore.`method` (0: never; the count is printed at exit)."""
    import atexit

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    state = {"lines": 0, "done": False}

    def lines(frame, event, arg):
        if state["done"]:
            return None
        if event == "line":
            state["lines"] += 1
            if state["lines"] == point:
                state["done"] = True
                sys.settrace(None)
                print(f"interrupt at {frame.f_globals['__name__']}:{frame.f_lineno}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: its handler runs a few instructions on
        return lines

    def calls(frame, event, arg):
        return lines if frame.f_globals.get("__name__", "").startswith("sqlalchemy") else None

    original = getattr(SqlAlchemyStore, method)

    def traced(self, *args, **kwargs):
        first = not state["done"]
        if first:
            sys.settrace(calls)
        try:
            return original(self, *args, **kwargs)
        finally:
            if first:
                sys.settrace(None)
                state["done"] = True

    setattr(SqlAlchemyStore, method, traced)
    atexit.register(lambda: print(f"lines {state['lines']}", file=sys.stderr))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when started in the background
    from twml_cli.cli import main

    main(list(COMMAND))


def run_point(method: str, point: int, root: Path) -> dict:
    folder = root / f"point{point}"
    folder.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", method, str(point)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    with sqlite3.connect(folder / "mlflow.db") as db:
        statuses = [row[0] for row in db.execute("SELECT status FROM runs")]
    err = [line for line in done.stderr.splitlines() if line.strip()]
    where = next((line.split(" ", 2)[2] for line in err if line.startswith("interrupt at ")), "")
    said = [line for line in err if not line.startswith(("interrupt at ", "lines "))]
    lines = next((int(line.split()[1]) for line in err if line.startswith("lines ")), 0)
    killed = done.returncode == 130 and statuses == ["KILLED"] and said == [f"{PASS} KILLED"]
    finished = statuses == ["FINISHED"] and (done.returncode, said) in ((130, [f"{PASS} FINISHED"]), (0, []))
    outcome = "killed" if killed else "finished" if finished else "FAILED"
    return {
        "point": point,
        "code": done.returncode,
        "statuses": statuses,
        "where": where,
        "said": said,
        "lines": lines,
        "outcome": outcome,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="finalize_logged_model", help="the SqlAlchemyStore method to interrupt")
    parser.add_argument("--points", type=int, default=121, help="interrupts, spread evenly over the method's lines")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        probe = run_point(args.method, 0, root)
        total = probe["lines"]
        if probe["outcome"] != "finished" or total == 0:
            sys.exit(f"the uninterrupted run failed or never called {args.method}: {probe}")
        points = sorted({1 + round(i * (total - 1) / max(args.points - 1, 1)) for i in range(args.points)})
        print(f"{args.method}: {total} SQLAlchemy lines in its first call; {len(points)} interrupts", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda p: run_point(args.method, p, root), points))
    failed = [r for r in results if r["outcome"] == "FAILED"]
    for r in results:
        print(f"{r['point']:>6}  {r['outcome']:<8}  exit {r['code']:>3}  {','.join(r['statuses']):<9}  {r['where']}")
        if r["outcome"] == "FAILED":
            print(f"        said: {' | '.join(r['said'])[:300]}")
    killed = sum(r["outcome"] == "killed" for r in results)
    finished = len(results) - killed - len(failed)
    print(f"{len(results)} interrupts: {killed} ended the run KILLED, {finished} FINISHED (its work done), ", end="")
    print(f"{len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
