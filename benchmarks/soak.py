"""A soak with faults: twml used as a busy group would, with processes killed at random.

    python benchmarks/soak.py                          # 10 minutes on SQLite, then 10 against a server
    python benchmarks/soak.py --minutes 1 --store sqlite --kill-every 2

For --minutes, `--jobs` twml commands run at once against one store (train, free training,
smooth, backdoor, cleanse, report, and `--resume` of what `twml runs` lists as resumable), and
every `--kill-every` seconds on average a random one of them gets SIGKILL or SIGTERM. Then the
kills stop, every run `twml runs` offers to resume is resumed until none is left, each
resumable job runs once more without interruption as a reference, and these must hold:

- every run is FINISHED, or KILLED with no resume line (a report or cleanse that was killed);
- each resumed run ends with the metrics of its uninterrupted reference, to the last digit;
- each finished smooth run's certify.csv holds every example once;
- `twml report` builds, and no process printed a traceback.

Prints the counts (runs, kills, resumes, failures) as a table row and writes soak-STORE.json.
The store is a SQLite file or a local `mlflow server` (its own SQLite and artifacts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

EXPERIMENT = "soak"
QUICK = ("--threads", "1", "--experiment", EXPERIMENT)  # one thread: a resumed run repeats an uninterrupted one
JOBS = {  # name: (weight, arguments); those of train, smooth and backdoor checkpoint and resume
    "train": (3, ("train", "--epochs", "12", "--pgd-steps", "2")),
    "train seed 1": (2, ("train", "--epochs", "12", "--pgd-steps", "2", "--seed", "1")),
    "free": (2, ("train", "--free", "--m", "4", "--epochs", "16", "--pgd-steps", "2")),
    "smooth": (2, ("smooth", "--sigma", "0.25", "--epochs", "6", "--n", "200", "--num-examples", "60")),
    "backdoor": (2, ("backdoor", "--epochs", "10")),
    "cleanse": (1, ("cleanse", "--search-steps", "4", "--search-restarts", "1")),
    "report": (1, ("report",)),
}
NEEDS = {"cleanse": ("train", "backdoor")}  # finished runs a job needs before it can start
COMPARED = ("accuracy", "pgd_success_rate", "certified_accuracy", "average_certified_radius", "attack_success_rate")
KILLED_CODES = (130, -signal.SIGKILL, -signal.SIGTERM)  # SIGTERM: twml ends the run KILLED and exits 130


@dataclass
class Proc:
    name: str
    args: tuple
    popen: subprocess.Popen
    started: float
    resumes: str = ""  # the run id, for a resume
    killed: str = ""  # the signal it was sent


@dataclass
class Tally:
    launched: int = 0
    finished: int = 0
    sigkill: int = 0
    sigterm: int = 0
    killed_exits: int = 0
    resumes: int = 0
    failures: list = field(default_factory=list)


class Soak:
    def __init__(self, folder: Path, uri: str, jobs: int, rng: random.Random):
        self.folder, self.uri, self.jobs, self.rng = folder, uri, jobs, rng
        self.live: list[Proc] = []
        self.tally = Tally()
        self.logs = folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.reports = 0

    def env(self) -> dict:
        return {**os.environ, "MLFLOW_TRACKING_URI": self.uri, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def start(self, name: str, args: tuple, resumes: str = "") -> None:
        if args[0] == "report":
            self.reports += 1
            args = (*args, "--experiment", EXPERIMENT, "--out", f"reports/{self.reports}")
        elif not resumes:
            args = (*args, *QUICK)
        n = self.tally.launched
        out, err = open(self.logs / f"{n:04d}.out", "w"), open(self.logs / f"{n:04d}.err", "w")
        popen = subprocess.Popen(
            [sys.executable, "-m", "twml_cli", *args], cwd=self.folder, env=self.env(), stdout=out, stderr=err
        )
        self.live.append(Proc(name, args, popen, time.monotonic(), resumes))
        self.tally.launched += 1
        self.tally.resumes += bool(resumes)

    def reap(self) -> None:
        for p in [p for p in self.live if p.popen.poll() is not None]:
            self.live.remove(p)
            code = p.popen.returncode
            if code == 0:
                self.tally.finished += 1
            elif code in KILLED_CODES and p.killed:
                self.tally.killed_exits += 1
            else:
                self.fail(f"{' '.join(p.args)} exited {code} (sent: {p.killed or 'nothing'})")

    def kill_one(self) -> None:
        if not self.live:
            return
        p = self.rng.choice(self.live)
        sig = self.rng.choice((signal.SIGKILL, signal.SIGTERM))
        if p.popen.poll() is not None:  # it ended since the last reap: nothing to kill
            return
        p.popen.send_signal(sig)
        p.killed = p.killed or sig.name
        if sig == signal.SIGKILL:
            self.tally.sigkill += 1
        else:
            self.tally.sigterm += 1

    def fail(self, what: str) -> None:
        self.tally.failures.append(what)
        print(f"FAILURE: {what}", flush=True)

    def twml(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """A twml command run to its end, never killed (listing, references, the final report)."""
        done = subprocess.run(
            [sys.executable, "-m", "twml_cli", *args],
            cwd=self.folder,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        n = self.tally.launched
        (self.logs / f"{n:04d}.out").write_text(done.stdout)
        (self.logs / f"{n:04d}.err").write_text(done.stderr)
        self.tally.launched += 1
        return done

    def resume_lines(self) -> list[tuple[str, str]]:
        """(command, run id) of every run `twml runs` offers to resume."""
        listed = self.twml("runs", "--experiment", EXPERIMENT)
        return self.parse_listing(listed.returncode, listed.stdout, listed.stderr)

    def parse_listing(self, code: int, out: str, err: str) -> list[tuple[str, str]]:
        if code not in (0, 2) or "Traceback" in out + err:  # 2: no runs yet
            self.fail(f"twml runs exited {code}: {err.strip()[-300:]}")
        return re.findall(r"resume: twml (\w+) --resume (\w+)", out)

    def finished(self, command: str) -> bool:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return False
        query = f"tags.`twml.command` = '{command}' and attributes.status = 'FINISHED'"
        return bool(client.search_runs([exp.experiment_id], query, max_results=1))

    def run(self, seconds: float, kill_every: float) -> None:
        """The busy part: keep `jobs` commands going, kill at random, resume what is listed."""
        end = time.monotonic() + seconds
        next_kill = time.monotonic() + self.rng.expovariate(1 / kill_every)
        next_listing = time.monotonic() + 10
        pending: list[tuple[str, str]] = []
        listing = None  # `twml runs`, running beside the jobs (never killed)
        while time.monotonic() < end:
            self.reap()
            if listing is None and time.monotonic() >= next_listing:
                self.tally.launched += 1
                listing = subprocess.Popen(
                    [sys.executable, "-m", "twml_cli", "runs", "--experiment", EXPERIMENT],
                    cwd=self.folder,
                    env=self.env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            if listing is not None and listing.poll() is not None:
                out, err = listing.communicate()
                resuming = {p.resumes for p in self.live}
                pending = [(c, r) for c, r in self.parse_listing(listing.returncode, out, err) if r not in resuming]
                listing, next_listing = None, time.monotonic() + 15
            while len(self.live) < self.jobs:
                if pending:
                    command, run_id = pending.pop(0)
                    self.start("resume", (command, "--resume", run_id), resumes=run_id)
                    continue
                name = self.pick()
                self.start(name, JOBS[name][1])
            if time.monotonic() >= next_kill:
                self.kill_one()
                next_kill = time.monotonic() + self.rng.expovariate(1 / kill_every)
            time.sleep(0.1)
        if listing is not None:
            listing.communicate()

    def pick(self) -> str:
        names = [n for n in JOBS if all(self.finished(need) for need in NEEDS.get(n, ()))]
        return self.rng.choices(names, weights=[JOBS[n][0] for n in names])[0]

    def settle(self) -> None:
        """No more kills: let the live commands end, then resume until nothing is left to resume."""
        while self.live:
            self.reap()
            time.sleep(0.2)
        for _ in range(10):
            lines = self.resume_lines()
            if not lines:
                return
            for command, run_id in lines:
                self.tally.resumes += 1
                done = self.twml(command, "--resume", run_id)
                if done.returncode != 0:
                    self.fail(
                        f"twml {command} --resume {run_id} exited {done.returncode}: {done.stderr.strip()[-300:]}"
                    )
        self.fail("runs were still offered for resuming after 10 rounds")

    def check(self) -> dict:
        from mlflow.tracking import MlflowClient

        self.references()
        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], max_results=50_000)
        listed = self.twml("runs", "--experiment", EXPERIMENT).stdout
        statuses: dict[str, int] = {}
        for r in runs:
            statuses[r.info.status] = statuses.get(r.info.status, 0) + 1
            if r.info.status not in ("FINISHED", "KILLED"):
                self.fail(f"run {r.info.run_id} ({r.data.tags.get('twml.command')}) ended {r.info.status}")
            if f"--resume {r.info.run_id}" in listed:
                self.fail(f"run {r.info.run_id} is still offered for resuming")
        finished = [r for r in runs if r.info.status == "FINISHED"]
        compared = self.compare(finished)
        rows = self.rows(client, [r for r in finished if r.data.tags.get("twml.command") == "smooth"])
        report = self.twml("report", "--experiment", EXPERIMENT, "--out", "reports/final")
        if report.returncode != 0:
            self.fail(f"the final report exited {report.returncode}: {report.stderr.strip()[-300:]}")
        tracebacks = [p.name for p in sorted(self.logs.iterdir()) if "Traceback" in p.read_text(errors="replace")]
        for name in tracebacks:
            self.fail(f"a traceback in logs/{name}")
        return {"runs": len(runs), "statuses": statuses, "resumed_compared": compared, "smooth_rows_checked": rows}

    def references(self) -> None:
        """Each job whose resumed runs have no uninterrupted twin runs once more, not killed."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=50_000)
        clean = {signature(r) for r in runs if "twml.resumed" not in r.data.tags}
        wanted = {signature(r) for r in runs if "twml.resumed" in r.data.tags} - clean
        for name, (_, args) in JOBS.items():
            if job_signature(args) in wanted:
                done = self.twml(*args, *QUICK)
                if done.returncode != 0:
                    self.fail(f"reference {name} exited {done.returncode}: {done.stderr.strip()[-300:]}")

    def compare(self, finished: list) -> int:
        """Each resumed run against the uninterrupted runs with the same params: equal metrics."""
        groups: dict[tuple, list] = {}
        for r in finished:
            if r.data.tags.get("twml.command") in ("train", "smooth", "backdoor"):
                groups.setdefault(tuple(sorted(r.data.params.items())), []).append(r)
        compared = 0
        for group in groups.values():
            clean = [r for r in group if "twml.resumed" not in r.data.tags]
            for r in (r for r in group if "twml.resumed" in r.data.tags):
                if not clean:
                    self.fail(f"resumed run {r.info.run_id} has no uninterrupted run to compare with")
                    continue
                ref = clean[0].data.metrics
                for key in COMPARED:
                    if key in ref and r.data.metrics.get(key) != ref[key]:
                        self.fail(f"resumed run {r.info.run_id}: {key} {r.data.metrics.get(key)} != {ref[key]}")
                compared += 1
        return compared

    def rows(self, client, smooth_runs: list) -> int:
        """Every finished smooth run's certify.csv holds each example once."""
        import pandas as pd

        for r in smooth_runs:
            path = client.download_artifacts(
                r.info.run_id, "certify.csv", str(self.folder / "downloads" / r.info.run_id)
            )
            idx = pd.read_csv(path)["idx"]
            want = int(r.data.params["num_examples"])
            if len(idx) != want or idx.nunique() != want:
                self.fail(f"run {r.info.run_id}: certify.csv has {len(idx)} rows, {idx.nunique()} distinct, not {want}")
        return len(smooth_runs)


