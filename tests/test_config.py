"""Typed settings: one field gives a hyperparameter's default, TOML key, flag, validation and
logged param."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from twml_cli import config
from twml_cli.errors import TwmlError


def test_defaults_are_the_embedded_default():
    (s,) = config.resolve("train", config.load_preset())
    assert (s.dataset, s.model, s.epochs, s.eps, s.pgd_alpha, s.method) == (
        "digits",
        "test_byobnet",
        28,
        0.1,
        0.025,
        "standard",
    )
    assert [x.sigma for x in config.resolve("smooth", config.load_preset())] == [0.05, 0.2]  # one run each


def test_presets_load_from_a_source_checkout_that_is_not_installed(tmp_path):
    """benchmarks/run_all.sh runs on a bare GPU machine with only the checkout on PYTHONPATH,
    where twml_cli.experiments (a package only an install maps) does not exist."""
    root = Path(config.__file__).resolve().parent.parent
    code = (
        f"import sys; sys.path.insert(0, {str(root)!r}); from twml_cli import config; "
        "print(config.preset_names(), config.load_preset('cifar10').raw['dataset'])"
    )
    # -S: no site-packages, so no installed (or editable) twml_cli to fall back on
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['cifar10',", "'digits',", "'imagenet']", "cifar10"]


def test_layers_apply_in_order_preset_sections_then_flags():
    cifar = config.load_preset("cifar10")
    s = config.resolve_one("train", cifar, {"epochs": 3})
    assert (s.dataset, s.model, s.epochs, s.schedule, s.m) == ("cifar10", "resnet18", 3, "step", 8)
    smooth = config.resolve("smooth", cifar)
    assert [x.sigma for x in smooth] == [0.12, 0.25, 0.5] and smooth[0].epochs == 90  # [smooth] over [train]
    assert smooth[0].batch_size == 128  # from [train]


def test_each_field_fans_out_into_one_settings_per_value():
    runs = config.resolve("smooth", config.load_preset(), {"sigma": [0.1, 0.3], "n": 50})
    assert [(s.sigma, s.n) for s in runs] == [(0.1, 50), (0.3, 50)]


def test_every_setting_is_a_toml_key_a_flag_and_a_param():
    for command, (cls, _) in config.COMMANDS.items():
        names = {f.name for f in config.settings_fields(cls)}
        s = config.resolve(command, config.load_preset())[0]
        logged = config.params(s)
        assert set(logged) <= names
        assert config.from_params(cls, {k: config.param_text(v) for k, v in logged.items()}) == s  # read back as logged


def test_a_run_logged_before_a_setting_existed_reads_back_with_what_it_ran():
    """A mitigate run logged before --unlearn-distill existed unlearned without the pull: read back,
    its settings say 0, not today's default; the report describes each as it ran."""
    from twml_cli.report.mitigation import _how

    s = config.resolve("mitigate", config.load_preset())[0]
    logged = {k: config.param_text(v) for k, v in config.params(s).items()}
    assert s.unlearn_distill == 0.5 and config.from_params(config.Mitigate, logged).unlearn_distill == 0.5
    older = config.from_params(config.Mitigate, {k: v for k, v in logged.items() if k != "unlearn_distill"})
    assert older.unlearn_distill == 0.0 and older == dataclasses.replace(s, unlearn_distill=0.0)
    assert "features held, weight 0.5)" in _how(s, 2) and "features held" not in _how(older, 2)
    # and before --unlearn-restart-fall, a fine-tune started again on a fall of 5 points
    older = config.from_params(config.Mitigate, {k: v for k, v in logged.items() if k != "unlearn_restart_fall"})
    assert s.unlearn_restart_fall == 0.02 and older.unlearn_restart_fall == 0.05
    assert older.unlearn_config().restart_fall == 0.05
    # and before --unlearn-clean-norm, statistics not frozen meant train-mode BatchNorm on whole batches
    assert s.unlearn_clean_norm and not s.unlearn_freeze_norm and "unlearn_clean_norm" in logged
    older = config.from_params(config.Mitigate, {k: v for k, v in logged.items() if k != "unlearn_clean_norm"})
    assert not older.unlearn_clean_norm and not older.unlearn_config().clean_norm
    assert "each batch's unstamped images" in _how(s, 2) and "statistics" not in _how(older, 2)
    frozen = config.from_params(config.Mitigate, {**logged, "unlearn_freeze_norm": "True"})
    assert frozen.unlearn_config().freeze_norm and "normalization statistics frozen" in _how(frozen, 2)
    assert "unlearn_clean_norm" not in config.params(frozen)  # frozen: it does not apply, and is not logged


def test_one_name_one_meaning():
    """A field name means the same thing in every study that has it (same help text)."""
    seen = {}
    for cls, _ in config.COMMANDS.values():
        for f in config.settings_fields(cls):
            assert seen.setdefault(f.name, f.metadata["help"]) == f.metadata["help"], f.name
    flags = [config.flag_of(f) for f in config.settings_fields(config.Smoothing)]
    assert "--cert-alpha" in flags and "--alpha" not in flags
    assert {"--search-lr", "--search-batch-size"} <= {config.flag_of(f) for f in config.settings_fields(config.Cleanse)}


