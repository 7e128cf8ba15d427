"""Each study's three steps without MLflow: compute() on small budgets, record() into a
recording Run, summarize()."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from twml_cli import config, models, results
from twml_cli.studies import attack, backdoor, cleanse, smooth, train

PRESET = config.load_preset()


class RecordingRun:
    """A Run that keeps what a study records (the Run protocol of studies/common.py)."""

    id = "0" * 32

    def __init__(self, tmp: Path):
        self.params, self.metrics, self.series, self.tags, self.files, self.models = {}, {}, {}, {}, set(), []
        self.tmp = tmp

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=0):
        self.metrics.update(metrics)

    def log_series(self, name, steps, values):
        self.series.setdefault(name, {}).update(zip(steps, values))

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_dir(self, path, artifact_path=None):
        self.files |= {p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file()}

    def log_model(self, model, register=""):
        self.models.append(model)


def settings(command: str, **changes):
    return dataclasses.replace(config.resolve(command, PRESET)[0], **changes)


@pytest.fixture(scope="module")
def quick_train():
    """Free training, 4 epochs: enough to exercise every step."""
    return train.compute(train.prepare(settings("train", method="free", m=2, epochs=4, pgd_steps=2)))


def test_train_outcome_records_the_schema(quick_train, tmp_path):
    run = RecordingRun(tmp_path)
    train.record(run, quick_train)
    assert set(run.metrics) == {f.name for f in dataclasses.fields(results.TrainingMetrics)} | {
        f.name for f in dataclasses.fields(results.RobustnessMetrics)
    }
    assert (
        run.metrics["sgd_steps"] == quick_train.training.steps == 2 * 2 * 12
    )  # 2 passes x 2 replays x ceil(1437 / 128)
    assert sorted(run.series[results.TRAIN_LOSS]) == [2, 4]  # step = epochs of SGD budget
    assert run.metrics["passes_per_step"] == 1 and run.metrics["stopped_early"] == 0
    assert run.models == [quick_train.model] and not quick_train.model.training
    training, robustness = train.metrics(quick_train)
    assert results.metrics(robustness) == {k: run.metrics[k] for k in results.metrics(robustness)}
    assert robustness.robust_accuracy == pytest.approx(1 - robustness.pgd_success_rate)


def test_train_summary_reads_like_the_write_up(quick_train):
    lines = train.summarize(quick_train)
    assert lines[0].startswith("Time (in seconds) to complete free adversarial training (m=2): ")
    assert lines[1] == f"Model accuracy: {quick_train.robustness.accuracy:.4f}"
    assert lines[2].startswith("Success rate of untargeted white-box PGD (eps=0.1, 2 steps, 1 restart): ")


def test_compute_is_deterministic_on_cpu(quick_train):
    again = train.compute(train.prepare(quick_train.settings))
    assert again.robustness == dataclasses.replace(quick_train.robustness, attack_time_s=again.robustness.attack_time_s)
    first, second = quick_train.robustness.examples, again.robustness.examples
    assert first.keys() == second.keys() and all(
        np.array_equal(first[k], second[k], equal_nan=k.endswith("margin")) for k in first
    )
    assert [h.loss for h in again.training.history] == [h.loss for h in quick_train.training.history]


def test_attack_on_a_model_folder_uses_the_models_data(quick_train, tmp_path):
    folder = models.save_model(quick_train.model, tmp_path / "m")
    s = config.resolve_one("attack", PRESET, {"model_run": str(folder), "pgd_steps": 2})
    assert s.dataset == ""  # the model's own, unless --dataset is given
    inputs = attack.prepare(s)
    assert inputs.settings.dataset == "digits" and attack.extra_params(inputs)["model_path"] == str(folder.resolve())
    outcome = attack.compute(inputs)
    assert outcome.robustness.accuracy == quick_train.robustness.accuracy  # the same weights, the same data


def test_smooth_compute_and_record(quick_train, tmp_path):
    folder = models.save_model(quick_train.model, tmp_path / "m")
    s = config.resolve_one("smooth", PRESET, {"model_run": str(folder), "sigma": [0.1], "n": 200, "num_examples": 12})
    outcome = smooth.compute(smooth.prepare(s))
    assert outcome.training is None and len(outcome.table["idx"]) == 12
    assert outcome.table["idx"].tolist() == np.linspace(0, 359, 12).round().astype(int).tolist()
    run = RecordingRun(tmp_path)
    smooth.record(run, outcome)
    assert {
        results.CERTIFY_CSV,
        results.CURVE_CSV,
        results.CURVE_FIGURE + ".png",
        results.CURVE_FIGURE + ".pdf",
    } <= run.files
    assert run.models == []  # given, not trained
    assert run.metrics["certified_accuracy"] == smooth.certified_at(outcome, [0])[0]
    assert set(smooth.table_metrics(outcome)) == {
        results.certified_accuracy_key(r) for r in (0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
    }
    assert outcome.max_radius == pytest.approx(
        0.1 * 1.825682, abs=1e-6
    )  # n = 200, alpha = 0.001: Phi^-1(0.001 ** (1/200))
    lines = smooth.summarize(outcome)
    assert lines[0] == "sigma = 0.1:" and "at most 0.1826 with this n and alpha" in lines[3]


def test_backdoor_and_cleanse_compute(tmp_path):
    poisoned = backdoor.compute(backdoor.prepare(settings("backdoor", epochs=6)))
    assert (
        poisoned.settings.trigger_size == 1 and poisoned.poisoned == 144
    )  # a tenth of the 8-pixel side; round(0.1 * 1437)
    clean, stamped, label = poisoned.example
    assert (
        label != 0
        and stamped[0, 7, 7] == 1.0
        and clean[0, 7, 7] != 1.0
        and torch.equal(stamped[..., :7, :], clean[..., :7, :])
    )
    assert backdoor.metrics(poisoned).attack_success_rate == poisoned.attack_success_rate
    folder = models.save_model(poisoned.model, tmp_path / "bad")
    s = config.resolve_one("cleanse", PRESET, {"model_runs": [str(folder)], "search_steps": 4, "search_images": 64})
    outcome = cleanse.compute(cleanse.prepare(s))
    (ins,) = outcome.inspections
    assert ins.reversed.norms.shape == (10,) and ins.accuracy == poisoned.accuracy
    run = RecordingRun(tmp_path)
    cleanse.record(run, outcome)
    assert run.tags[results.VERDICT_TAG] == outcome.verdict
    assert {
        results.NORMS_CSV,
        results.NORMS_FIGURE,
        results.MASK_GRID_FIGURE,
        results.REVERSED_NPZ,
        "masks/model0_class9_mask.png",
    } <= run.files
    assert run.metrics["model0_accuracy"] == poisoned.accuracy
    # two searches by default, both of which must flag a class; the second only where the first flags one
    ran = 2 if ins.tests[0].flagged.any() else 1
    assert len(ins.tests) == run.metrics["model0_searches_run"] == ran
    ceilings = sorted((t.median / t.mad for t in ins.tests), reverse=True)
    assert run.metrics["model0_anomaly_ceiling"] == ceilings[-1]  # the one every search run reaches
    table = cleanse.norms_table(outcome)
    assert table["class"].tolist() == list(range(10)) and table["norm"].tolist() == ins.reversed.norms.tolist()
    assert (
        cleanse.summarize(outcome)[0] == f"Accuracy of model 0 ({folder}): {poisoned.accuracy:.4f}"
    )  # a folder, named as given


def test_cleanse_searches_models_at_once_with_the_numbers_of_one_after_another(tmp_path, monkeypatch):
    """On a CPU at one intra-op thread, the models are searched at the same time, one per core,
    each on a thread of its own: every norm, mask, index and finding is the one it has alone."""
    from twml_cli import runtime

    poisoned = backdoor.compute(backdoor.prepare(settings("backdoor", epochs=2)))
    other = models.create_model(poisoned.model.spec)
    folders = [str(models.save_model(m, tmp_path / n)) for n, m in (("bad", poisoned.model), ("other", other))]
    s = config.resolve_one("cleanse", PRESET, {"model_runs": folders, "search_steps": 4, "search_images": 64})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = cleanse.prepare(s)
        monkeypatch.setattr(runtime, "machine_cores", lambda: (2, 1))
        together = cleanse.compute(inputs)
        monkeypatch.setattr(runtime, "machine_cores", lambda: (1, 1))
        apart = cleanse.compute(inputs)
        torch.set_num_threads(2)  # a search on two intra-op threads: one model after another
        assert cleanse.models_at_once(inputs) == 1
    finally:
        torch.set_num_threads(before)
    assert (together.at_once, apart.at_once) == (2, 1)
    for a, b in zip(together.inspections, apart.inspections, strict=True):
        assert a.source == b.source and a.accuracy == b.accuracy and len(a.tests) == len(b.tests)
        for x, y in zip([a.reversed, *(m.reversed for m in a.more)], [b.reversed, *(m.reversed for m in b.more)]):
            assert np.array_equal(x.norms, y.norms) and torch.equal(x.masks, y.masks)
            assert torch.equal(x.patterns, y.patterns)
        assert np.array_equal(a.signed_indices, b.signed_indices)
    assert together.findings == apart.findings and together.verdict == apart.verdict
    run = RecordingRun(tmp_path)
    cleanse.record(run, together)
    assert run.params[results.MODELS_AT_ONCE] == 2


def _outlier_tests(*norms):
    from twml_cli.cleanse import mad_outlier_test

    return [mad_outlier_test(n) for n in norms]


def test_several_searches_flag_a_class_when_enough_of_them_do():
    """--searches: the verdict is a vote of independent searches (all of them, or more than half),
    and a class's agreed index (the one that many searches reach) lies above the threshold exactly
    when it is flagged."""
    base = np.array([10.0, 11, 12, 9, 10.5, 11.5, 12.5, 9.5, 10.2, 11.2])
    low3, low3_and_8 = base.copy(), base.copy()
    low3[3] = 2.0  # class 3 far below the others
    low3_and_8[3], low3_and_8[8] = 2.0, 6.0  # and class 8 too, in one search only
    tests = _outlier_tests(low3_and_8, low3, base)

    def inspection(first, *more, needed=1):
        return cleanse.Inspection("m", 1.0, None, first, 0.0, [cleanse.Search(None, t) for t in more], needed)

    majority = inspection(*tests, needed=2)
    assert majority.votes.tolist() == [0, 0, 0, 2, 0, 0, 0, 0, 1, 0]
    assert np.flatnonzero(majority.flagged).tolist() == [3]  # 2 of 3; class 8: 1 of 3
    assert majority.agreed_index[3] == sorted(t.anomaly_index[3] for t in tests)[1]  # the median of three
    assert majority.anomaly_index == majority.agreed_index[3]
    unanimous = inspection(*tests, needed=3)
    assert not unanimous.flagged.any() and unanimous.anomaly_index < 2.0  # the third search does not flag 3
    for ins in (majority, unanimous, inspection(tests[1], tests[0], needed=2)):
        assert (ins.flagged == (ins.agreed_index > 2.0)).all()
    one = inspection(tests[0])  # a single search: the paper's test as it is
    assert (one.flagged == tests[0].flagged).all() and one.anomaly_index == tests[0].anomaly_index[3]
    settings = config.resolve_one("cleanse", PRESET, {})  # the default: two searches, both must flag a class
    assert settings.searches == 2 and settings.votes_needed == 2
    three = dataclasses.replace(settings, searches=3)  # --searches 3: two of three, or all three
    assert three.votes_needed == 2 and dataclasses.replace(three, agreement="all").votes_needed == 3


def test_a_search_that_cannot_change_the_verdict_is_not_run(digits, tmp_path, monkeypatch):
    """Searches stop once the verdict is decided: two that must both flag a class stop after a first
    that flags none; three of which two must agree run the third only where the first two differ.
    The verdict and the agreed index are those of the searches run."""
    from types import SimpleNamespace

    base = np.array([10.0, 11, 12, 9, 10.5, 11.5, 12.5, 9.5, 10.2, 11.2])
    low3 = base.copy()
    low3[3] = 2.0
    norms: list[np.ndarray] = []

    def search(model, x, classes, cfg, progress=None):  # the norms of the next search, in turn
        searched.append(cfg.seed)
        return SimpleNamespace(norms=norms[len(searched) - 1])

    monkeypatch.setattr(cleanse.cleanse, "reverse_engineer_all", search)
    monkeypatch.setattr(cleanse.cleanse, "reversed_trigger_success", lambda *a: 1.0)
    folder = models.save_model(models.create_model(models.ModelSpec.for_data("test_byobnet", digits.info)), tmp_path)
    small = {"model_runs": [str(folder)], "search_images": 32}
    for given, options, run, flagged in (
        ([base, low3], {"searches": 2}, 1, []),  # the first flags nothing: the second could not add a class
        ([low3, base], {"searches": 2}, 2, []),
        ([low3, low3], {"searches": 2}, 2, [3]),
        ([low3, low3, base], {"searches": 3, "agreement": "majority"}, 2, [3]),  # two of three already agree
        ([base, base, low3], {"searches": 3, "agreement": "majority"}, 2, []),
        ([low3, base, low3], {"searches": 3, "agreement": "majority"}, 3, [3]),  # the third breaks the tie
        ([low3, base, base], {"searches": 3, "agreement": "majority"}, 3, []),
        ([low3, low3, base], {"searches": 3, "agreement": "all"}, 3, []),
        ([base, low3, low3], {"searches": 3, "agreement": "all"}, 1, []),
    ):
        norms[:], searched = given, []
        s = config.resolve_one("cleanse", PRESET, {**small, **options})
        (ins,) = cleanse.compute(cleanse.prepare(s)).inspections
        assert searched == [s.seed, s.seed + 1000, s.seed + 2000][:run], (given, options)
        assert np.flatnonzero(ins.flagged).tolist() == flagged and len(ins.tests) == run
        assert (ins.flagged == (ins.agreed_index > 2.0)).all()
        assert cleanse.settled([t.flagged for t in ins.tests], s.searches, s.votes_needed)
    assert not cleanse.settled([], 1, 1)


def test_cleanse_with_several_searches(tmp_path):
    """The first of several searches is the single search; each further one searches other images
    from other starts; norms.csv says how many flagged each class."""
    poisoned = backdoor.compute(backdoor.prepare(settings("backdoor", epochs=2)))
    folder = models.save_model(poisoned.model, tmp_path / "bad")
    small = {"model_runs": [str(folder)], "search_steps": 3, "search_images": 64}
    single = cleanse.compute(cleanse.prepare(config.resolve_one("cleanse", PRESET, {**small, "searches": 1})))
    inputs = cleanse.prepare(config.resolve_one("cleanse", PRESET, {**small, "searches": 3, "agreement": "majority"}))
    assert len(inputs.x_more) == 2 and not torch.equal(inputs.x_more[0], inputs.x_clean)
    outcome = cleanse.compute(inputs)
    (ins,) = outcome.inspections
    assert np.array_equal(ins.reversed.norms, single.inspections[0].reversed.norms)
    assert not np.array_equal(ins.more[0].reversed.norms, ins.reversed.norms)
    run = 2 if np.array_equal(ins.tests[0].flagged, ins.tests[1].flagged) else 3  # the third breaks a tie
    assert len(ins.tests) == run
    table = cleanse.norms_table(outcome)
    assert table["searches"].eq(run).all() and table["flagged_by"].tolist() == ins.votes.tolist()
    assert (table["anomaly_index_lowest"] <= table["anomaly_index_highest"]).all()
    assert ins.needed == 2 and table["flagged"].tolist() == (ins.votes >= 2).tolist()
    assert "flagged_by" not in cleanse.norms_table(single)  # a single search's norms.csv as it was


def test_cleanse_searches_the_split_it_is_told(digits, tmp_path):
    """--search-split test draws every search's clean images from the held-out split, as the
    authors' code does; the default, train, from the training images."""
    model = models.create_model(models.ModelSpec.for_data("test_byobnet", digits.info))
    folder = models.save_model(model, tmp_path / "m")
    small = {"model_runs": [str(folder)], "search_images": 64, "searches": 2}

    def rows(split: str) -> list[set[bytes]]:
        inputs = cleanse.prepare(config.resolve_one("cleanse", PRESET, {**small, "search_split": split}))
        return [{row.numpy().tobytes() for row in x} for x in (inputs.x_clean, *inputs.x_more)]

    train_rows, test_rows = ({row.numpy().tobytes() for row in d.x} for d in (digits.train, digits.test))
    for split, pool, other in (("train", train_rows, test_rows), ("test", test_rows, train_rows)):
        for drawn in rows(split):
            assert len(drawn) == 64 and drawn <= pool and not drawn & other, split


