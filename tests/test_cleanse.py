import dataclasses
import importlib.util
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from twml_cli.backdoor import Trigger, poison, stamped_success_rate
from twml_cli.cleanse import CleanseConfig, mad_outlier_test, reverse_engineer, reversed_trigger_success, stamp
from twml_cli.models import ModelSpec, create_model
from twml_cli.training import TrainConfig, train


def test_mad_outlier_test_on_known_norms():
    norms = [1.0, 8.0, 9.0, 10.0, 11.0, 12.0]
    # median 9.5; |l - 9.5| = 8.5 1.5 .5 .5 1.5 2.5, whose median is 1.5; MAD = 1.4826 * 1.5
    test = mad_outlier_test(norms)
    assert test.median == 9.5 and test.mad == pytest.approx(2.2239)
    assert test.anomaly_index == pytest.approx(np.array([8.5, 1.5, 0.5, 0.5, 1.5, 2.5]) / 2.2239)
    assert test.flagged.tolist() == [True, False, False, False, False, False]


def test_the_index_has_a_ceiling_the_index_of_a_norm_of_zero():
    """No class can score above median / MAD: with norms this spread, not even a trigger of norm 0
    is flagged."""
    assert mad_outlier_test([1.0, 8.0, 9.0, 10.0, 11.0, 12.0]).ceiling == pytest.approx(9.5 / 2.2239)
    wide = mad_outlier_test([0.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0])
    # median 11; deviations 11 7 5 3 1 1 3 5 7 9, whose median is 5; MAD = 1.4826 * 5
    assert wide.ceiling == pytest.approx(11 / 7.413) and wide.anomaly_index[0] == pytest.approx(wide.ceiling)
    assert wide.ceiling < 2 and not wide.flagged.any()
    rng = np.random.default_rng(0)
    for _ in range(50):
        test = mad_outlier_test(rng.uniform(0, 20, size=10))
        assert (test.anomaly_index[test.below] <= test.ceiling + 1e-12).all()
    assert np.isinf(mad_outlier_test([4.0, 4.0, 4.0, 4.0, 1.0]).ceiling)


def test_a_class_above_the_median_is_never_flagged():
    test = mad_outlier_test([30.0, 8.0, 9.0, 10.0, 11.0, 12.0])  # 30 is far out, but large
    assert test.anomaly_index[0] > 2 and not test.flagged.any()


def test_threshold_and_equal_norms():
    assert mad_outlier_test([5.0, 8.0, 9.0, 10.0, 11.0], threshold=2.0).flagged.tolist() == [
        True,
        False,
        False,
        False,
        False,
    ]
    assert not mad_outlier_test([5.0, 8.0, 9.0, 10.0, 11.0], threshold=3.0).flagged.any()
    same = mad_outlier_test([4.0, 4.0, 4.0, 4.0, 1.0])  # MAD = 0: any other value is infinitely out
    assert same.flagged.tolist() == [False, False, False, False, True] and np.isinf(same.anomaly_index[4])


def test_stamp_blends_mask_and_pattern():
    x = torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(4, 4)
    mask[0, 0], mask[1, 1] = 1.0, 0.5
    pattern = torch.ones(3, 4, 4)
    out = stamp(x, mask, pattern)
    assert out[:, :, 0, 0].eq(1).all() and out[:, :, 1, 1].eq(0.5).all() and out.sum() == 2 * 3 * 1.5


@pytest.fixture(scope="module")
def backdoored(digits):
    train_set, info = digits.train, digits.info
    x, y, _ = poison(*train_set.tensors, target=0, rate=0.1, trigger=Trigger(2), seed=0)
    torch.manual_seed(0)
    model = create_model(ModelSpec.for_data("test_byobnet", info))
    train(model, (x, y), TrainConfig(epochs=28))
    return model, train_set.tensors[0][:128]


def test_masks_and_patterns_stay_in_unit_range(backdoored):
    model, x = backdoored
    rev = reverse_engineer(model, x, 10, CleanseConfig(steps=6, lr=5.0), classes=[0, 5])  # a huge step size
    for t in (rev.masks, rev.patterns):
        assert t.min() >= 0 and t.max() <= 1
    assert rev.masks.shape == (2, 8, 8) and rev.patterns.shape == (2, 1, 8, 8)
    assert np.allclose(rev.norms, rev.masks.flatten(1).sum(1).numpy(), rtol=1e-5)


