"""Several processes through PyTorch's launcher (`--nproc-per-node 2`, gloo on this CPU),
compared with one process: the same certificates, the same Neural Cleanse norms, the same
SGD steps and the embedded default's findings, one MLflow run per command; and the collectives
themselves (twml_cli/distributed.py)."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import twml_run

from twml_cli import distributed, findings, results

GROUP_AT_EXIT = """
import json, os, torch
from twml_cli import distributed
distributed.init()
import timm  # imports torch._dynamo, as every twml command that loads a model does
me = distributed.rank()
summed = distributed.all_reduce_sum(torch.ones(2)).tolist()
rows = distributed.all_gather_rows(torch.full((me + 1, 2), float(me))).tolist()  # 1 row, then 2
text = distributed.broadcast_text("run-0a1b" if me == 0 else None)
share = distributed.shard(7)
distributed.close()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(f"{os.path.dirname(__file__)}/rank{os.environ['RANK']}.txt", "w") as out:  # not a shared stdout
    out.write(json.dumps({"gloo_threads": sorted(n for n in names if "gloo" in n), "summed": summed,
                          "rows": rows, "text": text, "share": [share.start, share.stop]}))
"""


@pytest.mark.e2e  # a launch of two processes
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_the_collectives_in_two_processes_and_closing_the_group_stops_its_gloo_threads(tmp_path):
    """Sums, rows of unequal number gathered in rank order, rank 0's text, each process's share.
    Then: a group whose threads outlive destroy_process_group ends a finished process, now and
    then, with std::terminate at interpreter exit, even after timm is imported."""
    script = tmp_path / "group.py"
    script.write_text(GROUP_AT_EXIT)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    seen = [json.loads((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    for got in seen:
        assert got["gloo_threads"] == []  # no gloo thread left
        assert got["summed"] == [2.0, 2.0]
        assert got["rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert got["text"] == "run-0a1b"
    assert [got["share"] for got in seen] == [[0, 4], [4, 7]]


def test_shards_cover_the_range_once_in_order_with_sizes_within_one():
    for n in range(0, 41):
        for parts in range(1, 8):
            shares = [distributed.shard(n, part, parts) for part in range(parts)]
            assert [i for s in shares for i in range(n)[s]] == list(range(n))
            sizes = [s.stop - s.start for s in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_in_one_process_the_collectives_are_the_identity():
    t = torch.arange(6.0).view(3, 2)
    assert (distributed.world_size(), distributed.rank(), distributed.active()) == (1, 0, False)
    assert distributed.all_gather_rows(t) is t and distributed.all_reduce_sum(t) is t
    assert distributed.broadcast_text("abc") == "abc" and distributed.broadcast_text(None) == ""
    assert distributed.shard(5) == slice(0, 5)


def run_both(reproduced, tmp_path, *args):
    """The same command with one process (this one) and with two, each in an experiment of its own."""
    cli = reproduced.cli
    single = cli(*args, "--experiment", "one")
    double = twml_run(*args, "--experiment", "two", "--nproc-per-node", "2", cwd=cli.path, uri=cli.uri)
    assert single.code == 0, single.err
    assert double.code == 0, double.err
    return single, double


def test_certificates_are_identical_with_two_processes(reproduced, tmp_path):
    cli, model = reproduced.cli, reproduced.smooth[0.2].info.run_id
    single, double = run_both(
        reproduced, tmp_path, "smooth", "--run", model, "--sigma", "0.25", "--n", "200", "--num-examples", "30"
    )
    (one,), (two,) = cli.runs("smooth", experiment="one"), cli.runs("smooth", experiment="two")  # one run each
    assert (one.data.params["world_size"], two.data.params["world_size"]) == ("1", "2")
    a, b = (pd.read_csv(cli.download(r, "certify.csv")).drop(columns="time_s") for r in (one, two))
    assert len(a) == 30 and a.equals(b)
    assert double.out.count("Run id:") == 1 and double.out.count("sigma = 0.25:") == 1  # the console prints once


def test_neural_cleanse_norms_are_identical_with_two_processes(reproduced, tmp_path):
    cli = reproduced.cli
    models = [a for r in (reproduced.standard, reproduced.backdoor) for a in ("--run", r.info.run_id)]
    run_both(reproduced, tmp_path, "cleanse", *models, "--search-steps", "4", "--search-images", "64")
    (one,), (two,) = cli.runs("cleanse", experiment="one"), cli.runs("cleanse", experiment="two")
    a, b = (pd.read_csv(cli.download(r, "norms.csv")) for r in (one, two))
    assert a["norm"].tolist() == b["norm"].tolist() and a["flagged"].tolist() == b["flagged"].tolist()


def test_two_process_free_training_makes_the_same_steps_and_meets_the_findings(reproduced):
    """The seed's command line, unchanged, on two processes."""
    cli = reproduced.cli
    result = twml_run(
        "train", "--free", "--m", "4", "--nproc-per-node", "2", "--experiment", "ddp", cwd=cli.path, uri=cli.uri
    )
    assert result.code == 0, result.err
    (run,) = cli.runs("train", experiment="ddp")
    assert run.data.params["world_size"] == "2" and run.data.params["batch_size"] == "128"  # the global batch
    standard = reproduced.standard
    where = "run"
    ddp = (
        results.read(run.data.metrics, results.TrainingMetrics, where),
        results.read(run.data.metrics, results.RobustnessMetrics, where),
    )
    one = (
        results.read(standard.data.metrics, results.TrainingMetrics, where),
        results.read(standard.data.metrics, results.RobustnessMetrics, where),
    )
    checks = [c for c in findings.free_training(one, ddp) if "time" not in c.what]  # two processes share two cores
    assert all(c.ok for c in checks), [str(c) for c in checks]
    assert ddp[0].sgd_steps == one[0].sgd_steps == 336
    assert result.out.count("Run id:") == 1


