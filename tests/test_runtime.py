"""CPU threads: the choice is a function of the work, the machine and the launch, never of the load."""

import os

from twml_cli import runtime


def test_threads_follow_the_work_and_the_processes_on_the_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert runtime.choose_threads(3)[0] == 3  # --threads wins
    assert runtime.choose_threads(0, work=128 * 64) == (
        1,
        "8,192 values per forward pass (under 100,000)",
    )  # digits training
    assert runtime.choose_threads(0, work=2000 * 64)[0] == cores  # certification's 2,000 noisy copies
    assert runtime.choose_threads(0)[0] == cores  # unknown work: every core
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more processes on this machine than cores
    assert runtime.choose_threads(0, work=10**7)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.choose_threads(0, work=10**7) == (2, "OMP_NUM_THREADS")  # the user's word wins
    assert runtime.choose_threads(1, work=10**7)[0] == 1  # and --threads over it


def test_the_cli_lets_idle_openmp_threads_sleep(monkeypatch):
    from twml_cli.cli import main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    try:
        main(["--help"])
    except SystemExit:
        pass
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    try:
        main(["--help"])
    except SystemExit:
        pass
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # an explicit policy is kept
