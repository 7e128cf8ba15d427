"""The Typer application and the console (stdout lines, progress bars on stderr)."""

from __future__ import annotations

from collections.abc import Iterable

import typer
from typer.core import TyperGroup


def _untyped_flags(command, ctx):  # click's types; Typer 0.29 carries its own copy of click
    """A flag takes no value, so its help shows no type (Typer 0.29 prints `<bool>` beside `--help`)."""
    for param in command.get_params(ctx) if command is not None else ():
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return command


class _Group(TyperGroup):
    def get_command(self, ctx, cmd_name):
        return _untyped_flags(super().get_command(ctx, cmd_name), ctx)

    def format_help(self, ctx, formatter):
        _untyped_flags(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(
    cls=_Group,
    name="twml",
    help="Trustworthy-ML studies on timm models, tracked in MLflow: free adversarial training, "
    "randomized smoothing, Neural Cleanse.\n\nEvery command runs on the embedded digits data set "
    "by default; `--preset cifar10` gives the papers' setting, and any flag overrides the preset "
    "(`twml config COMMAND` prints the effective settings). A setting given several values (`--m 4,7 "
    "--seed 0,1,2`; `<int,...>` in a command's help, `<str>...` by repeating the flag) runs one run per "
    "combination under a sweep run, with means, spreads and a figure. `twml reproduce` runs everything; "
    "`mlflow ui` browses the runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def echo(text: str) -> None:
    print(text, flush=True)


STOP = {"requested": False}  # Ctrl-C or SIGTERM arrived (cli._interrupt): the next step of long work stops


def _steps(items: Iterable) -> Iterable:
    """The items, raising KeyboardInterrupt between two once an interrupt has asked to stop: the
    handler's own KeyboardInterrupt is lost when it lands in a weakref callback or __del__."""
    for item in items:
        if STOP["requested"]:
            raise KeyboardInterrupt
        yield item


def progress(items: Iterable, total: int, desc: str) -> Iterable:
    """A progress bar on stderr when it is a terminal; nothing otherwise. Long work stops at
    its next step once an interrupt asked it to."""
    items = _steps(items)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(desc, total=total)
        for item in items:
            yield item
            bar.advance(task)