def test_params_leave_out_what_does_not_apply():
    standard = config.resolve_one("train", config.load_preset())
    assert "m" not in config.params(standard) and config.params(dataclasses.replace(standard, method="free"))["m"] == 4


@pytest.mark.parametrize(
    "toml, message",
    [
        ("epochs = 3", "unknown keys epochs"),
        ("[train]\nsigma = 0.1", "unknown keys train.sigma"),
        ("[train]\nepochs = 2.5", "epochs must be int, got 2.5"),
        ("[train]\nschedule = 'wavy'", "unknown schedule 'wavy'"),
        ("[smooth]\nsigma = []", "sigma needs at least one value"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_presets_are_refused(tmp_path, toml, message):
    path = tmp_path / "p.toml"
    path.write_text(toml)
    with pytest.raises(TwmlError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config.resolve("train", config.load_preset(config_file=path))


def test_validation_lives_in_the_library_configs():
    with pytest.raises(TwmlError, match="lr must be > 0"):
        config.Training(lr=0)
    with pytest.raises(TwmlError, match="pgd steps must be >= 1"):
        config.Attack(model_run="x", pgd_steps=0)
    with pytest.raises(TwmlError, match="success threshold must lie in"):
        config.Cleanse(search_threshold=0)


def test_config_command_prints_the_effective_settings(cli):
    result = cli("config", "smooth", "--preset", "cifar10")
    assert result.code == 0, result.err
    assert result.out.startswith("# twml smooth, from preset cifar10") and "\n[smooth]\n" in result.out
    assert (
        "n = 100000" in result.out and "cert_alpha = 0.001" in result.out and "sigma = [0.12, 0.25, 0.5]" in result.out
    )
    path = cli.path / "smooth.toml"
    path.write_text(result.out)
    again = cli("config", "smooth", "--config", str(path))
    assert again.code == 0, again.err
    assert again.out.splitlines()[1:] == result.out.splitlines()[1:]  # the same settings, line for line


@pytest.mark.parametrize("preset", ["digits", "cifar10", "imagenet"])
@pytest.mark.parametrize("command", sorted(config.COMMANDS))
def test_printed_settings_round_trip_through_config(tmp_path, command, preset):
    """What `twml config COMMAND --preset P` prints is a file that --config reads back to the
    same settings, every cell of a sweep included."""
    chosen = config.resolve(command, config.load_preset(preset))
    path = tmp_path / "printed.toml"
    path.write_text(config.to_toml(command, chosen, f"preset {preset}"))
    assert config.resolve(command, config.load_preset(config_file=path)) == chosen


def test_a_sweep_round_trips_too(tmp_path):
    cells = config.resolve("train", config.load_preset(), {"method": ["standard", "free"], "m": [4, 7], "seed": [0, 1]})
    path = tmp_path / "sweep.toml"
    path.write_text(config.to_toml("train", cells))
    assert config.resolve("train", config.load_preset(config_file=path)) == cells


def test_values_are_checked_before_torch_timm_and_mlflow_load():
    """A value out of range ends before the heavy libraries load (a fraction of a second, not the
    seconds torch takes on a busy machine): every command's settings, good and bad, are resolved
    in a fresh interpreter, which must not have imported torch, timm or MLflow by the end."""
    import subprocess
    import sys

    script = """
import sys
from twml_cli import config
from twml_cli.errors import TwmlError
bad = [
    ("train", {"epochs": -1}), ("train", {"eps": 2.0}), ("train", {"m": 0}), ("train", {"pgd_steps": 0}),
    ("train", {"model_kwargs": {"pretrained": True}}), ("train", {"schedule": "linear"}),
    ("attack", {"eps": -0.1}), ("attack", {"autoattack_queries": 0}),
    ("smooth", {"sigma": -1.0}), ("smooth", {"n": 0}), ("smooth", {"consistency_m": 1}),
    ("smooth", {"smoothadv_steps": 0}), ("smooth", {"macer_beta": 0.0}), ("smooth", {"macer_k": 0}),
    ("backdoor", {"poison_rate": 2.0}), ("backdoor", {"position": "middle"}),
    ("cleanse", {"search_steps": -1}), ("cleanse", {"init_cost": 0.0}),
    ("mitigate", {"unlearn_epochs": 0}), ("mitigate", {"unlearn_fraction": 1.0}),
]
refused = 0
for command, given in bad:
    try:
        config.resolve(command, config.load_preset(), given)
    except TwmlError:
        refused += 1
for command in config.COMMANDS:
    for preset in ("digits", "cifar10", "imagenet"):
        config.resolve(command, config.load_preset(preset), {})
print(refused, len(bad), sorted(m for m in ("torch", "timm", "mlflow") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1], f"only {out[0]} of {out[1]} bad values were refused"
    assert out[2:] == ["[]"], f"loaded while checking values: {' '.join(out[2:])}"
