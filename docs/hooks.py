"""MkDocs hook: the command reference, generated from the Typer app at build time, so it can
never disagree with `twml --help`. A page marks where it goes with <!-- twml-commands -->."""

from __future__ import annotations

MARKER = "<!-- twml-commands -->"


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference())


def reference() -> str:
    import click
    import typer

    from twml_cli.cli import app

    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="twml")
    out = []
    for name in root.list_commands(ctx):
        command = root.get_command(ctx, name)
        sub = click.Context(command, info_name=name, parent=ctx)
        out += [
            f"## twml {name}",
            "",
            _text(command.help or ""),
            "",
            "```",
            command.get_usage(sub).replace("Usage: ", ""),
            "```",
            "",
        ]
        panels: dict[str, list] = {}
        for param in command.get_params(sub):
            # by its kind, not its class: recent Typer builds its options on a click of its own
            if param.param_type_name != "option" or getattr(param, "hidden", False) or param.name == "help":
                continue
            panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(param)
        for panel, params in panels.items():
            out += [f"**{panel}**", "", "| option | meaning |", "|---|---|"]
            for p in params:
                flags = ", ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts))
                out.append(f"| {flags} | {_text(p.help or '').replace('|', '/')} |")
            out.append("")
    return "\n".join(out)


def _text(help_text: str) -> str:
    return " ".join(help_text.replace("\b", "").split())


# Every public function and class of the library modules carries a docstring: the API page is
# built from them, and `mkdocs build --strict` fails on one that lacks it.
LIBRARY = (
    "twml_cli.attacks.pgd",
    "twml_cli.attacks.apgd",
    "twml_cli.attacks.fab",
    "twml_cli.attacks.square",
    "twml_cli.attacks.autoattack",
    "twml_cli.attacks.evaluate",
    "twml_cli.training",
    "twml_cli.perturbations",
    "twml_cli.smoothing",
    "twml_cli.cleanse",
    "twml_cli.backdoor",
    "twml_cli.mitigation",
    "twml_cli.models",
    "twml_cli.data",
    "twml_cli.studies.sweep",
)


def on_pre_build(config, **kwargs) -> None:
    import importlib
    import inspect

    from mkdocs.exceptions import PluginError

    missing = []
    for name in LIBRARY:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != name:
                continue
            doc = (obj.__doc__ or "").strip()
            if not doc or (
                inspect.isclass(obj) and doc.startswith(f"{attr}(")
            ):  # a dataclass's generated signature is no docstring
                missing.append(f"{name}.{attr}")
    if missing:
        raise PluginError("public API without a docstring: " + ", ".join(missing))
