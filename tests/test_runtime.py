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


def test_side_by_side_runs_items_at_once_in_order_on_one_shared_bar():
    import threading

    both = threading.Barrier(2, timeout=10)  # each item waits for the other: one after another would time out
    drawn: list[tuple[int, str]] = []

    def bar(items, total, desc):
        n = 0
        for item in items:
            n += 1
            yield item
        drawn.append((n, total, desc))

    def item(k, progress):
        both.wait()
        return [k * 10 + step for step in progress(range(3 + k), 0, "ignored")], threading.current_thread().name

    got = runtime.side_by_side(item, [0, 1], 2, bar, 7, "two items")
    assert [v for v, _ in got] == [[0, 1, 2], [10, 11, 12, 13]]  # in order
    assert got[0][1] != got[1][1] and all(name.startswith("twml-side") for _, name in got)
    assert drawn == [(7, 7, "two items")]  # every step of both items advanced the caller's bar
    # one worker, or one item: in the caller's thread, with the caller's progress as it is
    here = threading.current_thread().name
    for items, workers in (([5], 2), ([5, 6], 1)):
        alone = runtime.side_by_side(
            lambda k, p: (list(p(range(2), 2, "own")), threading.current_thread().name), items, workers, bar, 9, ""
        )
        assert alone == [([0, 1], here)] * len(items)
    assert drawn[1:] == [(2, 2, "own")] * 3  # the item's own bar, not a shared one


def test_side_by_side_stops_the_other_items_on_an_error_or_an_interrupt():
    import threading

    LONG = 3000
    steps = {0: 0, 1: 0, 2: 0}

    def item(k, progress):
        for _ in progress(range(LONG), 0, ""):  # seconds unless stopped
            steps[k] += 1
            if k == 1 and steps[1] == 5:
                raise ValueError("item 1 failed")
            threading.Event().wait(0.001)

    def bar(items, total, desc):
        yield from items

    with pytest.raises(ValueError, match="item 1 failed"):
        runtime.side_by_side(item, [0, 1], 2, bar, 10, "")
    assert steps[1] == 5 and 0 < steps[0] < LONG  # item 0 stopped at a step of its own

    def interrupted(items, total, desc):  # Ctrl-C on the caller's bar, as cli.progress raises it
        for n, item in enumerate(items):
            if n == 20:
                raise KeyboardInterrupt
            yield item

    steps[0] = 0
    with pytest.raises(KeyboardInterrupt):
        runtime.side_by_side(item, [0, 2], 2, interrupted, 0, "")
    assert 0 < steps[0] < LONG and 0 < steps[2] < LONG