def test_global_state_is_restored(backdoored, monkeypatch):
    model, x = backdoored
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as models.prepare sets it on CUDA
    reverse_engineer(model, x[:32], 10, CleanseConfig(steps=1, batch_size=32), classes=[1])
    assert torch.backends.cudnn.benchmark is True
    assert all(p.requires_grad for p in model.parameters())


def test_all_classes_together_give_the_class_by_class_answer(backdoored):
    model, x = backdoored
    cfg = CleanseConfig(steps=30, batch_size=32, seed=2)
    together = reverse_engineer(model, x, 10, cfg)
    some = [0, 4, 9]  # the target and two others, each searched alone
    alone = [reverse_engineer(model, x, 10, cfg, classes=[c]) for c in some]
    assert np.allclose(together.norms[some], [a.norms[0] for a in alone], rtol=1e-3)
    assert torch.allclose(together.masks[some], torch.cat([a.masks for a in alone]), atol=1e-3)
    assert together.reached.all()
    # the poisoned target has by far the smallest trigger
    assert (
        int(np.argmin(together.norms)) == 0
        and mad_outlier_test(together.norms).flagged.tolist() == [True] + [False] * 9
    )


def test_reversed_trigger_sends_other_classes_to_its_target(backdoored, digits):
    model, x = backdoored
    x_test, y_test = digits.test.tensors
    rev = reverse_engineer(model, x, 10, CleanseConfig(steps=30, batch_size=32), classes=[3, 0])  # class 0 is second
    clean = stamped_success_rate(model, x_test[y_test != 0], 0, lambda z: z)
    assert clean < 0.05 and reversed_trigger_success(model, rev, 0, x_test, y_test) >= 0.9


def test_restarts_keep_each_class_its_smallest_successful_start(backdoored):
    """Start 0 of a search with restarts is the single search (same seeded start, same steps),
    and each class keeps the smallest mask any of its starts reached."""
    model, x = backdoored
    cfg = CleanseConfig(steps=12, batch_size=32, seed=3)
    single = reverse_engineer(model, x, 10, cfg, classes=[0, 6])
    several = reverse_engineer(model, x, 10, dataclasses.replace(cfg, restarts=3, keep_best_after=0), classes=[0, 6])
    assert several.start_norms.shape == (2, 3)
    assert np.allclose(several.start_norms[:, 0], np.where(single.reached, single.norms, np.inf), rtol=1e-4)
    assert np.allclose(several.norms, several.start_norms.min(1), rtol=1e-6) and np.all(
        several.norms <= single.norms + 1e-4
    )
    assert len(set(np.round(several.start_norms[1], 3))) > 1  # the starts differ
    assert several.images == 3 * single.images == 3 * 12 * 2 * 128


def test_successive_halving_goes_on_from_the_best_start_alone(backdoored):
    model, x = backdoored
    cfg = CleanseConfig(steps=10, batch_size=32, seed=3, restarts=4, keep_best_after=3, early_stop_patience=10**6)
    rev = reverse_engineer(model, x, 10, cfg, classes=[2])
    assert rev.images == (4 * 3 + 7) * 128  # four starts for 3 rounds, then one for the remaining 7
    assert rev.rounds.tolist() == [10] and rev.norms[0] == rev.start_norms[0].min()


