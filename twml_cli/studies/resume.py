"""What an interrupted run leaves behind and how `--resume` goes on from it.

While a resumable study runs, its per-pass curves, its training state every few passes and
certification's rows every ROWS_EVERY_S seconds go into its run; against a tracking server
they are first written to ./.twml/kept/RUN_ID (KEPT), so a server that goes away mid-run
loses none of the work, and `--resume` takes the newer of the two copies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from .. import config, results, tracking, training
from ..config import RESUMABLE
from ..errors import TwmlError
from ..tracking_server import is_server, refused
from . import train
from .common import Hooks

ROWS_EVERY_S = 20.0  # how often certification's rows are written while it runs
KEPT = Path(".twml") / "kept"  # local copies of a server run's checkpoint and rows, until it finishes


def checkpointing(run, hooks: Hooks) -> None:
    """Per-pass curves as they come, the training state every few passes, and certification's
    rows every ROWS_EVERY_S seconds: all into the run, so an interruption loses little (and,
    against a tracking server, into KEPT first)."""

    def on_pass(stats: training.EpochStats) -> None:
        train.record_pass(run, stats)
        run.heartbeat()

    hooks.on_pass = on_pass

    def save_state(state: training.TrainState) -> None:
        with _scratch(run.id, results.CHECKPOINT_DIR) as folder:
            run.log_dir(state.save(folder), results.CHECKPOINT_DIR)
        run.heartbeat()

    last = [0.0]

    def save_rows(rows: dict) -> None:
        if time.monotonic() - last[0] < ROWS_EVERY_S:
            return
        last[0] = time.monotonic()
        with _scratch(run.id, "rows") as folder:
            pd.DataFrame(rows).to_csv(folder / "rows.new", index=False)
            (folder / "rows.new").replace(folder / results.CERTIFY_CSV)  # whole, or the previous one
            run.log_dir(folder)
        run.heartbeat()

    hooks.save_state, hooks.save_rows = save_state, save_rows


@contextlib.contextmanager
def _scratch(run_id: str, name: str) -> Iterator[Path]:
    """Where a checkpoint or the rows are written before they are logged: KEPT/RUN_ID/NAME when
    the store is a server (it may go away), else a temporary folder."""
    if is_server(tracking.tracking_uri()):
        folder = KEPT / run_id / name
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=f"twml-{name}-") as tmp:
        yield Path(tmp)


def forget(run_id: str) -> None:
    """Remove a finished run's kept copies (and the folders, once nothing else is kept)."""
    if run_id and (KEPT / run_id).exists():
        shutil.rmtree(KEPT / run_id, ignore_errors=True)
        with contextlib.suppress(OSError):
            KEPT.rmdir()
            KEPT.parent.rmdir()


def _kept(passes: int | None, certified: int) -> list[str]:
    """What a run kept to go on from, in words: its training state, its certified examples."""
    return ([f"the training state after pass {passes}"] if passes is not None else []) + (
        [f"{certified} certified examples"] if certified else []
    )


def went_away(command: str, run_id: str, err: BaseException) -> str:
    """What to say when the server stops answering mid-run: what is kept, and how to go on."""
    kept = KEPT / run_id
    state = kept / results.CHECKPOINT_DIR / training.TrainState.META
    rows = kept / "rows" / results.CERTIFY_CSV
    uri = tracking.tracking_uri()
    what = _kept(
        json.loads(state.read_text())["passes_done"] if state.is_file() else None,
        len(pd.read_csv(rows)) if rows.is_file() else 0,
    )
    if not what or command not in RESUMABLE:
        return f"{refused(err, uri)}; run {run_id} kept nothing to go on from: run the command again"
    return (
        f"{refused(err, uri)}; run {run_id} kept {' and '.join(what)} in {kept}: once the server is back, "
        f"`twml {command} --resume {run_id} --tracking-uri {uri}` goes on from there"
    )