def test_cleanse_says_when_no_class_could_have_been_flagged():
    """A model whose norms spread so widely that even a norm of 0 stays under the threshold (the
    index's ceiling, median / MAD) is named in the summary; one that could have been flagged is not."""
    from types import SimpleNamespace

    wide = np.array([4.0, 6, 8, 10, 12, 14, 16, 18, 20, 3])  # median 11, MAD 1.4826 * 5: ceiling 1.48
    narrow = np.array([10.0, 11, 12, 9, 10.5, 11.5, 12.5, 9.5, 10.2, 11.2])  # ceiling about 10
    wide_test, narrow_test = _outlier_tests(wide, narrow)

    def inspection(norms, first, *more, needed=1):
        rev = SimpleNamespace(classes=list(range(10)), norms=norms)
        return cleanse.Inspection("m", 1.0, rev, first, 0.0, [cleanse.Search(rev, t) for t in more], needed)

    assert inspection(wide, wide_test).blind(2.0) and not inspection(narrow, narrow_test).blind(2.0)
    assert inspection(narrow, narrow_test, wide_test, needed=2).blind(2.0)  # both searches must be able to flag
    assert not inspection(narrow, narrow_test, wide_test, needed=1).blind(2.0)
    # the ceiling logged: the index `needed` of the searches could reach, the narrow one's alone when one suffices
    assert inspection(narrow, narrow_test, wide_test, needed=2).ceiling == wide_test.ceiling
    assert inspection(wide, wide_test, narrow_test, needed=1).ceiling == narrow_test.ceiling > 2
    s = config.resolve_one("cleanse", PRESET, {"model_runs": ["a", "b"]})
    lines = cleanse.summarize(cleanse.Outcome(s, [inspection(narrow, narrow_test), inspection(wide, wide_test)]))
    assert [line for line in lines if "could have been flagged" in line] == [
        "No class of model 1 could have been flagged: a trigger of norm 0 would have an anomaly index of 1.48 "
        "(median norm / MAD), not above 2"
    ]
    assert lines[-1].startswith("No backdoor found")
    lines = cleanse.summarize(cleanse.Outcome(s, [inspection(narrow, narrow_test, wide_test, needed=2)]))
    assert [line for line in lines if "could have been flagged" in line] == [
        f"No class of model 0 could have been flagged: a trigger of norm 0 would have an anomaly index of "
        f"{narrow_test.ceiling:.2f}, 1.48 in its 2 searches (median norm / MAD), above 2 in 1, fewer than the 2 needed"
    ]