def _benchmark(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_schedule_replayed_from_a_wide_trace_is_the_search_with_that_schedule(backdoored):
    """benchmarks/cleanse_convergence.py reads schedules off one wide search's trace: the
    starts are independent rows, so a schedule replayed from the trace must give the norms and
    the cost of the search run with it."""
    model, x = backdoored
    cfg = CleanseConfig(steps=12, batch_size=32, seed=3, patience=2, early_stop_patience=4)
    best, success, ran = [], [], []
    reverse_engineer(
        model,
        x,
        10,
        dataclasses.replace(cfg, restarts=4, keep_best_after=0),
        classes=[0, 6],
        on_round=lambda step, norms, rate, rounds: (best.append(norms), success.append(rate), ran.append(rounds)),
    )
    assert len(best) == 12 and np.isfinite(best[-1]).all() and not np.isfinite(best[2]).all()  # a start without success
    replay = _benchmark("cleanse_convergence").replay
    for restarts, keep_after in ((4, 3), (2, 5), (4, 0), (1, 0)):
        run = reverse_engineer(
            model, x, 10, dataclasses.replace(cfg, restarts=restarts, keep_best_after=keep_after), classes=[0, 6]
        )
        norms, rows = replay({"best": best, "success": success, "rounds": ran}, 4, restarts, keep_after, 12)
        assert np.allclose(norms, run.norms, rtol=1e-6), (restarts, keep_after)
        assert rows * len(x) == run.images, (restarts, keep_after)


# three rounds leave some classes with no successful mask (norm inf), and the table's MAD of them warns
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_the_convergence_trace_of_every_model_seeds_each_search_with_the_offset(
    backdoored, tmp_path, monkeypatch, capsys
):
    """cleanse_convergence.py --cells all --seed-offset N traces every model folder, each searched
    with its training seed plus N (as cleanse_matrix.py --search-seeds seeds it), keyed apart from
    the offset-0 traces; --searches 2 replays the two as twml cleanse's two searches that must agree."""
    import json

    from twml_cli.models import save_model

    model, _ = backdoored
    save_model(model, tmp_path / "models" / "seed3-clean")
    bench = _benchmark("cleanse_convergence")
    search = {"search_images": 64}
    ROUNDS = "10"  # enough for every class's trigger to succeed: a class without one has no norm to replay
    threads = torch.get_num_threads()
    try:
        for offset in (0, 1000):
            argv = ["--models", str(tmp_path / "models"), "--cells", "all", "--starts", "4", "--rounds", ROUNDS]
            argv += ["--seed-offset", str(offset), "--search", json.dumps(search), "--out", str(tmp_path / "out")]
            monkeypatch.setattr(sys, "argv", ["cleanse_convergence.py", *argv, "--schedules", f"4/0/{ROUNDS}"])
            assert bench.main() == 0
        folder = tmp_path / "models" / "seed3-clean"
        expected = {offset: bench.record(folder, 3 + offset, 4, int(ROUNDS), search)["best"] for offset in (0, 1000)}
    finally:
        torch.set_num_threads(threads)
    traces = [json.loads(line) for line in (tmp_path / "out" / "traces.jsonl").read_text().splitlines()]
    assert [json.loads(t["key"])[0] for t in traces] == ["seed3-clean", "seed3-clean"]
    assert [len(json.loads(t["key"])) for t in traces] == [4, 5]  # offset 0 keeps the keys traces always had
    for trace, offset in zip(traces, (0, 1000)):
        assert trace["trace"]["best"] == expected[offset]
    assert expected[0] != expected[1000]

    # --searches 2: the two traces replayed as twml cleanse's two searches that must agree
    def agree(out: str) -> int:
        argv = ["--models", str(tmp_path / "models"), "--cells", "all", "--starts", "4", "--rounds", ROUNDS]
        argv += ["--search", json.dumps(search), "--out", str(tmp_path / out), "--schedules", f"4/0/{ROUNDS}"]
        monkeypatch.setattr(sys, "argv", ["cleanse_convergence.py", *argv, "--searches", "2"])
        return bench.main()

    capsys.readouterr()
    assert agree("out") == 0
    row = capsys.readouterr().out.splitlines()[-1].split(" | ")
    from twml_cli import config
    from twml_cli.studies import cleanse as study

    own = {**search, "search_restarts": 4, "search_keep_best_after": 0, "search_steps": int(ROUNDS), "searches": 2}
    s = config.resolve_one("cleanse", config.load_preset(), {"seed": 3, "model_runs": [str(folder)], **own})
    try:
        torch.set_num_threads(1)
        (ins,) = study.compute(study.prepare(s)).inspections
    finally:
        torch.set_num_threads(threads)
    assert np.isfinite(ins.anomaly_index) and ins.anomaly_index > 0
    assert row[6] == f"{ins.anomaly_index:.2f}{' flagged' if ins.flagged.any() else ''}"  # the clean model's index
    with pytest.raises(SystemExit, match="first trace these models with --seed-offset 1000"):
        agree("fresh")  # traces offset 0 there, then needs the second search's recorded first


@pytest.mark.parametrize("channels", [1, 3])
def test_the_matrix_s_planted_trigger_control_stamps_as_the_backdoor_does(channels):
    """cleanse_matrix.py --planted-trigger repairs with the planted trigger in the reversed ones'
    (mask, pattern) form: stamped, it must give exactly the backdoor's images, its mask's L1 norm
    the planted norm the ratios divide by."""
    cm = _benchmark("cleanse_matrix")
    x = torch.rand(4, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    for position, size in itertools.product(cm.POSITIONS, (1, 2)):
        mask, pattern = cm.planted_trigger(cm.Cell(0, position, 3, size), (channels, 8, 8))
        assert mask.shape == (8, 8) and pattern.shape == (channels, 8, 8)
        assert torch.equal(stamp(x, mask, pattern), Trigger(size, position).apply(x)), (position, size)
        assert mask.sum().item() == cm.planted_norm(size, position)


def test_the_matrix_measures_each_planted_trigger_on_the_clean_model_of_its_own_seed(tmp_path):
    """cleanse_matrix.py's clean_success: each planted cell's trigger on the clean model trained
    with the cell's seed (the floor a repair can reach), none where that seed has no clean model.
    The two clean models here answer one class whatever the image (3 for seed 0, 7 for seed 1), so
    a trigger sends every other class's image to that class and none to any other."""
    from twml_cli.data import describe, load_dataset
    from twml_cli.models import save_model

    cm = _benchmark("cleanse_matrix")
    info = describe("digits", *load_dataset("digits"))
    for seed, answer in ((0, 3), (1, 7)):
        model = create_model(ModelSpec.for_data("test_byobnet", info))
        head = model.backbone.get_classifier()
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(10.0 * torch.nn.functional.one_hot(torch.tensor(answer), 10))
        folder = tmp_path / "models" / "threads1" / cm.Cell(seed).name
        save_model(model, folder)
        settings = cm.key(cm._resolved("train", seed=seed, pgd_steps=1, dataset="digits"))
        (folder / "facts.json").write_text(json.dumps({"accuracy": 0.1, "settings": settings}))
    planted = [cm.Cell(s, "top-left", t, 2) for s in (0, 1, 2) for t in (0, 3, 7)]
    threads = torch.get_num_threads()
    try:
        floor = cm.clean_success(tmp_path, [cm.Cell(0), cm.Cell(1), *planted], 1, 1)
    finally:
        torch.set_num_threads(threads)  # clean_success sets the thread count of the process it runs in
    assert floor == {c: float(c.target == {0: 3, 1: 7}[c.seed]) for c in planted if c.seed < 2}


def test_the_matrix_says_whether_the_search_found_the_planted_trigger_or_another():
    """cleanse_matrix.py's planted_share: the share of a reversed mask's weight on the planted
    pixels (1 for the planted trigger itself, 0 for a trigger elsewhere); where_found counts, over
    the corner cells, the searches that found another trigger and how their repairs fared."""
    cm = _benchmark("cleanse_matrix")
    corner, two, centre = cm.Cell(0, "top-right", 3, 1), cm.Cell(1, "bottom-left", 7, 2), cm.Cell(2, "centre", 0, 1)
    planted = cm.planted_trigger(corner, (1, 8, 8))[0].numpy()
    elsewhere = np.zeros((8, 8), dtype=np.float32)
    elsewhere[3, 3] = 0.8
    assert cm.planted_share(planted, corner) == 1.0 and cm.planted_share(elsewhere, corner) == 0.0
    assert cm.planted_share(planted + elsewhere / 0.8 * 3, corner) == pytest.approx(0.25)
    assert cm.planted_share(cm.planted_trigger(two, (1, 8, 8))[0].numpy(), two) == 1.0
    assert cm.planted_share(planted, two) == 0.0  # the top-right pixel is not the bottom-left square
    rows = [
        {"cell": corner.name, "position": "top-right", "detected": True, "repair_attack_success": 0.12},
        {"cell": two.name, "position": "bottom-left", "detected": True, "repair_attack_success": 0.01},
        {"cell": centre.name, "position": "centre", "detected": True, "repair_attack_success": 0.5},
    ]
    lines = cm.where_found({corner: [0.0, 0.05], two: [1.0, 0.0], centre: [0.0, 0.0]}, rows)
    assert "median share of its weight 0.03; under 10%, another trigger of the target, in 3 of 4 searches" in lines[0]
    assert lines[0].endswith("in every search of 1 of 2 cells")  # the centre is left out
    assert lines[1].endswith("another trigger in every search: 1 of 1; the others: 0 of 1")


def test_the_matrix_can_search_in_bf16_on_a_cpu_as_on_cuda(backdoored, monkeypatch):
    """benchmarks/cleanse_matrix.py --cpu-bf16: the search's forward passes under bf16 autocast
    on the CPU, which moves the norms a little (a GPU's precision), not the search."""
    from twml_cli import cleanse

    model, x = backdoored
    cfg = CleanseConfig(steps=20, batch_size=32, seed=1)
    fp32 = reverse_engineer(model, x, 10, cfg, classes=[0, 5])
    monkeypatch.setattr(cleanse, "autocast", cleanse.autocast)  # put back after the test
    _benchmark("cleanse_matrix").bf16_on_cpu()
    with cleanse.autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    bf16 = reverse_engineer(model, x, 10, cfg, classes=[0, 5])
    assert not np.array_equal(bf16.norms, fp32.norms)
    assert np.allclose(bf16.norms, fp32.norms, rtol=0.2), (bf16.norms, fp32.norms)
    assert np.argmin(fp32.norms) == np.argmin(bf16.norms) == 0  # the backdoor's target keeps the smaller trigger


def test_searches_agree_by_majority():
    """benchmarks/cleanse_matrix.py's verdict of several searches: a class is flagged when at
    least `agree` of them flag it; the target's index is their median; the time is that of the
    searches twml cleanse runs, which stops once no further search could change the verdict."""
    agreement = _benchmark("cleanse_matrix").agreement

    def row(flagged, index):
        return {"position": "top-left", "target": 3, "norms": [1.0] * 10, "flagged": flagged, "largest_index": index,
                "target_index": index, "norm_ratio": 1.0, "cleanse_s": 1.0}  # fmt: skip

    searches = [[row([3, 8], 4.0)], [row([3], 2.5)], [row([8], 1.0)]]
    (majority,) = agreement(searches, 2)
    assert majority["flagged"] == [3, 8] and not majority["detected"] and majority["target_index"] == 2.5
    assert majority["searches"] == 3 and majority["cleanse_s"] == 3.0  # the first two differ on class 8
    (all_three,) = agreement(searches, 3)
    assert all_three["flagged"] == [] and not all_three["detected"]
    assert all_three["searches"] == 3  # the first two both flag class 3: the third decides it
    (two,) = agreement(searches[:2], 2)
    assert two["flagged"] == [3] and two["detected"] and two["target_index_range"] == [2.5, 4.0]
    assert two["cleanse_s"] == 2.0 and two["searches"] == 2
    (settled_early,) = agreement(searches[::-1], 3)  # the first flags only 8, the second only 3: settled
    assert settled_early["flagged"] == [] and settled_early["searches"] == 2 and settled_early["cleanse_s"] == 2.0
    (first_flags_none,) = agreement([[row([], 1.0)], searches[1]], 2)
    assert first_flags_none["flagged"] == [] and first_flags_none["searches"] == 1


def test_searches_pooled_by_their_smallest_or_mean_norm():
    """benchmarks/cleanse_matrix.py --pool: the paper's MAD test on each class's smallest (or mean)
    norm over the searches."""
    pooled = _benchmark("cleanse_matrix").pooled
    base = [10.0, 11.0, 12.0, None, 10.0, 11.0, 12.0, 10.0, 11.0, 12.0]

    def row(target_norm):
        norms = [target_norm if v is None else v for v in base]
        return {"position": "top-left", "target": 3, "size": 1, "norms": norms, "flagged": [], "cleanse_s": 1.0}

    searches = [[row(2.0)], [row(20.0)]]  # class 3 small in one search only
    (smallest,) = pooled(searches, "min")
    assert smallest["flagged"] == [3] and smallest["detected"] and smallest["norm_ratio"] == 2.0
    assert smallest["target_index"] == pytest.approx(9 / 1.4826)  # median 11, MAD 1: (11 - 2) / 1.4826
    (mean,) = pooled(searches, "mean")
    assert mean["flagged"] == [] and not mean["detected"] and mean["norms"][3] == 11.0
    assert mean["cleanse_s"] == 2.0 and mean["searches"] == 2


def test_the_matrix_bound_puts_the_target_at_the_planted_norm_then_at_zero():
    """benchmarks/cleanse_matrix.py's bound: the MAD test with the target's norm replaced, the other
    classes' kept. A narrow model is detected at the planted norm though its search found 8; a wide
    one is not, even at 0 (its ceiling, 1.48); a second class stays flagged whatever the target's norm."""
    bound = _benchmark("cleanse_matrix").bound

    def row(target, size, norms):
        return {"position": "top-left", "target": target, "size": size, "norms": norms}

    narrow = row(3, 2, [10.0, 11, 12, 8, 10, 11, 12, 10, 11, 12])  # the search stopped at 8; planted 4: index 4.72
    wide = row(9, 1, [4.0, 6, 8, 10, 12, 14, 16, 18, 20, 3])  # median 11, MAD 7.41
    second = row(3, 1, [10.0, 11, 12, 5, 10, 11, 12, 10, 11, 2])  # class 9 as anomalous as the target
    assert bound([narrow, wide, second, {"position": None}], 2.0) == [
        "with the target's norm put to the planted mask's (a search that finds exactly the planted trigger), the other "
        "classes' as searched: detected 1 (33.3%), a second class in 1; put to 0: detected 1 (33.3%), a second class "
        "in 1"
    ]
    assert bound([narrow], 5.0)[0].endswith("detected 0 (0.0%), a second class in 0; put to 0: detected 1 (100.0%), "
                                             "a second class in 0")  # fmt: skip


def test_the_matrix_says_why_each_missed_cell_was_missed():
    """benchmarks/cleanse_matrix.py's misses, for two searches that must agree: a second class
    flagged; the target under the threshold even at the planted norm; flagged there, but neither
    the planted trigger (short of the search's threshold) nor the search reached that norm (a mask
    that never reached the threshold does not count, however small); or flagged there and
    reachable, so the search's. A detected cell is not a miss."""
    cm = _benchmark("cleanse_matrix")
    narrow = [10.0, 11, 12, 8, 10, 11, 12, 10, 11, 12]  # class 3 at 8; at the planted 4 its index is 4.72
    wide = [4.0, 6, 8, 8, 12, 14, 16, 18, 20, 3]  # at the planted 4 class 3's index is 0.67

    def search(cell, norms, flagged, success=1.0, size=2, reached=True):
        return {"cell": cell, "position": "top-left", "target": 3, "size": size, "norms": norms, "flagged": flagged,
                "largest_index": 1.0, "target_index": 1.0, "norm_ratio": norms[3] / size**2, "target_reached": reached,
                "planted_search_success": success, "cleanse_s": 1.0}  # fmt: skip

    first = [
        search("found", narrow, [3]),
        search("second", narrow, [3, 8]),
        search("mad", wide, []),
        search("short", narrow, [], success=0.98),
        search("search", narrow, []),
        search("found smaller", [*narrow[:3], 3.0, *narrow[4:]], [3], success=0.98),  # ratio 0.75: within reach
        search("never reached", [*narrow[:3], 3.0, *narrow[4:]], [], success=0.98, reached=False),
    ]
    second = [
        search("found", narrow, [3]),
        search("second", narrow, [3, 8]),
        search("mad", narrow, [3]),  # one search flags it, the other cannot even at 4
        search("short", narrow, [3]),
        search("search", narrow, [3]),
        search("found smaller", narrow, []),
        search("never reached", narrow, [3]),
    ]
    runs = [first, second]
    rows = cm.agreement(runs, 2)
    missed = cm.misses(runs, rows, 2, 0.99, 2.0)
    assert {m["cell"]: m["why"] for m in missed} == {
        "second": "second class",
        "mad": "MAD",
        "short": "unreachable",
        "search": "search",
        "found smaller": "search",
        "never reached": "unreachable",
    }
    assert missed[2]["planted_success"] == [0.98, 1.0] and missed[2]["ratio"] == [2.0, 2.0]
    lines = cm.why_missed(runs, rows, 2, 0.99, 2.0)
    assert lines[0] == (
        "missed: 6 of 7; another class flagged: 1; under the threshold even at the planted norm: 1; the planted "
        "trigger short of the search's threshold, and nothing as small found: 2; the search's (at the planted norm, "
        "which the planted trigger reaches, it would be flagged): 2"
    )
    assert "| short | unreachable | 0.9800, 1.0000 | 1.00, 1.00 | 2.00, 2.00 | - |" in lines
    assert cm.why_missed(runs[:1], cm.agreement(runs[:1], 1)[:1], 1, 0.99, 2.0) == []  # nothing missed


@pytest.mark.e2e  # trains a model and searches it twice
def test_the_matrix_keeps_each_searchs_planted_success_and_says_why_a_cell_was_missed(tmp_path):
    """cleanse_matrix.py end to end on one planted cell (no clean model), with a short search:
    each of its two searches keeps the planted trigger's success on its own images, which
    planted_success (for rows searched before they kept it) gives again; a missed cell gets a
    reason in the summary."""
    import json
    import subprocess

    cm = _benchmark("cleanse_matrix")
    search = {"search_steps": 8}
    out = subprocess.run(
        [sys.executable, cm.__file__, "--positions", "top-left", "--targets", "3", "--sizes", "1", "--seeds", "0",
         "--clean-seeds", "", "--threads", "1", "--out", str(tmp_path), "--search", json.dumps(search)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    rows = [json.loads(line)["row"] for line in lines if '"position": "top-left"' in line]
    assert [r["search_seed"] for r in rows] == [0, 1000]  # the default's two searches
    cell = cm.Cell(0, "top-left", 3, 1)
    threads = torch.get_num_threads()
    try:  # planted_success sets the thread count, as in a worker of the matrix
        for r, offset in zip(rows, (0, 1000)):
            assert 0 <= r["planted_search_success"] <= 1 and isinstance(r["target_reached"], bool)
            assert cm.planted_success(tmp_path, cell, 1, 1, search, offset, "digits") == r["planted_search_success"]
    finally:
        torch.set_num_threads(threads)
    votes = np.bincount([c for r in rows for c in r["flagged"]], minlength=10)
    detected = np.flatnonzero(votes >= 2).tolist() == [3]  # both searches must flag the target
    reasons = [line for line in out.splitlines() if line.startswith("missed: 1 of 1; ")]
    assert len(reasons) == (0 if detected else 1), out


def test_the_matrix_rechecks_a_repaired_model_with_twml_cleanses_verdict(backdoored, tmp_path):
    """cleanse_matrix.py --recheck: the verdict twml cleanse gives a model (here the backdoored one
    itself; in the matrix, each repaired model), its searches seeded with the cell's training seed,
    with the matrix's search settings, both of two agreeing; and the target's agreed index."""
    from twml_cli import models
    from twml_cli.studies import cleanse

    cm = _benchmark("cleanse_matrix")
    model, _ = backdoored
    search = {"search_steps": 6, "search_images": 64}
    row = cm.recheck_verdict(model, cm.Cell(3, "bottom-right", 0, 2), search, "digits")
    folder = models.save_model(model, tmp_path / "model")
    s = cm._settings("cleanse", seed=3, model_runs=[str(folder)], dataset="digits", **search)
    assert (s.searches, s.votes_needed) == (2, 2)
    (ins,) = cleanse.compute(cleanse.prepare(s)).inspections
    assert row["recheck_flagged"] == np.flatnonzero(ins.flagged).tolist()
    assert row["recheck_target_index"] == round(float(ins.agreed_index[0]), 3) != 0
    assert row["recheck_indices"] == [round(float(i), 3) for i in ins.agreed_index]
    norms = [ins.reversed.norms, *(m.reversed.norms for m in ins.more)]
    assert len(row["recheck_norms"]) == len(norms) == (2 if ins.tests[0].flagged.any() else 1)
    for kept, searched in zip(row["recheck_norms"], norms):
        np.testing.assert_allclose(kept, searched, rtol=0, atol=5e-4)  # each search's norms, to 3 decimals
    other = cm.recheck_verdict(model, cm.Cell(4, "bottom-right", 0, 2), search, "digits")
    assert other["recheck_target_index"] != row["recheck_target_index"]  # another seed, other searches


def test_lambda_schedule_stops_a_class_early(backdoored):
    model, x = backdoored
    rev = reverse_engineer(
        model, x[:64], 10, CleanseConfig(steps=400, batch_size=64, patience=2, early_stop_patience=4), classes=[0]
    )
    assert rev.reached[0] and rev.rounds[0] < 400


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps"),
        ({"threshold": 0}, "threshold"),
        ({"cost_multiplier": 1.0}, "multiplier"),
        ({"restarts": 0}, "restarts"),
        ({"early_stop_threshold": 1.5}, "early-stop threshold"),
    ],
)
def test_cleanse_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CleanseConfig(**kwargs)


def test_the_matrix_keys_an_npz_by_its_bytes(tmp_path, monkeypatch):
    """cleanse_matrix.py --dataset FILE.npz: the file by its absolute path, its models kept under
    its name and the hash of its bytes (a changed file trains anew); the embedded sets as before."""
    import argparse

    cm = _benchmark("cleanse_matrix")
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "mine.npz", x_train=np.zeros((2, 8, 8), np.uint8))
    assert cm.dataset_arg("mine.npz") == str(tmp_path / "mine.npz")
    assert cm.dataset_arg("digits") == "digits" and cm._data_kind("digits") == ""
    assert cm._data_kind("digits16") == "digits16-"
    before = cm._data_kind(str(tmp_path / "mine.npz"))
    np.savez(tmp_path / "mine.npz", x_train=np.ones((2, 8, 8), np.uint8))
    after = cm._data_kind(str(tmp_path / "mine.npz"))
    assert before.startswith("mine-") and after.startswith("mine-") and before != after
    for bad in ("missing.npz", "mnist", "mine.txt"):
        with pytest.raises(argparse.ArgumentTypeError, match="use digits, digits16 or an existing .npz file"):
            cm.dataset_arg(bad)


def test_the_matrix_counts_the_repairs_that_started_again():
    """cleanse_matrix.py's summary: repairs, and how many of them started again at half the rate
    (rows cached before the count was recorded say nothing of it)."""
    cm = _benchmark("cleanse_matrix")

    def row(restarts=None, success=0.01, change=0.0):
        r = {"position": "top-left", "size": 1, "target": 3, "detected": True, "flagged": [3], "norm_ratio": 1.0}
        r |= {"cleanse_s": 1.0, "repair_attack_success": success, "repair_accuracy_change": change}
        return r if restarts is None else {**r, "repair_restarts": restarts}

    (line,) = [x for x in cm.summary([row(1), row(0), row(0, 0.2), row(2, change=-0.02)]) if x.startswith("unlearning")]
    assert line.startswith("unlearning: 2 of 4 repaired") and line.endswith("after losing the clean training images: 2")
    (line,) = [x for x in cm.summary([row(), row()]) if x.startswith("unlearning")]
    assert "started again" not in line


def test_the_matrix_reads_a_filters_repairs_by_what_it_rejects(tmp_path):
    """cleanse_matrix.py --mitigate with the input filter: its accuracy counts the clean images it
    rejects, so the summary says what it rejects and what trigger passes it, not how many models
    lost a point; and it refuses --recheck, whose search would find the model as it was."""
    import subprocess

    cm = _benchmark("cleanse_matrix")

    def row(real, clean, success):
        r = {"position": "top-left", "size": 1, "target": 3, "detected": True, "flagged": [3], "norm_ratio": 1.0}
        return (
            r
            | {"cleanse_s": 1.0, "repair_attack_success": success, "repair_accuracy_change": -clean}
            | {"repair_real_rejected": real, "repair_clean_rejected": clean}
        )

    rows = [row(0.99, 0.05, 0.01), row(0.5, 0.03, 0.4), row(0.97, 0.07, 0.02)]
    lines = cm.summary(rows, "filtering")
    (line,) = [x for x in lines if x.startswith("filtering")]
    assert line == (
        "filtering: test images carrying the planted trigger rejected, median 0.9700 (lowest 0.5000, under 0.95 in 1 "
        "of 3); clean test images rejected, median 0.0500 (0.0300 to 0.0700); attack success after above 0.05 in 1 "
        "(largest 0.4000)"
    )
    refused = subprocess.run(
        [sys.executable, cm.__file__, "--mitigate", "--recheck", "--unlearn", '{"mitigation": "filter"}',
         "--out", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "a filter leaves the model as it was" in refused.stderr
    assert not (tmp_path / "m").exists()  # refused before any model was trained


def test_the_matrix_estimates_a_repairs_normalization_statistics_again_on_clean_images():
    """cleanse_matrix.py --renormalize: a copy of the model whose BatchNorm statistics are the plain
    mean of the batches' statistics over the given images, its weights and the model untouched;
    and its summary line."""
    cm = _benchmark("cleanse_matrix")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)).eval()
    norm = model[1]
    norm.running_mean.fill_(5.0)
    norm.running_var.fill_(9.0)
    norm.num_batches_tracked.fill_(1000)  # as trained
    x = torch.randn(300, 1, 4, 4) * 3 + 1
    again = cm.renormalized(model, x, batch_size=128)
    with torch.no_grad():
        h = model[0](x)
    batches = [h[s : s + 128] for s in (0, 128, 256)]  # 128, 128 and 44 images, each batch weighted alike
    means = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(again[1].running_mean, means, atol=1e-5)
    assert torch.allclose(again[1].running_var, variances, atol=1e-4)
    assert not again.training and not again[1].training
    assert torch.equal(again[0].weight, model[0].weight) and norm.running_mean.eq(5.0).all()  # the model as it was
    rows = [
        {"position": "top-left", "size": 1, "target": 3, "detected": True, "flagged": [3], "norm_ratio": 1.0}
        | {"cleanse_s": 1.0, "repair_attack_success": 0.0, "repair_accuracy_change": 0.0}
        | {"renormalized_attack_success": a, "renormalized_accuracy_change": c}
        for a, c in ((0.5, -0.01), (0.02, 0.0), (0.2, 0.01))
    ]
    (line,) = [x for x in cm.summary(rows) if "estimated again" in x]
    assert "above 0.05 in 2 of 3 (median 0.2000, 0.0200 to 0.5000)" in line and line.endswith("(median +0.0000)")