def leftovers(run_id: str):
    """What an interrupted run left: its last training state and its certified rows, from the
    run or from KEPT, whichever went further."""
    state = rows = None
    for folder in (tracking.download_artifact(run_id, results.CHECKPOINT_DIR), KEPT / run_id / results.CHECKPOINT_DIR):
        if not folder or not (Path(folder) / training.TrainState.WEIGHTS).is_file():
            continue
        try:
            found = training.TrainState.load(folder)
        except ValueError:  # torn by a kill between its two files: the other copy, or the start, will do
            continue
        if state is None or found.meta["passes_done"] > state.meta["passes_done"]:
            state = found
    tables = (tracking.download_artifact(run_id, results.CERTIFY_CSV), KEPT / run_id / "rows" / results.CERTIFY_CSV)
    frames = [f for f in (_whole_rows(t) for t in tables if t and Path(t).is_file()) if f is not None]
    if frames:
        frame = max(frames, key=len)
        rows = {k: frame[k].to_numpy() for k in frame.columns}
    return state, rows


def going_on(run_id: str, state, rows) -> str:
    """The console's line on resuming: where the run goes on from."""
    what = _kept(
        state.meta["passes_done"] if state is not None else None,
        len(next(iter(rows.values()), [])) if rows is not None else 0,
    )
    if not what:
        return f"Resuming run {run_id} from the start: it had kept no training state"
    return f"Resuming run {run_id} from {' and '.join(what)}"


def _whole_rows(path) -> pd.DataFrame | None:
    """certify.csv's rows, or None when the file was cut short (an upload stopped by a kill):
    a whole file ends with a newline and has no empty cell."""
    text = Path(path).read_text()
    if not text.endswith("\n"):
        return None
    frame = pd.read_csv(io.StringIO(text))
    return None if frame.isna().any().any() else frame


def resume_settings(command: str, run_id: str, overrides: dict):
    """The settings an interrupted run was started with, from its params; only where and how
    to run (device, compile, workers, data_dir, threads, eval_threads) may change."""
    if command not in RESUMABLE:
        raise TwmlError(f"twml {command} has nothing to resume: {', '.join(RESUMABLE)} do")
    run = tracking.get_run(run_id)
    logged = run.data.tags.get(results.COMMAND_TAG)
    if logged != command:
        raise TwmlError(
            f"run '{run_id}' is a '{logged}' run, not '{command}': resume it with twml {logged} --resume {run_id}"
        )
    runtime_only = set(config.RUNTIME_ONLY)
    changed = sorted(k for k, v in overrides.items() if v is not None and k not in runtime_only)
    if changed:
        raise TwmlError(
            f"a resumed run keeps its settings; only {', '.join(sorted(runtime_only))} may be given (not "
            f"{', '.join(changed)})"
        )
    if run.info.status == "FINISHED":
        raise TwmlError(f"run '{run_id}' already finished; there is nothing to resume")
    if not config.logged_settings(run):
        raise TwmlError(f"run '{run_id}' was stopped before it logged its settings; run the command again")
    if tracking.status_of(run) == "running":
        tags = run.data.tags
        raise TwmlError(
            f"run '{run_id}' is still running (process {tags.get(tracking.PID_TAG)} on {tags.get(tracking.HOST_TAG)}); "
            "stop it before resuming"
        )
    params = {k: v for k, v in run.data.params.items() if k not in runtime_only}
    settings = config.from_params(config.COMMANDS[command][0], params)
    # CPU numbers depend on the thread counts: the run goes on with those it was started with (the
    # machine's own choice could differ: OMP_NUM_THREADS may be set in one shell and not the
    # other). A run logged before eval_threads existed ran everything with its threads.
    logged = run.data.params
    counts = {k: logged.get(k, logged.get("threads", "")) for k in ("threads", "eval_threads")}
    if all(v.isdigit() and int(v) <= (os.cpu_count() or 1) for v in counts.values()):
        settings = dataclasses.replace(settings, **{k: int(v) for k, v in counts.items()})
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