def signature(run) -> tuple:
    """What tells the jobs' runs apart: command, method and seed."""
    command, p = run.data.tags.get("twml.command"), run.data.params
    return command, p.get("method", "") if command == "train" else "", p.get("seed")


def job_signature(args: tuple) -> tuple:
    method = ("free" if "--free" in args else "standard") if args[0] == "train" else ""
    seed = args[args.index("--seed") + 1] if "--seed" in args else "0"
    return args[0], method, seed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
        + ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "art")]
        + ["--serve-artifacts"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "w"),
        start_new_session=True,  # mlflow server runs uvicorn as a child: stop the whole group
    )
    for _ in range(240):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the mlflow server did not start")


def soak(store: str, minutes: float, jobs: int, kill_every: float, seed: int, out: Path) -> dict:
    folder = out / store
    folder.mkdir(parents=True, exist_ok=False)
    server = None
    if store == "server":
        server, uri = start_server(folder)
    else:
        uri = f"sqlite:///{folder / 'mlflow.db'}"
    start = time.monotonic()
    try:
        s = Soak(folder, uri, jobs, random.Random(seed))
        s.run(minutes * 60, kill_every)
        busy = time.monotonic() - start
        s.settle()
        found = s.check()
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    t = s.tally
    result = {
        "store": store,
        "minutes": minutes,
        "busy_s": round(busy),
        "total_s": round(time.monotonic() - start),
        "jobs_at_once": jobs,
        "processes": t.launched,
        "finished_processes": t.finished,
        "kills": t.sigkill + t.sigterm,
        "sigkill": t.sigkill,
        "sigterm": t.sigterm,
        "resumes": t.resumes,
        **found,
        "failures": len(t.failures),
        "failure_list": t.failures,
    }
    (out / f"soak-{store}.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long commands are started and killed")
    parser.add_argument("--store", choices=("sqlite", "server", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=3, help="twml commands running at once")
    parser.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between two kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("soak-results"))
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    stores = ("sqlite", "server") if a.store == "both" else (a.store,)
    results = [soak(s, a.minutes, a.jobs, a.kill_every, a.seed, a.out) for s in stores]
    header = ["store", "minutes", "processes", "runs", "kills (SIGKILL / SIGTERM)", "resumes", "resumed runs compared"]
    print("| " + " | ".join([*header, "failures"]) + " |")
    print("|---" * (len(header) + 1) + "|")
    for r in results:
        print(
            f"| {r['store']} | {r['minutes']:g} | {r['processes']} | {r['runs']} | {r['kills']} "
            f"({r['sigkill']} / {r['sigterm']}) | {r['resumes']} | {r['resumed_compared']} | {r['failures']} |"
        )
    sys.exit(1 if any(r["failures"] for r in results) else 0)


if __name__ == "__main__":
    main()
