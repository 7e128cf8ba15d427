"""Presets and flags into typed settings (settings.py), and settings into MLflow params and back.

A preset (experiments/*.toml) has top-level keys (the `Common` settings) and one section per
study; a command's settings are: field defaults, the preset's top level, its sections in
order, then the flags given. `--config FILE` is read over the default preset. A preset
states only what differs from the defaults; `twml config COMMAND` prints the result.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from .errors import TwmlError
from .results import COMMAND_TAG
from .settings import (  # noqa: F401 - callers name the settings classes config.Training etc.
    COMMANDS,
    RESUMABLE,
    RUNTIME_ONLY,
    SECTIONS,
    TOP_LEVEL,
    Attack,
    Backdoor,
    Cleanse,
    Common,
    Mitigate,
    Smoothing,
    Training,
    field_of,
    field_type,
    flag_of,
    logged_before,
    panel_of,
    settings_fields,
    sweepable,
)

DEFAULT_PRESET = "digits"


def _top_level() -> dict[str, tuple[type, dataclasses.Field]]:
    return {f.name: (cls, f) for cls in TOP_LEVEL for f in settings_fields(cls)}


def _section_keys(section: str) -> set[str]:
    return {f.name for f in settings_fields(SECTIONS[section])} - set(_top_level())


def _coerce(cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    """A value from TOML or a flag, as the field's type; several values (a sweep) stay a list."""
    kind = field_type(cls, f)
    if kind is not list and isinstance(value, (list, tuple)):
        if not sweepable(cls, f):
            raise TwmlError(f"{where}: {f.name} takes one value, got {list(value)!r}")
        if not value:
            raise TwmlError(f"{where}: {f.name} needs at least one value")
        values = list(dict.fromkeys(_coerce(cls, f, v, where) for v in value))  # each once; numbers ascending
        values = sorted(values) if kind in (int, float) else values
        return values if len(values) > 1 else values[0]
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, (list, tuple)),
        dict: lambda v: isinstance(v, dict),
    }[kind]
    if not ok(value):
        raise TwmlError(f"{where}: {f.name} must be {kind.__name__}, got {value!r}")
    if kind is list:
        try:
            value = [f.metadata.get("item", str)(v) for v in value]
        except (TypeError, ValueError):
            raise TwmlError(
                f"{where}: {f.name} must be a list of {f.metadata['item'].__name__}, got {value!r}"
            ) from None
    value = float(value) if kind is float else value
    if (
        kind is float
        and not math.isfinite(value)
        or kind is list
        and any(isinstance(v, float) and not math.isfinite(v) for v in value)
    ):
        raise TwmlError(f"{where}: {f.name.replace('_', ' ')} must be finite, got {value}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise TwmlError(f"{where}: unknown {f.name.replace('_', ' ')} '{value}': use one of {', '.join(choices)}")
    return value


# ---------------------------------------------------------------- presets


def _shipped_presets():
    try:
        return resources.files("twml_cli.experiments")
    except ModuleNotFoundError:  # a source checkout on the path, not installed (benchmarks on a bare GPU machine)
        return Path(__file__).resolve().parent.parent / "experiments"


def _preset_dirs() -> list:
    """./experiments first (a user's own presets), then the ones shipped with twml."""
    shipped = _shipped_presets()
    local = Path.cwd() / "experiments"
    return [local, shipped] if local.is_dir() else [shipped]


def preset_names() -> list[str]:
    return sorted(
        {p.name.removesuffix(".toml") for d in _preset_dirs() for p in d.iterdir() if p.name.endswith(".toml")}
    )


def _find_preset(name: str):
    for d in _preset_dirs():
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    raise TwmlError(f"unknown preset '{name}': use one of {', '.join(preset_names())} or --config FILE")


def _read_toml(text: str, where: str) -> dict:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TwmlError(f"{where}: not valid TOML ({err})") from None
    top = _top_level()
    unknown = [k for k in raw if k not in top and k not in SECTIONS]
    for section in SECTIONS:
        if section in raw:
            if not isinstance(raw[section], dict):
                raise TwmlError(f"{where}: [{section}] must be a table")
            unknown += [f"{section}.{k}" for k in raw[section] if k not in _section_keys(section)]
    if unknown:
        raise TwmlError(f"{where}: unknown keys {', '.join(unknown)}")
    for key, value in raw.items():  # every value's type and choices, whatever the command
        if key in SECTIONS:
            for k, v in value.items():
                _coerce(SECTIONS[key], field_of(SECTIONS[key], k), v, f"{where} [{key}]")
        else:
            _coerce(*top[key], value, where)
    return raw


@dataclass(frozen=True)
class Preset:
    name: str  # what was read: a preset's name or a file's path (logged as the param `preset`)
    raw: dict


def load_preset(name: str | None = None, config_file: str | Path | None = None) -> Preset:
    """A preset by name (default: digits), or a TOML file read over the default preset."""
    if name and config_file:
        raise TwmlError("give --preset or --config, not both")
    base = name or DEFAULT_PRESET
    raw = _read_toml(_find_preset(base).read_text(), f"preset {base}")
    if config_file is None:
        return Preset(base, raw)
    path = Path(config_file)
    if not path.is_file():
        raise TwmlError(f"config file '{path}' {'is a folder' if path.is_dir() else 'does not exist'}")
    for key, value in _read_toml(path.read_text(), str(path)).items():
        raw[key] = {**raw.get(key, {}), **value} if key in SECTIONS else value
    return Preset(str(path), raw)


def resolve(command: str, preset: Preset, overrides: dict[str, Any] | None = None) -> list:
    """The settings of `command`: field defaults, the preset's top level, the command's sections
    in order, then the flags given (None: not given). A setting given several values (a list in
    a preset, several on the command line) is a sweep axis: one settings object per cell of
    their product (see expand)."""
    cls = COMMANDS[command][0]
    by_name = {f.name: f for f in settings_fields(cls)}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values = _layered(command, preset)
    for key, value in given.items():
        if key not in by_name:
            raise TwmlError(f"twml {command} takes no setting '{key}'")
        values[key] = _coerce(cls, by_name[key], value, "command line")
    if (getattr(cls, "DATA_FROM_MODEL", False) or values.get("model_run")) and "dataset" not in given:
        values["dataset"] = ""  # the data set the given model was trained on (studies/common.data_name)
    axes = {k: v for k, v in values.items() if isinstance(v, list) and field_type(cls, by_name[k]) is not list}
    cells = [cls(**{**values, **cell}) for cell in expand(axes)]
    unique = {
        json.dumps(params(s), sort_keys=True, default=str): s for s in reversed(cells)
    }  # a setting that does not apply
    return [
        s for s in cells if unique.get(json.dumps(params(s), sort_keys=True, default=str)) is s
    ]  # makes no new cell


def expand(axes: dict[str, list]) -> list[dict[str, Any]]:
    """The cells of a sweep: every combination of the axes' values, the first axis outermost and
    the seed innermost (so a sweep's seeds of one setting run one after another). No axes: one
    cell, {}."""
    names = sorted(axes, key=lambda k: k == "seed")  # stable: the given order, the seed last
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[k] for k in names))]