def test_the_norms_figure_names_its_model_and_says_when_its_threshold_is_below_zero(tmp_path):
    """A model read from a folder is titled by the folder's name, a run by its id's first 8
    characters; a model whose threshold (median - 2 x 1.4826 MAD) is below 0 says so in its legend,
    where the line it cannot draw would be."""
    from twml_cli import figures

    run = "be5a1e18" + "0" * 24
    assert (
        cleanse._panel(run) == "be5a1e18" and cleanse._panel("/data/m16/seed2-top-left-t3-s1") == "seed2-top-left-t3-s1"
    )
    assert cleanse._panel("models:/twml-digits/3") == "models:/twml-digits/3"
    wide = np.array([4.0, 6, 8, 10, 12, 14, 16, 18, 20, 3])
    narrow = np.array([10.0, 11, 12, 9, 10.5, 11.5, 12.5, 9.5, 10.2, 11.2])
    panels = [
        {"name": n, "norms": v, "median": t.median, "mad": t.mad, "threshold": 2.0, "flagged": t.flagged}
        for n, v, t in zip(("wide", "narrow"), (wide, narrow), _outlier_tests(wide, narrow))
    ]
    fig = figures.norms_figure(panels)
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert legends == [
        ["median", "threshold < 0: no class can be flagged"],
        ["median", "median - 2 x 1.4826 MAD"],
    ]
    assert figures.save(fig, tmp_path / "norms.png").stat().st_size > 0  # and closed