def test_bad_input_under_the_launcher_is_one_line_and_exit_2(reproduced):
    cli = reproduced.cli
    result = twml_run(
        "train", "--eps", "1.5", "--nproc-per-node", "2", "--experiment", "bad", cwd=cli.path, uri=cli.uri
    )
    assert result.code == 2, result.err
    lines = [line for line in result.err.strip().splitlines() if not line.startswith("twml: launching")]
    assert lines == ["twml: error: eps must lie in [0, 1] (pixel units), got 1.5"], result.err
    assert cli.runs(experiment="bad") == []


@pytest.mark.slow  # 31 s: two launches of three methods; the launcher and DDP path are the free-training test's above
def test_two_process_certified_training_makes_the_same_steps_as_one(cli):
    """Consistency, SmoothAdv and MACER under the launcher make as many SGD steps as one process
    (the noise split itself is test_certified_training's). Each process normalizes its own half
    batch (no synchronized batch norm), so the first pass's losses agree closely, not bit for bit."""
    args = ["smooth", "--training", "consistency,smoothadv,macer", "--sigma", "0.25", "--epochs", "2"]
    args += ["--num-examples", "10", "--n", "100", "--macer-k", "4"]
    assert cli(*args, "--experiment", "one").code == 0
    result = twml_run(*args, "--experiment", "two", "--nproc-per-node", "2", cwd=cli.path, uri=cli.uri)
    assert result.code == 0, result.err
    client = cli.client()
    for one, two in zip(
        *(sorted(cli.runs("smooth", experiment=e), key=lambda r: r.data.params["training"]) for e in ("one", "two"))
    ):
        assert one.data.params["training"] == two.data.params["training"]
        assert (one.data.params["world_size"], two.data.params["world_size"]) == ("1", "2")
        assert one.data.metrics["sgd_steps"] == two.data.metrics["sgd_steps"] == 24
        first = [client.get_metric_history(r.info.run_id, "train_loss")[0].value for r in (one, two)]
        assert abs(first[0] - first[1]) < 0.05 * first[0], (one.data.params["training"], first)
