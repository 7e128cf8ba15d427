"""Presets (experiments/*.toml) merged with command-line flags into one effective config.

A preset has top-level keys shared by every command and one section per study:

    dataset, model, model_kwargs, device, seed, data_dir, eval_batch_size
    [train]     training and PGD evaluation (also used to train smoothing and backdoor models)
    [smooth]    certification; may override [train] keys for the base classifier
    [backdoor]  BadNets poisoning; may override [train] keys
    [cleanse]   Neural Cleanse

The effective config of a command is: the preset's top level, then its sections in order,
then every flag given on the command line. `--config FILE` is read over the embedded
default preset, so a file only needs the keys it changes.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import TwmlError

DEFAULT_PRESET = "digits"

TOP = {"dataset", "model", "model_kwargs", "device", "seed", "data_dir", "eval_batch_size"}
TRAIN = {
    "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "m", "eps",
    "pgd_steps", "pgd_alpha", "pgd_restarts",
}  # fmt: skip
SECTIONS = {
    "train": TRAIN,
    "smooth": TRAIN | {"sigma", "n0", "n", "alpha", "num_examples", "certify_batch_size"},
    "backdoor": TRAIN | {"target", "poison_rate", "trigger_size", "position"},
    "cleanse": {
        "steps", "num_images", "batch_size", "lr", "threshold", "anomaly_threshold",
        "patience", "init_cost",
    },
}  # fmt: skip
COMMAND_SECTIONS = {
    "train": ("train",),
    "attack": ("train",),
    "smooth": ("train", "smooth"),
    "backdoor": ("train", "backdoor"),
    "cleanse": ("cleanse",),
}


def _preset_dirs() -> list:
    """./experiments first (a user's own presets), then the ones shipped with twml."""
    dirs = [resources.files("twml_cli.experiments")]
    local = Path.cwd() / "experiments"
    return [local, *dirs] if local.is_dir() else dirs


def preset_names() -> list[str]:
    return sorted({p.name.removesuffix(".toml") for d in _preset_dirs() for p in d.iterdir() if p.name.endswith(".toml")})


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
    unknown = [k for k in raw if k not in TOP and k not in SECTIONS]
    for section in SECTIONS:
        if section in raw:
            if not isinstance(raw[section], dict):
                raise TwmlError(f"{where}: [{section}] must be a table")
            unknown += [f"{section}.{k}" for k in raw[section] if k not in SECTIONS[section]]
    if unknown:
        raise TwmlError(f"{where}: unknown keys {', '.join(unknown)}")
    return raw


def load(preset: str | None = None, config_file: str | Path | None = None) -> tuple[dict, str]:
    """The raw preset and its name (for logging)."""
    if preset and config_file:
        raise TwmlError("give --preset or --config, not both")
    base_name = preset or DEFAULT_PRESET
    raw = _read_toml(_find_preset(base_name).read_text(), f"preset {base_name}")
    if config_file is None:
        return raw, base_name
    path = Path(config_file)
    if not path.is_file():
        raise TwmlError(f"config file '{path}' does not exist")
    user = _read_toml(path.read_text(), str(path))
    for key, value in user.items():
        if key in SECTIONS:
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return raw, str(path)


def resolve(command: str, raw: dict, overrides: dict[str, Any]) -> dict[str, Any]:
    """The effective config of `command`: preset top level, its sections, then flags (not None)."""
    cfg = {k: v for k, v in raw.items() if k in TOP}
    for section in COMMAND_SECTIONS.get(command, ()):
        cfg.update(raw.get(section, {}))
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg.setdefault("model_kwargs", {})
    return cfg


def build(cls, cfg: dict[str, Any], **extra):
    """Construct a library config dataclass from the keys of `cfg` it has; its own
    validation errors become TwmlError (a one-line message, exit 2)."""
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in cfg.items() if k in names}, **extra)
    except (ValueError, TypeError) as err:
        raise TwmlError(str(err)) from None