@pytest.mark.e2e  # a whole backdoor study and trigger search
def test_cleanse_detects_a_non_default_target_and_position(tmp_path):
    """`twml backdoor --target 3 --position top-left` with the default search (two that must agree):
    the verdict names that model and that class (the issue's other-target, other-position case)."""
    poisoned = backdoor.compute(backdoor.prepare(settings("backdoor", target=3, position="top-left")))
    clean, stamped, _ = poisoned.example
    assert stamped[0, 0, 0] == 1.0 and torch.equal(stamped[..., 1:, :], clean[..., 1:, :])  # one pixel, top-left
    assert poisoned.attack_success_rate > 0.9
    folder = models.save_model(poisoned.model, tmp_path / "bad")
    outcome = cleanse.compute(cleanse.prepare(config.resolve_one("cleanse", PRESET, {"model_runs": [str(folder)]})))
    (ins,) = outcome.inspections
    assert len(ins.tests) == 2 and ins.votes.tolist() == [0, 0, 0, 2, 0, 0, 0, 0, 0, 0], ins.signed_indices
    assert outcome.verdict == "model 0 class 3"  # both independent searches flag class 3, and only it
    for search in (ins.reversed, ins.more[0].reversed):  # within 1.5x of the planted 1-pixel mask's L1 norm
        assert search.norms[3] <= 1.5 * 1.0 and search.start_norms.shape == (10, 1)


