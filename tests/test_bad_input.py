"""Bad input, flag by flag: every value out of range, of the wrong type, a missing file or a
file of the wrong kind ends with one line on stderr, exit code 2, no traceback and no run.

The table below is also the documentation's list (docs/bad-input.md); after changing it, run
`python tests/test_bad_input.py` to rewrite the page, and the test checks the two agree."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

RUN = "0123456789abcdef0123456789abcdef"  # a run id no store holds
DOCS = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"

BAD = [
    # -- data and model
    (["train", "--dataset", "imagenet-x"], "unknown data set 'imagenet-x'"),
    (["train", "--dataset", "notes.txt"], "unknown data set 'notes.txt'"),
    (["train", "--dataset", "missing.npz"], "data file 'missing.npz' does not exist"),
    (["train", "--dataset", "junk.npz"], "junk.npz: not a readable .npz of plain arrays (File is not a zip file)"),
    (["train", "--dataset", "empty"], "image folder 'empty' needs train/ and val/ (or test/) subfolders"),
    (  # refused for what it is, before it is read: even a folder that could not be read
        ["backdoor", "--dataset", "empty"],
        "twml backdoor needs a data set that fits in memory; 'empty' is an image folder, which streams",
    ),
    (["train", "--preset", "imagenet"], "--image-size resizes image folders only; 'digits' has 8-pixel images"),
    (["train", "--image-size", "-5"], "image size, workers and threads must be >= 0, got -5"),
    (["train", "--workers", "-1"], "image size, workers and threads must be >= 0, got 0, -1 and 0"),
    (["train", "--threads", "-1"], "threads must be >= 0"),
    (["train", "--threads", "100000"], "threads must be at most 4 per core"),
    (["attack", "--eval-threads", "-2"], "eval threads must be >= 0, got -2"),
    (["smooth", "--eval-threads", "100000"], "eval threads must be at most 4 per core"),
    (["train", "--device", "tpu"], "unknown device 'tpu': use auto, cpu or cuda"),
    (["train", "--compile", "maybe"], "unknown compile 'maybe': use one of auto, off, on, graphs"),
    (["train", "--seed", "1.5"], "--seed takes whole numbers, got 1.5"),
    (["train", "--eval-batch-size", "0"], "eval batch size must be >= 1, got 0"),
    (["train", "--model", "resnet_nonexistent"], "unknown model 'resnet_nonexistent'"),
    (["train", "--model-kwargs", "[1, 2]"], "--model-kwargs must be a JSON object"),
    (["train", "--model-kwargs", "{bad"], "--model-kwargs must be a JSON object"),
    (
        ["train", "--model", "test_vit", "--model-kwargs", '{"img_size": -1}'],
        "model 'test_vit' does not take these --model-kwargs {'img_size': -1}: Expected a positive image size",
    ),
    (["train", "--stem", "huge"], "unknown stem 'huge': use one of auto, small, timm"),
    # -- training
    (["train", "--epochs", "0"], "epochs must be >= 1, got 0"),
    (["train", "--epochs", "1.5"], "--epochs takes whole numbers, got 1.5"),
    (["train", "--batch-size", "x"], "--batch-size takes whole numbers, got x"),
    (["train", "--batch-size", "0"], "batch size must be >= 1, got 0"),
    (["train", "--lr", "0"], "lr must be > 0, got 0.0"),
    (["train", "--lr", "inf"], "lr must be finite, got inf"),
    (["train", "--momentum", "1.5"], "momentum must lie in [0, 1), got 1.5"),
    (["train", "--weight-decay", "-1"], "weight decay must be >= 0, got -1.0"),
    (["train", "--schedule", "wavy"], "unknown schedule 'wavy'"),
    (["train", "--augmentation", "zoom"], "unknown augmentation 'zoom'"),
    (["train", "--checkpoint-every", "-1"], "checkpoint every must be >= 0, got -1"),
    (["train", "--register", "bad/name"], "--register 'bad/name': a model name cannot hold '/' or ':'"),
    (["train", "--method", "magic"], "unknown method 'magic'"),
    (["train", "--free", "--method", "standard"], "--free and --method disagree"),
    (["train", "--free", "--m", "0"], "m (replays per minibatch) must be >= 1, got 0"),
    (["train", "--m", "-2"], "m (replays per minibatch) must be >= 1, got -2"),  # refused even without --free
    (["train", "--m", "four"], "--m takes whole numbers, got four"),
    (["train", "--fast-step", "0"], "fast step must be > 0, got 0.0"),
    # -- threat model and PGD
    (["train", "--eps", "1.5"], "eps must lie in [0, 1]"),
    (["train", "--eps", "-0.1"], "eps must lie in [0, 1]"),
    (["train", "--eps", "nan"], "eps must be finite, got nan"),
    (["train", "--eps", "0.1,,0.2"], "--eps has an empty value in '0.1,,0.2'"),
    (["train", "--pgd-steps", "-1"], "pgd steps must be >= 1, got -1"),
    (["train", "--pgd-alpha", "0"], "pgd alpha must lie in (0, 1], got 0.0"),
    (["train", "--pgd-restarts", "0"], "pgd restarts must be >= 1, got 0"),
    (["train", "--autoattack-iterations", "0"], "AutoAttack iterations and queries must be >= 1, got 0 and 5000"),
    (["train", "--autoattack-queries", "x"], "--autoattack-queries takes whole numbers, got x"),
    # -- presets, configuration, store, processes
    (["train", "--preset", "imagenet-x"], "unknown preset 'imagenet-x'"),
    (["train", "--config", "missing.toml"], "config file 'missing.toml' does not exist"),
    (["train", "--config", "empty"], "config file 'empty' is a folder"),
    (["train", "--config", "broken.toml"], "broken.toml: not valid TOML"),
    (["train", "--config", "notes.txt"], "notes.txt: not valid TOML"),
    (["train", "--config", "typed.toml"], "epochs must be int, got 'ten'"),
    (["train", "--config", "renamed.toml"], "unknown keys cleanse.steps"),
    (["train", "--experiment", ""], "an MLflow experiment needs a name"),
    (["train", "--tracking-uri", "sqlite:////nonexistent/folder/m.db"], "folder '/nonexistent/folder' does not exist"),
    (["train", "--tracking-uri", "ftp://x"], "cannot use the tracking store ftp://x"),
    (["train", "--server-wait", "0"], "--server-wait must be a number of seconds > 0, got 0"),
    (["runs", "--server-wait", "inf"], "--server-wait must be a number of seconds > 0, got inf"),
    (["train", "--resume", RUN], f"no run '{RUN}'"),
    (["train", "--nproc-per-node", "0"], "--nproc-per-node must be >= 1, got 0"),
    (["train", "--nproc-per-node", "x"], "--nproc-per-node takes a whole number, got 'x'"),
    (["train", "--nnodes", "0"], "--nnodes must be >= 1, got 0"),
    (["train", "--nnodes", "2", "--node-rank", "-1"], "--node-rank must be >= 0, got -1"),
    (["train", "--rdzv-endpoint"], "--rdzv-endpoint needs a value"),
    # -- randomized smoothing
    (["smooth", "--sigma", "0"], "sigma must be > 0"),
    (["smooth", "--sigma", "0.1", "--sigma", "-0.2"], "sigma must be > 0, got -0.2"),
    (["smooth", "--sigma", "0.1,abc"], "--sigma takes numbers"),
    (["smooth", "--sigma", "inf"], "sigma must be finite, got inf"),
    (["smooth", "--n0", "0"], "n0 must be >= 1"),
    (["smooth", "--n", "0"], "n must be >= 1"),
    (["smooth", "--n", "10.5"], "--n takes whole numbers, got 10.5"),
    (["smooth", "--cert-alpha", "1"], "alpha must lie in (0, 1)"),
    (["smooth", "--certify-batch-size", "0"], "batch size must be >= 1, got 0"),
    (["smooth", "--num-examples", "-1"], "num examples must be >= 0 (0: all), got -1"),
    (["smooth", "--radii", "-0.5"], "radii must be >= 0, got [-0.5]"),
    (["smooth", "--radii", "0.5,nan"], "radii must be finite"),
    (["smooth", "--adaptive", "--radii", "0.25", "--futility", "0.5"], "futility must lie in (0, 0.5), got 0.5"),
    (["smooth", "--adaptive"], "adaptive certification needs a grid"),
    (["smooth", "--training", "magic"], "unknown training 'magic'"),
    (["smooth", "--consistency-m", "1"], "consistency regularization needs m >= 2 noisy copies, got 1"),
    (["smooth", "--consistency-lambda", "-1"], "consistency lambda and eta must be >= 0, got -1 and 0.5"),
    (["smooth", "--macer-lambda", "-1"], "MACER needs beta > 0, gamma > 0 and lambda >= 0, got 16, 8 and -1"),
    (["smooth", "--consistency-eta", "-1"], "consistency lambda and eta must be >= 0, got 2 and -1"),
    (["smooth", "--smoothadv-eps", "-1"], "SmoothAdv eps must be >= 0, got -1"),
    (["smooth", "--smoothadv-steps", "0"], "SmoothAdv steps and warmup must be >= 1, got 0 and 3"),
    (["smooth", "--smoothadv-m", "0"], "the number of noise draws per image must be >= 1, got 0"),
    (["smooth", "--smoothadv-warmup", "-1"], "SmoothAdv steps and warmup must be >= 1, got 2 and -1"),
    (["smooth", "--macer-k", "0"], "the number of noise draws per image must be >= 1, got 0"),
    (["smooth", "--macer-beta", "0"], "MACER needs beta > 0, gamma > 0 and lambda >= 0, got 0, 8 and 12"),
    (["smooth", "--macer-gamma", "-1"], "MACER needs beta > 0, gamma > 0 and lambda >= 0, got 16, -1 and 12"),
    (["smooth", "--macer-deferred", "-1"], "MACER's deferred epochs must be >= 0, got -1"),
    (["smooth", "--run", RUN], f"no run '{RUN}'"),
    (["smooth", "--run", "notes.txt"], "no run 'notes.txt'"),
    # -- BadNets
    (["backdoor", "--target", "10"], "target class 10 is outside the classes 0..9"),
    (["backdoor", "--target", "-1"], "target class -1 is outside the classes 0..9"),
    (["backdoor", "--poison-rate", "0"], "poison rate must lie in (0, 1)"),
    (["backdoor", "--poison-rate", "x"], "--poison-rate takes numbers, got x"),
    (["backdoor", "--trigger-size", "9"], "trigger size 9 is larger than the 8x8 image"),
    (["backdoor", "--trigger-size", "-1"], "trigger size must be >= 0 (0: automatic), got -1"),
    (["backdoor", "--position", "middle"], "unknown position 'middle'"),
    # -- Neural Cleanse and its mitigation
    (["cleanse"], "no finished run of twml train and twml backdoor"),
    (["cleanse", "--run", RUN], f"no run '{RUN}'"),
    (["cleanse", "--run", "empty"], "'empty' holds no model (need spec.json and model.safetensors)"),
    (["cleanse", "--search-steps", "0"], "cleanse steps must be >= 1, got 0"),
    (["cleanse", "--search-images", "0"], "search images must be >= 1, got 0"),
    (["cleanse", "--search-split", "val"], "unknown search split 'val': use one of train, test"),
    (["cleanse", "--search-batch-size", "0"], "cleanse batch size must be >= 1, got 0"),
    (["cleanse", "--search-lr", "0"], "cleanse lr must be > 0"),
    (["cleanse", "--search-threshold", "1.5"], "success threshold must lie in (0, 1], got 1.5"),
    (["cleanse", "--search-restarts", "0"], "restarts must be >= 1 and keep-best-after >= 0, got 0 and"),
    (["cleanse", "--search-keep-best-after", "-1"], "restarts must be >= 1 and keep-best-after >= 0"),
    (["cleanse", "--search-converged", "-1"], "early-stop threshold must lie in (0, 1], got -1.0"),
    (["cleanse", "--patience", "0"], "patience and early-stop patience must be >= 1"),
    (["cleanse", "--init-cost", "-1"], "init cost must be > 0, got -1.0"),
    (["cleanse", "--cost-multiplier", "1"], "cost multiplier must be > 1, got 1.0"),
    (["cleanse", "--anomaly-threshold", "0"], "anomaly threshold must be > 0, got 0.0"),
    (["mitigate", "--cleanse-run", RUN], f"no run '{RUN}'"),
    (["mitigate", "--mitigation", "burn"], "unknown mitigation 'burn': use one of unlearn, prune, filter"),
    (["mitigate", "--unlearn-epochs", "0"], "unlearning epochs and batch size must be >= 1, got 0"),
    (["mitigate", "--unlearn-fraction", "1.5"], "unlearning fraction must lie in (0, 1), got 1.5"),
    (["mitigate", "--unlearn-lr", "0"], "unlearning lr must be > 0, got 0.0"),
    (["mitigate", "--unlearn-lr", "0.001,0.002"], "twml mitigate repairs with one value of each setting"),
    (["mitigate", "--unlearn-schedule", "wavy"], "unknown unlearn schedule 'wavy': use one of constant, warmup"),
    (["mitigate", "--unlearn-distill", "-1"], "unlearning distillation weight must be >= 0, got -1.0"),
    (["mitigate", "--unlearn-hold-stamped", "-1"], "unlearning stamped-image pull weight must be >= 0, got -1.0"),
    (["mitigate", "--unlearn-restart-fall", "0"], "unlearning restart fall must lie in (0, 1], got 0.0"),
    (["mitigate", "--prune-step", "1.5"], "prune step and stop must lie in (0, 1], got 1.5 and 0.05"),
    (["mitigate", "--prune-stop", "-1"], "prune step and stop must lie in (0, 1], got 0.05 and -1.0"),
    (
        ["mitigate", "--mitigation", "filter", "--filter-rejects", "1"],
        "filter neurons must lie in (0, 1] and filter rejects in [0, 1), got 0.01 and 1.0",
    ),
    (["mitigate", "--filter-neurons", "nan"], "filter neurons must be finite, got nan"),
    # -- attacks
    (["attack"], "name the model to attack with --run"),
    (["attack", "--run", RUN], f"no run '{RUN}'"),
    (["attack", "--run", "runs:/feedface/model"], "no run 'feedface'"),
    (["attack", "--run", "abc"], "no run 'abc'"),  # too short to be taken as a prefix
    (["attack", "--run", "empty"], "'empty' holds no model"),
    (["attack", "--run", RUN, "--eps", "0.05,x"], "--eps takes numbers, got 0.05, x"),
    (["attack", "--num-examples", "-2"], "num examples must be >= 0 (0: all), got -2"),
    (["attack", "--steps", "5"], "No such option: --steps"),
    # -- the report, the run list, reproduce, config
    (["report", "--out", "notes.txt"], "--out 'notes.txt': 'notes.txt' is a file, not a folder"),
    (["report", "--tracking-uri", "sqlite:///nothere.db"], "no tracking store at sqlite:///nothere.db"),
    (["runs", "--tracking-uri", "sqlite:////nonexistent/x.db"], "folder '/nonexistent' does not exist"),
    (["reproduce", "--curve-seeds", "0"], "--curve-seeds must be >= 1, got 0"),
    (["reproduce", "--seed", "x"], "--seed takes whole numbers, got x"),
    (
        ["reproduce", "--seed", "0,1"],
        "twml reproduce runs one --seed, got 0,1: --curves --curve-seeds N adds N seeds from --seed on, and any study "
        "takes several (twml train --seed 0,1,2)",
    ),
    (["reproduce", "--out", "notes.txt"], "--out 'notes.txt': 'notes.txt' is a file, not a folder"),
    (["config", "nonsense"], "unknown command 'nonsense'"),
    (["config", "train", "--config", "missing.toml"], "config file 'missing.toml' does not exist"),
    (["nonsense"], "No such command 'nonsense'"),
]


def shown(args: list[str]) -> str:
    return "twml " + shlex.join(args)


@pytest.fixture
def files(cli):
    """The wrong files the table names, in the folder the commands run in, beside an empty store."""
    (cli.path / "notes.txt").write_text("plain text\n")
    (cli.path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    (cli.path / "broken.toml").write_text("[train\nepochs =\n")
    (cli.path / "typed.toml").write_text("[train]\nepochs = 'ten'\n")
    (cli.path / "renamed.toml").write_text("[cleanse]\nsteps = 3\n")  # renamed: search_steps
    (cli.path / "empty").mkdir()
    return cli


@pytest.mark.parametrize("args, message", BAD, ids=[shown(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_no_run(files, args, message):
    result = files(*args)
    assert result.code == 2, result.err + result.out
    assert message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "Traceback" not in result.err + result.out
    assert files.runs() == []


def test_a_data_set_named_wrong_is_refused_before_torch_loads(tmp_path):
    """A --dataset that names nothing twml can open (a typo, a file that is not there) ends
    at once, as a bad range does: before torch, timm and MLflow load (seconds on a 2-core CPU)."""
    import subprocess
    import sys

    script = """
