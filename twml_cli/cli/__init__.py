"""The `twml` command line: parse, resolve typed settings, run a study.

Every study command's options are built from its settings class (config.py): one field is
one flag, with its help text, panel and default (options.py). The options every command
shares (preset, tracking, processes) are declared once there too. Bad input ends with one
line on stderr and exit code 2; Ctrl-C (or SIGTERM) ends the MLflow run KILLED and exits 130.
"""

from __future__ import annotations

import signal
import sys

from ..errors import TwmlError, interrupted
from . import commands  # noqa: F401 - registers the commands on the app
from .app import STOP, app

try:  # typer >= 0.24 vendors click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import UsageError  # type: ignore[assignment]

__all__ = ["app", "main"]


# ---------------------------------------------------------------- entry point


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise), without importing torch."""
    import os

    return int(os.environ.get("RANK", 0))


def _interrupt(signum, frame):
    """Ctrl-C (SIGINT) or SIGTERM: stop the open MLflow run, which ends KILLED (through
    KeyboardInterrupt); with none open there is nothing to end, so leave at once (an exception
    raised here could land in an import's callback, where Python only prints it)."""
    if STOP["requested"]:
        _interrupt_again(signum)
        return
    open_runs = getattr(sys.modules.get("twml_cli.tracking"), "open_runs", None)  # None while it imports
    if open_runs is None or not open_runs():
        if _rank() == 0:
            print("twml: interrupted before a run was open; nothing to end", file=sys.stderr, flush=True)
        import os

        os._exit(130)
    STOP["requested"] = True  # if the KeyboardInterrupt below is swallowed, the next step raises it
    raise KeyboardInterrupt


def _interrupt_again(signum: int) -> None:
    """A second interrupt while the first stops the command (a double press of Ctrl-C) is not
    raised: raised inside the run's ending, it left the run RUNNING. It says what is under way,
    and gives the signal its default action back, so that a third ends the process at once,
    wherever it waits (an ending that hangs on a team server that stopped answering)."""
    signal.signal(signum, signal.SIG_DFL)
    tracking = sys.modules.get("twml_cli.tracking")
    if _rank() == 0 and tracking and tracking.pending_runs():
        print(
            "twml: stopping: ending the MLflow run; Ctrl-C again quits at once and leaves it RUNNING "
            "(`twml runs` lists it)",
            file=sys.stderr,
            flush=True,
        )


def _unraisable(unraisable) -> None:
    """An interrupt's KeyboardInterrupt can land in a weakref callback or __del__, where Python
    only prints it ("Exception ignored"): stay quiet, the next step of the work raises it again.
    (STOP is imported with this module: an import here fails while Python shuts down.)"""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and STOP["requested"]:
        return
    sys.__unraisablehook__(unraisable)


def fail(message: str, code: int = 2) -> None:
    if _rank() == 0:  # under torchrun every process fails alike; one says so
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _end_interrupted() -> None:
    """Ctrl-C or SIGTERM stopped the command: end its runs, KILLED (FINISHED where only their
    end was being written), now that the interrupt is handled (tracking.end_interrupted says
    why not before), and exit 130."""
    tracking = sys.modules.get("twml_cli.tracking")
    try:
        ended = tracking.end_interrupted() if tracking else []
    except TwmlError as err:
        fail(f"twml: error: {err}")
    if not ended:
        fail("twml: interrupted before a run was open; nothing to end", 130)
    states = {state: ended.count(state) for state in ("KILLED", "FINISHED") if state in ended}
    runs = " and ".join(f"{'the MLflow run' if n == 1 else f'{n} MLflow runs'} ended {s}" for s, n in states.items())
    fail(f"twml: interrupted; {runs}", 130)


def main(argv: list[str] | None = None) -> None:
    import os

    # Idle OpenMP threads sleep instead of spinning (set before torch loads its OpenMP runtime):
    # beside other work on the same cores, spinning threads made training 10-20x slower, and
    # sleeping ones cost about 10% on a quiet machine (benchmarks/threads.py). An explicit
    # OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .. import launch

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        launched = launch.main(argv)
        argv = launch.split(argv)[1]
    except ValueError as err:
        fail(f"twml: error: {err}")
    if launched is not None:
        sys.exit(launched)
    STOP["requested"] = False  # a new command (tests run several in one process)
    # Ctrl-C as SIGTERM, unless SIGINT is ignored, as a shell leaves it for a background job
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signals = (signal.SIGTERM,) if ignored else (signal.SIGINT, signal.SIGTERM)
    handlers = {sig: signal.signal(sig, _interrupt) for sig in signals}
    sys.unraisablehook = _unraisable
    try:
        _run(argv)
    finally:  # a process that called main (a test) gets its own handlers back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _run(argv: list[str]) -> None:
    """The command, its errors as one line, its exit code."""
    try:
        if "WORLD_SIZE" in __import__("os").environ:
            from .. import distributed

            distributed.init()
        code = app(args=argv, prog_name="twml", standalone_mode=False)
    except UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":
            print(err.format_message())
            sys.exit(0)
        command = err.ctx.command_path if err.ctx else "twml"
        fail(f"{command}: error: {err.format_message()} (see '{command} --help')")
    except Exception as err:
        tracking = sys.modules.get("twml_cli.tracking")
        if interrupted(err):  # a Ctrl-C that a library turned into an error of its own
            code = 130
        elif isinstance(err, TwmlError):
            fail(f"twml: error: {err}")
        elif (store := tracking.store_error(err) if tracking else None) is not None:
            fail(f"twml: error: {store}")
        else:
            raise
    finally:
        group = sys.modules.get("twml_cli.distributed")  # not imported for a bad value: no torch to load
        if group is not None:
            group.close()
    if code == 130:
        _end_interrupted()
    sys.exit(code if isinstance(code, int) else 0)