def test_a_flag_on_a_repaired_model_says_which_class_the_repair_was_for():
    """Searching a model twml mitigate repaired (its run given to twml cleanse): a flag on the
    repaired class says the trigger is still found; a flag on another class says a repair can
    uncover a natural trigger; a repaired class no longer flagged says where its trigger now
    stands; a model that was not repaired gets none of these lines."""
    from types import SimpleNamespace

    norms = np.array([10.0, 11, 12, 2.0, 10.5, 11.5, 12.5, 9.5, 10.2, 11.2])
    (test,) = _outlier_tests(norms)
    rev = SimpleNamespace(classes=list(range(10)), norms=norms)
    ins = cleanse.Inspection("m", 1.0, rev, test, 0.0, [], 1)
    found = [cleanse.Finding(0, 3, float(test.anomaly_index[3]), 0.99)]
    s = config.resolve_one("cleanse", PRESET, {"model_runs": ["a"], "searches": 1})

    def notes(repaired):
        lines = cleanse.summarize(cleanse.Outcome(s, [ins], found, 1, repaired))
        return [line for line in lines if "was repaired" in line]

    assert notes([0]) == [
        "Model 0 was repaired for class 0 (twml mitigate), not class 3: a repair can uncover a natural trigger that "
        "the backdoor's small one had hidden; compare class 3 in a clean model",
        "Model 0 was repaired for class 0 (twml mitigate), which is no longer flagged: class 0's smallest trigger is "
        "now 10.00 against a median of 10.75, anomaly index 0.67",
    ]
    assert notes([3]) == ["Model 0 was repaired for class 3 (twml mitigate), and a small trigger of it is still found"]
    assert notes([1]) == [  # its trigger above the median: no index (it could not be flagged)
        "Model 0 was repaired for class 1 (twml mitigate), not class 3: a repair can uncover a natural trigger that "
        "the backdoor's small one had hidden; compare class 3 in a clean model",
        "Model 0 was repaired for class 1 (twml mitigate), which is no longer flagged: class 1's smallest trigger is "
        "now larger than the median class's (11.00 against 10.75)",
    ]
    assert notes([None]) == notes([]) == []