import sys
from twml_cli.cli import main
for args in (["train", "--dataset", "cifar-10"], ["smooth", "--dataset", "mine.npz"]):
    try:
        main(args)
    except SystemExit as end:
        print(end.code)
print(sorted(m for m in ("torch", "timm", "mlflow") if m in sys.modules))
"""
    ran = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert ran.stdout.split() == ["2", "2", "[]"], ran.stdout + ran.stderr
    assert "unknown data set 'cifar-10'" in ran.stderr and "data file 'mine.npz' does not exist" in ran.stderr


def test_the_table_has_no_duplicates_and_the_docs_list_it():
    assert len({shown(a) for a, _ in BAD}) == len(BAD) >= 50
    assert DOCS.read_text() == page(), "run `python tests/test_bad_input.py` to rewrite docs/bad-input.md"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def page() -> str:
    flags = {a for args, _ in BAD for a in args if a.startswith("--")}
    rows = "\n".join(f"| `{cell(shown(a))}` | {cell(m)} |" for a, m in BAD)
    return f"""# Bad input

Every value twml cannot use ends the command with one line on stderr and exit code 2,
before any work starts and with no MLflow run left behind (a run that fails later, for
instance on an unreadable image halfway through an image folder, ends FAILED, never RUNNING).
No traceback is printed. A value out of range or a data set that names nothing twml can open
ends before torch and MLflow load, in about half a second, and leaves no store behind; what
lies inside a file or a folder is checked as it is read.

These {len(BAD)} inputs, over {len(flags)} flags and all of twml's commands, are tested one
by one (`tests/test_bad_input.py`); the message below is part of the line each prints.
Other cases are tested beside the feature they concern: weights that are not safetensors,
an image folder holding a file that is not an image, a resumed run given other settings,
a tracking server that refuses the credentials or does not answer.

| command | says |
|---|---|
{rows}
"""


if __name__ == "__main__":
    DOCS.write_text(page())
    print(f"wrote {DOCS} ({len(BAD)} bad inputs)")