def swept(settings_list: list) -> list[str]:
    """The settings that differ between the cells of a sweep, in field order, the seed last."""
    if len(settings_list) < 2:
        return []
    first = settings_list[0]
    names = [
        f.name
        for f in settings_fields(type(first))
        if any(getattr(s, f.name) != getattr(first, f.name) for s in settings_list)
    ]
    return sorted(names, key=lambda k: k == "seed")


def _layered(command: str, preset: Preset) -> dict[str, Any]:
    """The values a preset sets for a command: its top level, then the command's sections."""
    cls, sections = COMMANDS[command]
    by_name = {f.name: f for f in settings_fields(cls)}
    values: dict[str, Any] = {}
    layers = [({k: v for k, v in preset.raw.items() if k not in SECTIONS}, f"preset {preset.name}")]
    layers += [(preset.raw.get(s, {}), f"preset {preset.name} [{s}]") for s in sections]
    for layer, where in layers:
        values.update({k: _coerce(cls, by_name[k], v, where) for k, v in layer.items() if k in by_name})
    return values


def _default(f: dataclasses.Field) -> Any:
    """A field's default value, from its default or its default factory."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[operator]


def defaults(command: str) -> dict[str, Any]:
    """Each setting of a command as the default preset leaves it (shown in --help)."""
    cls = COMMANDS[command][0]
    fallback = {f.name: _default(f) for f in settings_fields(cls)}
    return {**fallback, **_layered(command, load_preset())}


def resolve_one(command: str, preset: Preset, overrides: dict[str, Any] | None = None):
    """The settings of a command that makes one run (no setting may take several values)."""
    cells = resolve(command, preset, overrides)
    if len(cells) != 1:
        raise TwmlError(
            f"twml {command} here makes one run, but {', '.join(swept(cells))} "
            f"{'has' if len(swept(cells)) == 1 else 'have'} several values"
        )
    return cells[0]


# ---------------------------------------------------------------- params


def params(settings) -> dict[str, Any]:
    """The MLflow params of a run made with these settings: every field that applies."""
    out = {}
    for f in settings_fields(type(settings)):
        applies = f.metadata.get("applies")
        if f.metadata.get("log", True) and (applies is None or applies(settings)):
            out[f.name] = getattr(settings, f.name)
    return out


def param_text(value: Any) -> str:
    """How a param value is logged: JSON for lists and dicts, str() otherwise."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def to_dict(settings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in settings_fields(type(settings))}


