"""CPU threads: the choice is a function of the work, the machine and the launch, never of the load."""

import os

import pytest
import torch

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
    assert runtime.choose_threads(0, work=512 * 64)[0] == 1  # PGD on 512 images
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


def test_each_phase_runs_with_its_planned_threads_and_restores_the_count():
    import torch

    start = torch.get_num_threads()
    with runtime.phase("evaluate"):  # no plan (a library caller): the count is left alone
        assert torch.get_num_threads() == start
    with runtime.planned_threads(1, 3):
        assert torch.get_num_threads() == 1  # the block starts with training's count
        with runtime.phase("evaluate"):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
        with runtime.phase("train"):
            assert torch.get_num_threads() == 1
    with runtime.phase("evaluate"):  # the plan ended with its block
        assert torch.get_num_threads() == 1
    torch.set_num_threads(start)


def test_a_study_plans_training_and_evaluation_threads_by_their_own_work(monkeypatch):
    """The digits default: training batches of 128 8x8 images, evaluation and attacks (512 a
    batch) and the trigger search (4 starts x 10 classes x 32) take one thread, certification
    (2,000 noisy copies) the cores, so smooth trains on one thread and certifies on the cores; a
    study that trains nothing runs with its evaluation's count; --threads sets both,
    --eval-threads the second."""
    import dataclasses
    from types import SimpleNamespace

    from twml_cli import config
    from twml_cli.studies import runner

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    info = SimpleNamespace(in_chans=1, input_size=(8, 8), num_classes=10)

    def plan(command, given=False, **changes):
        s = dataclasses.replace(config.resolve(command, config.load_preset())[0], **changes)  # smooth: first sigma
        return runner.thread_plan(command, SimpleNamespace(settings=s, data=SimpleNamespace(info=info), given=given))

    assert plan("train") == (1, 1)
    assert plan("backdoor") == (1, 1)
    assert plan("smooth") == (1, cores)  # its base classifier trains as twml train does
    assert plan("smooth", given=True) == (cores, cores)
    assert plan("attack") == (1, 1)
    assert plan("cleanse") == (1, 1)
    assert plan("mitigate") == (1, 1)
    assert plan("smooth", certify_batch_size=1000) == (1, 1)
    assert plan("train", threads=3) == (3, 3)
    assert plan("train", threads=3, eval_threads=1) == (3, 1)
    assert plan("smooth", threads=1) == (1, 1)
    assert plan("smooth", eval_threads=1) == (1, 1)


def test_the_forward_pool_keeps_order_runs_one_thread_each_and_gives_threads_back():
    before = torch.get_num_threads()
    cpu = torch.device("cpu")
    try:
        torch.set_num_threads(2)
        seen = list(runtime.forward_pool(lambda i: (i * i, torch.get_num_threads()), range(20), cpu))
        assert [v for v, _ in seen] == [i * i for i in range(20)]  # in order, though run two at a time
        assert {t for _, t in seen} == {1} and torch.get_num_threads() == 2

        def fails(i):
            if i == 5:
                raise ValueError("item 5")
            return i

        with pytest.raises(ValueError, match="item 5"):
            list(runtime.forward_pool(fails, range(20), cpu))
        assert torch.get_num_threads() == 2
        # a compiled model (parallel=False) and one thread run in the caller's thread, with its count
        serial = runtime.forward_pool(lambda i: torch.get_num_threads(), range(4), cpu, parallel=False)
        assert set(serial) == {2}
    finally:
        torch.set_num_threads(before)