def test_mitigate_ends_with_the_command_that_searches_every_repaired_model_again():
    from twml_cli.cli.commands import recheck_line

    assert recheck_line(["a1"]) == "Check the repair by searching it again: twml cleanse --run a1"
    assert recheck_line(["a1", "b2"]) == "Check the repairs by searching them again: twml cleanse --run a1 --run b2"


def test_a_single_search_that_flags_a_class_says_to_confirm_it_with_two():
    """A flag from the paper's single search ends with the advice to run --searches 2 (single searches
    flag classes of some clean models); several searches, or no flag, do not print it."""
    from types import SimpleNamespace

    norms = np.array([10.0, 11, 12, 2.0, 10.5, 11.5, 12.5, 9.5, 10.2, 11.2])
    (test,) = _outlier_tests(norms)
    rev = SimpleNamespace(classes=list(range(10)), norms=norms)
    found = [cleanse.Finding(0, 3, float(test.anomaly_index[3]), 0.99)]
    single = config.resolve_one("cleanse", PRESET, {"model_runs": ["a"], "searches": 1})
    two = config.resolve_one("cleanse", PRESET, {"model_runs": ["a"], "searches": 2})

    def summary(s, findings, more=0):
        ins = cleanse.Inspection("m", 1.0, rev, test, 0.0, [cleanse.Search(rev, test)] * more, 1 + more)
        return cleanse.summarize(cleanse.Outcome(s, [ins], findings))

    lines = summary(single, found)
    assert lines[-2:] == ["Backdoor success rate: 0.9900", cleanse.SINGLE_SEARCH_CAUTION]
    assert "--searches 2" in lines[-1]
    assert cleanse.SINGLE_SEARCH_CAUTION not in summary(two, found, more=1)
    assert cleanse.SINGLE_SEARCH_CAUTION not in summary(single, [])