def from_params(cls: type, logged: dict[str, str]):
    """Settings rebuilt from a run's params (strings); fields not logged keep their defaults, or
    for a setting added since (settings.setting's `before`), the value runs ran with before it."""
    values = {k: v for k, v in logged_before(cls).items() if k not in logged}
    for f in settings_fields(cls):
        if f.name not in logged:
            continue
        text, kind = logged[f.name], field_type(cls, f)
        try:
            values[f.name] = (
                json.loads(text) if kind in (list, dict) else text == "True" if kind is bool else kind(text)
            )
        except ValueError:
            raise TwmlError(f"param {f.name}={text!r} is not a {kind.__name__}") from None
    return cls(**values)


def logged_settings(run) -> bool:
    """Whether the run logged all its params (the environment's come last, see studies/runner._run)."""
    return "twml_version" in run.data.params


def resumable(run) -> bool:
    """Whether `twml COMMAND --resume` can take this run: a command that checkpoints, and the
    settings it logged before it was stopped, readable as that command's settings."""
    command = run.data.tags.get(COMMAND_TAG)
    if command not in RESUMABLE or run.info.status == "FINISHED" or not logged_settings(run):
        return False
    try:
        from_params(COMMANDS[command][0], run.data.params)
    except (TwmlError, KeyError, TypeError, ValueError):
        return False
    return True


def to_toml(command: str, settings_list: list, source: str = "") -> str:
    """A command's effective settings as a preset file that `--config` takes back: the
    top-level keys, then the command's own section. A swept setting is a list of its values
    (a sweep of several runs, as it was resolved)."""
    cls = type(settings_list[0])
    top = _top_level()
    lines = [
        f"# twml {command}"
        + (f", from {source}" if source else "")
        + f": every setting; `twml {command} --config FILE` runs it"
    ]
    own: list[str] = []
    for f in settings_fields(cls):
        values = (
            list(dict.fromkeys(getattr(s, f.name) for s in settings_list))
            if sweepable(cls, f)
            else [getattr(settings_list[0], f.name)]
        )
        value = values if len(values) > 1 else values[0]
        note = "  (empty: the one the model was trained on)" if f.name == "dataset" and value == "" else ""
        line = f"{f.name} = {_toml_value(value)}   # {f.metadata['help']}{note}"
        (lines if f.name in top else own).append(line)
    return "\n".join([*lines, "", f"[{command}]", *own])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)
