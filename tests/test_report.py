"""`twml reproduce` and `twml report`: the write-up states what MLflow holds."""

import re

import pandas as pd

from twml_cli import config, results
from twml_cli.report import adversarial as report_adversarial
from twml_cli.report import cleanse as report_cleanse
from twml_cli.report import mitigation as report_mitigation
from twml_cli.report.cleanse import describe_mask, thin_margin
from twml_cli.report.document import Bullets, Document, Para, Table
from twml_cli.report.runs import AttackRun, CleanseRun, TrainRun
from twml_cli.report.words import change, model_name, secs


def test_reproduce_logs_every_step_as_its_own_run(reproduced):
    cli, result = reproduced.cli, reproduced.result
    runs = cli.runs()
    assert all(r.info.status == "FINISHED" for r in runs)
    commands = sorted(r.data.tags["twml.command"] for r in runs)
    assert commands == [
        "backdoor",
        "cleanse",
        "mitigate",
        "mitigate",
        "mitigate",
        "report",
        "reproduce",
        "smooth",
        "smooth",
        "sweep",
        "train",
        "train",
        "train",
    ]
    assert reproduced.cleanse.data.params["model0"] == reproduced.standard.info.run_id
    assert reproduced.cleanse.data.params["model1"] == reproduced.backdoor.info.run_id
    assert "[8/8] report" in result.out and "Report: reports/twml.md and reports/twml.pdf" in result.out
    assert "[7/8] mitigation of what Neural Cleanse flagged: unlearning, pruning, then the input filter" in result.out
    assert "mlflow ui" in result.out


def test_report_states_the_logged_numbers(reproduced):
    cli = reproduced.cli
    md = (cli.path / "reports" / "twml.md").read_text()
    for r in (reproduced.standard, reproduced.free4, reproduced.free7):
        row = next(line for line in md.splitlines() if line.endswith(f"| {r.info.run_id[:8]} |"))
        for key in ("accuracy", "pgd_success_rate", "robust_accuracy"):
            assert f"| {r.data.metrics[key]:.4f} |" in row
    std, free4, free7 = (r.data.metrics for r in (reproduced.standard, reproduced.free4, reproduced.free7))
    # the sentences agree with the numbers, direction included
    assert f"benign accuracy {change(std['accuracy'], free4['accuracy'])}" in md
    assert f"PGD {change(std['pgd_success_rate'], free4['pgd_success_rate'])}" in md
    assert "From m = 4 to m = 7" in md and f"benign accuracy {change(free4['accuracy'], free7['accuracy'])}" in md
    assert "(seed 0 for each)" in md and "One run of a kind cannot tell a difference from the spread" in md
    assert "This compares one run of each σ (the newest: seed 0 at both)" in md
    assert f"standard training: **{std['train_time_s']:.1f} s**" in md
    for r in reproduced.smooth.values():
        assert f"{r.data.metrics['average_certified_radius']:.4f}" in md
        assert f"{r.data.metrics['certified_accuracy_r0.25']:.4f}" in md
    assert "nan" not in md.lower()
    cleanse = reproduced.cleanse
    norms = pd.read_csv(cli.download(cleanse, "norms.csv"))
    for value in norms["norm"]:
        assert f"{value:.4f}" in md
    assert (
        f"inspected 2 models: model 0 = run {reproduced.standard.info.run_id[:8]}; "
        f"model 1 = run {reproduced.backdoor.info.run_id[:8]}." in md
    )
    assert "**Backdoor is at model 1 class 0**" in md
    assert f"sends {cleanse.data.metrics['backdoor_success_rate']:.4f} of them to class 0" in md
    assert "The verdict names that model and class." in md
    run = [cleanse.data.metrics[f"model{i}_searches_run"] for i in (0, 1)]  # the second where the first flags
    assert run == [1, 2]  # the clean model's first search flags nothing; the backdoored model's flags class 0
    assert f"It ran up to 2 independent searches per model ({run[0]:g} on model 0, {run[1]:g} on model 1: " in md
    assert "flagged a class when both of them did" in md
    assert "This verdict rests on one trigger search per model" not in md
    assert "carry one of the 2 searches' reversed triggers, in turn, under their true labels" in md  # unlearning
    for i in (0, 1):  # the index a norm of 0 would reach: with two searches, the lower of their two
        own = norms[norms["model"] == i]
        mad = 1.4826 * (own["norm"] - own["norm"].median()).abs().median()
        ceiling = cleanse.data.metrics[f"model{i}_anomaly_ceiling"]
        assert ceiling <= own["norm"].median() / mad * (1 + 1e-6)  # the logged norms are the first search's
        assert (own[own["flagged"]]["anomaly_index"] <= ceiling).all() and ceiling > 2
    assert "could have been flagged" not in md  # both well above 2 on the default
    index = cleanse.data.metrics["model1_anomaly_index"]
    assert ("is a thin margin" in md) == (index < 3.0)  # 1.5 x the threshold of 2
    for r in cli.runs():
        if r.data.tags["twml.command"] not in ("report", "reproduce"):
            assert r.info.run_id in md  # every number links back to its run


def test_report_files_embed_the_figures(reproduced):
    cli = reproduced.cli
    out = cli.path / "reports"
    figures = {p.name for p in (out / "twml").iterdir()}
    assert {
        "randomized-smoothing-acc-vs-radius.png",
        "randomized-smoothing-acc-vs-radius.pdf",
        "adversarial-training.png",
        "cleanse-trigger.png",
        "cleanse-mask.png",
        "cleanse-mask-grid.png",
        "cleanse-norms.png",
    } <= figures
    md = (out / "twml.md").read_text()
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / name).is_file()
    pdf = (out / "twml.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Subtype /Image") >= 6
    assert b"DejaVu" in pdf  # a Unicode font, so sigma renders
    assert {"twml.md", "twml.pdf", "figures/cleanse-trigger.png", "sources.json"} <= cli.artifacts(reproduced.report)


def test_a_study_without_runs_gets_one_line(cli):
    assert cli("train", "--epochs", "1", "--pgd-steps", "1").code == 0
    result = cli("report", "--out", "out")
    assert result.code == 0, result.err
    md = (cli.path / "out" / "twml.md").read_text()
    assert "No finished `twml smooth` runs in this experiment: run `twml smooth --sigma 0.05 --sigma 0.20`." in md
    assert "No finished `twml cleanse` runs in this experiment" in md
    assert "This needs a standard and a free run trained alike" in md
    assert (cli.path / "out" / "twml.pdf").stat().st_size > 1000


def test_a_run_missing_a_metric_stops_the_report_with_one_line(cli):
    assert cli("train", "--epochs", "1", "--pgd-steps", "1").code == 0
    (run,) = cli.runs("train")
    # a run logged by another version: same command tag, a metric renamed
    other = cli.client().create_run(run.info.experiment_id, tags={"twml.command": "train"})
    cli.client().log_param(other.info.run_id, "method", "standard")
    for key, value in run.data.metrics.items():
        if key != "pgd_success_rate":
            cli.client().log_metric(other.info.run_id, key, value)
    cli.client().log_metric(other.info.run_id, "pgd_success", 0.5)
    cli.client().set_terminated(other.info.run_id, "FINISHED")
    result = cli("report", "--out", "out")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert f"run {other.info.run_id[:8]} (train) has no metric 'pgd_success_rate'" in result.err


def _cleanse_run(norms, overrides, flagged=frozenset(), index=0.5, **fields) -> CleanseRun:
    """A logged cleanse run of models with these ten norms each (every class's anomaly index 0.5 in
    norms.csv, the model's `index` in its metrics), the (model, class) pairs in `flagged` flagged,
    its settings the preset's with `overrides`."""
    table = pd.DataFrame(
        [
            {"model": i, "run_id": f"{i}" * 32, "class": c, "norm": n, "anomaly_index": 0.5}
            | {"flagged": (i, c) in flagged}
            for i, model in enumerate(norms)
            for c, n in enumerate(model)
        ]
    )
    runs = [chr(ord("a") + i) for i in range(len(norms))]
    return CleanseRun(
        id="c" * 32,
        name="cleanse",
        command="cleanse",
        start_time=0,
        params={},
        settings=config.resolve_one("cleanse", config.load_preset(), {"model_runs": runs, **overrides}),
        norms=table,
        models={i: results.CleanseModelMetrics(0.98, index, 1.0) for i in range(len(norms))},
        **fields,
    )


def test_report_names_a_model_no_class_of_which_could_have_been_flagged(tmp_path):
    """A model whose logged ceiling (the index of a norm of 0) is not above the threshold gets its
    own sentence: its "no backdoor" means nothing. One above the threshold does not."""
    wide = [4.0, 6, 8, 10, 12, 14, 16, 18, 20, 3]  # median 11, MAD 7.41: ceiling 1.48
    narrow = [10.0, 11, 12, 9, 10.5, 11.5, 12.5, 9.5, 10.2, 11.2]
    run = _cleanse_run([narrow, wide], {"searches": 1}, ceilings={0: 10.3, 1: 11 / (1.4826 * 5)})
    doc = Document("twml")
    report_cleanse.section(doc, [run], [], tmp_path)
    blind = [b.text for b in doc.blocks if isinstance(b, Para) and "could have been flagged" in b.text]
    assert blind == [
        "**No class of model 1 could have been flagged**: its classes' norms spread so widely that a trigger of norm 0 "
        "would have had an anomaly index of 1.48 (median norm / (1.4826 · MAD)), not above the threshold of 2. The MAD "
        "test cannot see a backdoor in this model, however small its trigger, so the verdict says nothing about it "
        "either way."
    ]
    assert not [b for b in doc.blocks if isinstance(b, Para) and "--searches 2" in b.text]  # nothing was flagged
    run.settings = config.resolve_one(
        "cleanse", config.load_preset(), {"model_runs": ["a", "b"], "searches": 3, "agreement": "all"}
    )
    doc = Document("twml")
    report_cleanse.section(doc, [run], [], tmp_path)
    (blind,) = [b.text for b in doc.blocks if isinstance(b, Para) and "could have been flagged" in b.text]
    assert (
        "the largest anomaly index all of its 3 searches could agree on, that of a trigger of norm 0, is 1.48" in blind
    )
    run.settings = config.resolve_one("cleanse", config.load_preset(), {"model_runs": ["a", "b"]})  # the default
    doc = Document("twml")
    report_cleanse.section(doc, [run], [], tmp_path)
    (blind,) = [b.text for b in doc.blocks if isinstance(b, Para) and "could have been flagged" in b.text]
    assert "the largest anomaly index both of its 2 searches could agree on" in blind
    run.settings = config.resolve_one("cleanse", config.load_preset(), {"model_runs": ["a", "b"], "searches": 3})
    doc = Document("twml")
    report_cleanse.section(doc, [run], [], tmp_path)
    (blind,) = [b.text for b in doc.blocks if isinstance(b, Para) and "could have been flagged" in b.text]
    assert "the largest anomaly index more than half of its 3 searches could agree on" in blind


def test_a_single_searchs_flag_is_reported_with_the_advice_to_confirm_it(tmp_path):
    """A class flagged by the paper's single search comes with the caution to confirm it with the
    default's two searches (single searches flag a class of 12% to 15% of clean models); a flag of
    the default's two searches does not."""
    norms = [10.0, 11, 12, 2.0, 10.5, 11.5, 12.5, 9.5, 10.2, 11.2]
    run = _cleanse_run([norms], {"searches": 1}, flagged={(0, 3)}, index=4.0)

    def cautions(settings) -> list[str]:
        run.settings = settings
        doc = Document("twml")
        report_cleanse.section(doc, [run], [], tmp_path)
        assert any(isinstance(b, Para) and "**Backdoor is at model 0 class 3**" in b.text for b in doc.blocks)
        return [b.text for b in doc.blocks if isinstance(b, Para) and "rests on one trigger search" in b.text]

    (caution,) = cautions(run.settings)
    assert "12% to 15% of 240 clean models" in caution and "run `twml cleanse --searches 2`" in caution
    assert cautions(config.resolve_one("cleanse", config.load_preset(), {"model_runs": ["a"]})) == []


def test_attacks_on_a_folder_model_are_reported_without_any_train_run(tmp_path):
    """`twml attack` on a model folder, in an experiment with no `twml train` run: the write-up
    still has its table, and names the model by its folder."""
    attack = AttackRun(
        id="a" * 32,
        name="attack",
        command="attack",
        start_time=0,
        params={"model_path": "/data/models/seed2-bottom-right-t3-s1"},
        settings=config.resolve_one("attack", config.load_preset(), {"model_run": "x"}),
        robustness=results.RobustnessMetrics(0.9917, 0.9333, 0.0667, 1.0),
    )
    doc = Document("twml")
    report_adversarial.section(doc, [], [attack], tmp_path)
    (table,) = [b for b in doc.blocks if isinstance(b, Table)]
    assert table.rows == [
        [
            "folder seed2-bottom-right-t3-s1",
            f"{attack.settings.eps:.4g}",
            "10x1",
            "0.9917",
            "0.9333",
            "0.0667",
            "–",
            "–",
            "aaaaaaaa",
        ]
    ]
    drawn = Document("twml")  # a run of the robustness-curve sweep the report draws is not tabled again
    report_adversarial.section(drawn, [], [attack], tmp_path, curves=frozenset({attack.id}))
    assert not [b for b in drawn.blocks if isinstance(b, Table)]


def test_thin_margin_only_near_the_threshold():
    assert "2.23 against a threshold of 2 is a thin margin" in thin_margin(2.23, 2.0)
    assert thin_margin(3.0, 2.0) == "" and thin_margin(5.7, 2.0) == ""


def test_the_mask_description_agrees_in_number():
    import numpy as np

    one, two = np.zeros((8, 8)), np.zeros((8, 8))
    one[7, 7] = two[7, 6:] = 1.0
    assert describe_mask(one).startswith("1 of its 64 pixels exceeds 0.5, at (row, column) (7, 7) of the 8x8 image.")
    assert describe_mask(two).startswith("2 of its 64 pixels exceed 0.5, at (row, column) (7, 6), (7, 7) of")


def test_change_wording():
    assert change(0.5, 0.75) == "rose from 0.5000 to 0.7500 (+25.00 points)"
    assert change(0.75, 0.5) == "fell from 0.7500 to 0.5000 (-25.00 points)"
    assert change(0.5, 0.5) == "stayed at 0.5000"
    assert change(2.0, 3.0, points=False) == "rose from 2.0000 to 3.0000 (x1.50)"
    # two numbers that print the same are said to stay, not to rise from a figure to itself
    assert change(5.01, 5.04, secs, points=False) == "stayed at 5.0 s (x1.01)"
    assert change(0.98061, 0.98064) == "stayed at 0.9806"


def test_a_model_is_named_by_its_run_or_its_folder():
    run = "be5a1e18" + "0" * 24
    assert model_name(run) == model_name(f"runs:/{run}/model") == "run be5a1e18"
    assert model_name("models:/twml-digits/3") == "models:/twml-digits/3"
    assert model_name("/tmp/m16/seed2-bottom-right-t3-s1") == "folder seed2-bottom-right-t3-s1"  # not '/tmp/m16'


def test_wide_tables_never_break_a_word_in_the_pdf(tmp_path):
    """The smoothing table of a three-sigma sweep (14 columns), and a table with a long cell:
    every column is at least as wide as the longest word in it, and every part fits the page."""
    from pathlib import Path

    import matplotlib
    from fpdf import FPDF

    from twml_cli.report.document import Document, Table, _table_parts, to_pdf

    header = ["σ", "procedure", "accuracy (base)"] + [f"cert. acc. r={r:g}" for r in (0, 0.05, 0.1, 0.25, 0.5, 0.75)]
    header += ["abstain", "ACR", "max radius", "samples per image", "run"]
    rows = [
        [f"{s:g}", "CERTIFY, n = 1,000", "0.9917"]
        + ["0.9778"] * 6
        + ["0.0056", "0.1123", "0.4927", "1,100", "f4f24419"]
        for s in (0.12, 0.25, 0.5)
    ]
    pdf = FPDF(format="A4")
    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    pdf.add_font("Sans", "", str(fonts / "DejaVuSans.ttf"))
    pdf.add_font("Sans", "B", str(fonts / "DejaVuSans-Bold.ttf"))
    pdf.add_page()
    long = [["run", "a note " * 80]]  # one cell far wider than the page: it wraps between words
    for head, body in ((header, rows), (["what", "note"], long)):
        parts = _table_parts(pdf, head, body)
        assert sorted({j for cols, _, _ in parts for j in cols}) == list(range(len(head)))  # every column, in some part
        for cols, size, widths in parts:
            assert size >= 6 and sum(widths) <= pdf.epw + 1e-6
            for j, w in zip(cols, widths):
                inner = w - 2 * pdf.c_margin
                pdf.set_font("Sans", "", size)
                assert all(pdf.get_string_width(word) <= inner for r in body for word in r[j].split())
                pdf.set_font("Sans", "B", size)
                assert all(pdf.get_string_width(word) <= inner for word in head[j].split())
    doc = Document("wide")
    ids = [["sweep", ",".join(["0123456789abcdef"] * 30)]]  # a run name of ids with no space: too wide for any column
    doc.add(Table(header, rows), Table(["what", "note"], long), Table(["command", "run name"], ids))
    to_pdf(doc, tmp_path / "wide.pdf")  # and it renders
    assert (tmp_path / "wide.pdf").stat().st_size > 1000


def test_timing_caveat_names_overlaps_hosts_and_thread_counts():
    from twml_cli.report.adversarial import timing_caveat
    from twml_cli.report.runs import Logged

    def run(i, start, end, host="a", threads="2"):
        return Logged(f"{i:08d}" + "0" * 24, "", "train", start, {"threads": threads}, host, end)

    assert timing_caveat([run(1, 0, 10), run(2, 10, 20)]) is None  # one after the other, one machine, alike
    overlap = timing_caveat([run(1, 0, 10), run(2, 5, 20)])
    assert "ran at the same time" in overlap and "00000001 and 00000002" in overlap
    assert "2 different machines (a, b)" in timing_caveat([run(1, 0, 10), run(2, 10, 20, host="b")])
    assert "different CPU thread counts (1, 2)" in timing_caveat([run(1, 0, 10, threads="1"), run(2, 10, 20)])


def _trained(i: int, pgd: float, acc: float = 0.99, **given):
    """A finished `twml train` run made with `given` settings (the default preset's otherwise):
    run i starts at i seconds and takes a second, so higher ids are newer."""
    settings = config.resolve_one("train", config.load_preset(), given)
    return TrainRun(
        id=f"{i:08d}" + "0" * 24,
        name="",
        command="train",
        start_time=1000 * i,
        params={"threads": "1"},
        host="h",
        end_time=1000 * i + 900,
        settings=settings,
        training=results.TrainingMetrics(5.0 + i / 100, 7000.0, 336, 1, 0),
        robustness=results.RobustnessMetrics(acc, pgd, 1 - pgd, 0.1),
    )


def _blocks(tmp_path, runs) -> list:
    doc = Document("twml")
    report_adversarial.section(doc, sorted(runs, key=lambda r: -r.start_time), [], tmp_path)  # newest first
    return doc.blocks


def _questions(tmp_path, runs) -> str:
    return "\n".join(b.text for b in _blocks(tmp_path, runs) if isinstance(b, Para))


def test_the_questions_answer_from_every_seed_trained_alike(tmp_path):
    """With several seeds of each kind, the report's questions answer from their means and spreads
    (worded from the intervals, as the sweeps' curves are), not from the newest run of each kind;
    a run with another setting is not one of the seeds, and a seed run twice counts once."""
    import numpy as np

    standard = {0: 0.86, 1: 0.90, 2: 0.83}
    free4, free7 = {0: 0.30, 1: 0.27, 2: 0.33}, {0: 0.31, 1: 0.36, 2: 0.29}
    runs = [_trained(s, p, seed=s) for s, p in standard.items()]
    runs += [_trained(10 + s, p, seed=s, method="free", m=4) for s, p in free4.items()]
    runs += [_trained(20 + s, p, seed=s, method="free", m=7) for s, p in free7.items()]
    fast = {0: 0.20, 1: 0.22, 2: 0.18}
    runs += [_trained(40 + s, p, seed=s, method="fast") for s, p in fast.items()]
    runs.append(_trained(30, 0.95, seed=1, method="free", m=4, lr=0.05))  # newer, but trained otherwise
    runs.append(_trained(31, standard[2], seed=2))  # seed 2 again, as an older run of it gave
    text = _questions(tmp_path, runs)
    assert "(seeds 0-2 for each)" in text
    bullets = [item for b in _blocks(tmp_path, runs) if isinstance(b, Bullets) for item in b.items]
    assert [item.split(":")[0] for item in bullets] == [
        "standard training",
        "free adversarial training, m = 4",
        "free adversarial training, m = 7",
        "fast adversarial training",
    ]

    def interval(values):
        v = np.array(list(values.values()))
        return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"

    # 0.8633 ± 0.0351 against 0.3000 ± 0.0300: a fall; m = 4 against m = 7: within seed noise
    assert (
        f"the success rate of untargeted white-box PGD fell from {interval(standard)} to {interval(free4)} "
        "(mean ± sd over 3 seeds; difference -0.5633, 95% interval " in text
    )
    assert re.search(
        f"the PGD success rate went from {interval(free4)} to {interval(free7)} "
        r"\(mean ± sd over 3 seeds; difference \+0\.0200, 95% interval -0\.\d+ to \+0\.\d+\): within seed noise",
        text,
    )
    assert "Over these seeds adversarial training removed 56.33 points of PGD success rate (means)" in text
    assert (
        f"From free training at m = 4 to fast training, the PGD success rate fell from {interval(free4)} to "
        f"{interval(fast)} (mean ± sd over 3 seeds; difference -0.1000, 95% interval " in text
    )
    assert "0.9500" not in text  # the run with another learning rate is not a seed of free m = 4


def test_one_run_of_each_kind_says_what_one_seed_cannot_tell(tmp_path):
    runs = [_trained(1, 0.86, seed=3), _trained(2, 0.30, seed=0, method="free", m=4)]
    text = _questions(tmp_path, runs)
    assert "(standard: seed 3; free m = 4: seed 0)" in text
    assert "One run of a kind cannot tell a difference from the spread between seeds" in text
    assert "the success rate of untargeted white-box PGD fell from 0.8600 to 0.3000 (-56.00 points)" in text
    assert "mean ± sd" not in text


def test_the_sigma_question_says_it_reads_one_run_of_each():
    from twml_cli.report.runs import SmoothRun
    from twml_cli.report.smoothing import _one_run_each

    def smoothed(sigma, seed):
        settings = config.resolve_one("smooth", config.load_preset(), {"sigma": sigma, "seed": seed})
        return SmoothRun(id="s" * 32, name="", command="smooth", start_time=0, params={}, settings=settings)

    newest = [smoothed(0.12, 2), smoothed(0.5, 2)]
    older = [smoothed(s, seed) for s in (0.12, 0.5) for seed in (0, 1)]
    text = _one_run_each(*newest, newest + older)
    assert "one run of each σ (the newest: seed 2 at both)" in text
    assert "runs of seeds 0-2 are logged at both σ" in text
    only = smoothed(0.5, 0)
    uneven = _one_run_each(newest[0], only, [newest[0], only, *older[:2]])
    assert "runs of seeds 0-2 are logged at σ = 0.12 and of seed 0 at σ = 0.5" in uneven
    alone = _one_run_each(smoothed(0.12, 0), smoothed(0.5, 3), [])
    assert "seed 0 at σ = 0.12, seed 3 at σ = 0.5" in alone
    assert "`twml smooth --sigma 0.12,0.5 --seed 0,1,2` trains three of each" in alone


def test_cleanse_runs_of_other_seeds_are_counted_clean_models_included():
    """Several cleanse runs: the write-up counts the backdoored models whose target was named, those
    with another class flagged too, and the clean models with any class flagged (false alarms)."""
    from twml_cli.report.cleanse import across_runs
    from twml_cli.report.runs import BackdoorRun

    def rid(c: str) -> str:
        return c * 32

    backdoors = [
        BackdoorRun(
            rid(b), "", "backdoor", 0, {}, settings=config.resolve_one("backdoor", config.load_preset(), {"target": t})
        )
        for b, t in (("b", 0), ("d", 3), ("f", 7))
    ]
    verdicts = {"a": "model 1 class 0", "c": "model 0 class 9; model 1 class 3; model 1 class 5", "e": "none"}
    runs = []
    for clean, backdoored in (("a", "b"), ("c", "d"), ("e", "f")):
        run = CleanseRun(rid("9"), "", "cleanse", 0, {"model0": rid(clean), "model1": f"runs:/{rid(backdoored)}/model"})
        run.verdict = verdicts[clean]
        runs.append(run)
    doc = Document("twml")
    across_runs(doc, runs, backdoors, frozenset(rid(c) for c in "ace"))
    (para,) = [b.text for b in doc.blocks if isinstance(b, Para)]
    assert "Across the 3 cleanse runs of this experiment" in para
    assert "named the true target in 2 of 3 inspections of backdoored models (3 models)" in para
    assert "and flagged another class in 1; it flagged a class in 1 of 3 inspections of clean models (3 models" in para
    alone = Document("twml")
    across_runs(alone, runs[:1], backdoors, frozenset())  # one run: its own verdict says it all
    assert not alone.blocks


def test_the_sigma_question_answers_over_seeds_where_each_sigma_has_several():
    import numpy as np

    from twml_cli.report.runs import SmoothRun
    from twml_cli.report.smoothing import _over_seeds

    def smoothed(sigma, seed, acr, correct):
        settings = config.resolve_one("smooth", config.load_preset(), {"sigma": sigma, "seed": seed})
        run = SmoothRun(id="s" * 32, name="", command="smooth", start_time=0, params={}, settings=settings)
        run.certification = results.CertificationMetrics(0.99, correct / 4, 0.0, acr, 0.5, 1.0, 1.0, 1100)
        run.table = pd.DataFrame({"radius": np.full(4, 0.1), "correct": np.arange(4) < correct})
        return run

    low = [smoothed(0.12, s, acr, 4) for s, acr in enumerate((0.27, 0.28, 0.26))]
    high = [smoothed(0.25, s, acr, c) for (s, acr), c in zip(enumerate((0.44, 0.45, 0.43)), (4, 3, 4))]
    text = _over_seeds(low[-1], high[-1], low + high)
    assert "(seeds 0-2 at σ = 0.12, seeds 0-2 at σ = 0.25; runs made alike)" in text
    assert "the average certified radius rose from 0.2700 ± 0.0100 to 0.4400 ± 0.0100 (mean ± sd over 3 seeds" in text
    assert (
        "certified accuracy at r = 0 went from 1.0000 ± 0.0000 to 0.9167 ± 0.1443" in text
        and "within seed noise" in text
    )
    assert _over_seeds(low[-1], high[-1], low + high[-1:]) is None  # one run at σ = 0.25


def _sweep_of(command: str, axes: list[str], children: list, i: int):
    from twml_cli.report.runs import SweepRun

    return SweepRun(
        id=f"{i:08d}" + "5" * 24,
        name="",
        command="sweep",
        start_time=1000 * i,
        params={},
        sweep_command=command,
        axes=axes,
        table=pd.DataFrame({"run_id": [r.id for r in children]}),
    )


def _runs(**given):
    from twml_cli.report.runs import Runs

    lists = {k: sorted(given.get(k, []), key=lambda r: -r.start_time) for k in ("train", "smooth", "sweeps")}
    return Runs(
        train=lists["train"], attack=[], smooth=lists["smooth"], backdoor=[], cleanse=[], sweeps=lists["sweeps"]
    )


def test_the_m_curve_pools_every_free_run_made_like_the_sweeps(tmp_path):
    """The m-curve draws every seed made alike, not the sweep's alone, so it answers as section 1's
    questions do: here seeds 1, 2 from a sweep and seed 0 from single runs; a run with another
    learning rate is no seed of it, and a seed trained again counts once (the newest)."""
    import numpy as np

    from twml_cli.report import curves

    free4, free7 = {0: 0.30, 1: 0.27, 2: 0.33}, {0: 0.31, 1: 0.36, 2: 0.39}
    singles = [_trained(1, 0.50, seed=0, method="free", m=4), _trained(2, free4[0], seed=0, method="free", m=4)]
    singles += [
        _trained(3, free7[0], seed=0, method="free", m=7),
        _trained(4, 0.95, seed=1, method="free", m=4, lr=0.05),
    ]
    swept = [_trained(10 + s, free4[s], seed=s, method="free", m=4) for s in (1, 2)]
    swept += [_trained(20 + s, free7[s], seed=s, method="free", m=7) for s in (1, 2)]
    standard = [_trained(30 + s, 0.85, seed=s) for s in (0, 1)]
    sw = _sweep_of("train", ["m", "seed"], swept, 10)
    doc = Document("twml")
    curves.m_curve(doc, _runs(train=singles + swept + standard, sweeps=[sw]), tmp_path)
    text = "\n".join(b.text for b in doc.blocks if isinstance(b, Para))
    (table,) = [b for b in doc.blocks if isinstance(b, Table)]
    robust = table.header.index("PGD robust accuracy")
    for m, values in ((4, free4), (7, free7)):
        row = next(r for r in table.rows if r[0] == str(m))
        mean, sd = np.mean([1 - v for v in values.values()]), np.std([1 - v for v in values.values()], ddof=1)
        assert row[robust] == f"{mean:.4f} ± {sd:.4f}" and row[-1] == "3"
    assert "the runs of sweep 00000010 and 2 more made alike" in text
    assert "(m = 4: seeds 0-2; m = 7: seeds 0-2)" in text
    assert "(mean ± sd over 3 seeds; difference -0.0533, 95% interval" in text  # robust accuracy, m = 4 to 7
    assert "0.5000" not in text and "0.0500" not in text  # the retrained seed's older run, the lr 0.05 run
    assert any("mean ± sd over 3 seeds" in b.caption for b in doc.blocks if hasattr(b, "caption"))


def test_the_envelope_pools_every_sigma_made_alike_and_names_each_stretch(tmp_path):
    import numpy as np

    from twml_cli.report import curves
    from twml_cli.report.runs import SmoothRun
    from twml_cli.studies.smooth import Band

    def smoothed(i, sigma, seed, radii, **given):
        settings = config.resolve_one("smooth", config.load_preset(), {"sigma": sigma, "seed": seed, **given})
        table = pd.DataFrame({"radius": radii, "correct": [True] * len(radii)})
        return SmoothRun(
            id=f"{i:08d}" + "6" * 24,
            name="",
            command="smooth",
            start_time=1000 * i,
            params={},
            settings=settings,
            table=table,
        )

    swept = [smoothed(10, 0.25, 0, [0.1, 0.3, 0.5]), smoothed(11, 0.25, 1, [0.2, 0.4, 0.6])]
    alone = smoothed(1, 0.5, 0, [0.2, 0.6, 0.9])
    others = [smoothed(2, 0.25, 2, [0.9, 0.9, 0.9], training="consistency"), smoothed(3, 0.25, 2, [1.0] * 3, n=500)]
    sw = _sweep_of("smooth", ["sigma", "seed"], swept, 10)
    doc = Document("twml")
    curves.sigma_curves(doc, _runs(smooth=[*swept, alone, *others], sweeps=[sw]), tmp_path)
    text = "\n".join(b.text for b in doc.blocks if isinstance(b, Para))
    (table,) = [b for b in doc.blocks if isinstance(b, Table)]
    assert [r[:3] for r in table.rows] == [["σ=0.25", "0.3500 ± 0.0707", "2"], ["σ=0.5", "0.5667", "1"]]
    assert "the runs of sweep 00000010 and 1 more made alike" in text
    assert "(σ = 0.25: seeds 0, 1; σ = 0.5: seed 0)" in text

    grid = np.linspace(0, 0.5, 6)
    lead = {
        "a": Band(np.array([1, 0.9, 0.5, 0.9, 0.8, 0]), np.zeros(6), 0, 0, 1),
        "b": Band(np.array([0.9, 0.8, 0.6, 0.8, 0.9, 0]), np.zeros(6), 0, 0, 1),
    }
    assert curves._where_best(grid, lead, "a") == "0.000 to 0.100, at 0.300"
    assert curves._where_best(grid, lead, "b") == "at 0.200, at 0.400"


def test_a_filter_is_described_by_what_it_rejects_and_not_searched_again(tmp_path):
    """A repair by the input filter alone: the text says what it rejects and that its accuracy counts a
    rejection as wrong, and shows its trade-off figure; no paragraph asks to search its model again
    (it is the one already searched), and no empty one is left."""
    from twml_cli.report.document import Figure
    from twml_cli.report.runs import MitigateRun

    logged = tmp_path / "filter-tradeoff.png"
    logged.write_bytes(b"png")

    settings = config.resolve_one("mitigate", config.load_preset(), {"cleanse_run": "c" * 32, "mitigation": "filter"})
    run = MitigateRun(
        id="f" * 32,
        name="",
        command="mitigate",
        start_time=0,
        params={"model_run": "b" * 32, "target": "0", "reversed_triggers": "2"},
        settings=settings,
        mitigation=results.MitigationMetrics(0.99, 0.94, 0.97, 0.01),
        real=results.RealTriggerMetrics(0.98, 0.02),
        rejected=(0.05, 0.97),
        tradeoff=logged,
    )
    doc = Document("twml")
    (tmp_path / "figures").mkdir()
    report_mitigation.section(doc, [run], fig_dir=tmp_path / "figures")
    (figure,) = [b for b in doc.blocks if isinstance(b, Figure)]
    assert figure.path == tmp_path / "figures" / "mitigate-ffffffff-filter-tradeoff.png" and figure.path.is_file()
    assert figure.caption.startswith("The input filter of class 0 (run ffffffff)")
    paragraphs = [b.text for b in doc.blocks if isinstance(b, Para)]
    assert all(p.strip() for p in paragraphs)
    text = "\n".join(paragraphs)
    assert "the penultimate neurons that the 2 searches' reversed triggers excite most exceeds a threshold" in text
    assert "Filtering rejected 97.00% of the test images carrying the real trigger and 5.00% of the clean ones." in text
    assert "while clean accuracy (a rejected image counted as wrong) went from 0.9900 to 0.9400 (-5.00 points)" in text
    assert "twml cleanse --run" not in text


def test_a_repairs_accuracy_names_the_test_images_it_changed_with_or_without_the_real_trigger():
    """Logged by this twml: the images lost and gained, with McNemar's test; where the real trigger is
    unknown (a model of the user's own), the accuracy still gets its sentence."""
    from twml_cli.report.runs import MitigateRun

    settings = config.resolve_one("mitigate", config.load_preset(), {"cleanse_run": "c" * 32})
    run = MitigateRun(
        id="a" * 32,
        name="",
        command="mitigate",
        start_time=0,
        params={"model_path": "my-model", "target": "3", "reversed_triggers": "2"},
        settings=settings,
        mitigation=results.MitigationMetrics(0.9833, 0.9722, 0.97, 0.01),
        change=results.AccuracyChange(5, 1),
    )
    for real, said in (
        (results.RealTriggerMetrics(0.98, 0.01), "while clean accuracy went from"),
        (None, "After unlearning, clean accuracy went from"),
    ):
        run.real = real
        doc = Document("twml")
        report_mitigation.section(doc, [run])
        text = "\n".join(b.text for b in doc.blocks if isinstance(b, Para))
        assert (
            f"{said} 0.9833 to 0.9722 (-1.11 points: 5 test images lost, 1 gained; McNemar's exact test p = 0.22)."
            in text
        )


def test_the_repairs_name_their_cleanse_run_and_an_unrepaired_newest_finding():
    from twml_cli.report.runs import MitigateRun

    def repair(i, cleanse_run, **changed):
        settings = config.resolve_one("mitigate", config.load_preset(), {"cleanse_run": cleanse_run, **changed})
        return MitigateRun(
            id=f"{i:08d}" + "7" * 24,
            name="",
            command="mitigate",
            start_time=1000 * i,
            params={"model_run": "b" * 32, "target": "0", "reversed_triggers": "2"},
            settings=settings,
            mitigation=results.MitigationMetrics(0.99, 0.98, 0.97, 0.01),
            real=results.RealTriggerMetrics(0.98, 0.01),
        )

    def cleansed(c, verdict):
        return CleanseRun(id=c * 32, name="", command="cleanse", start_time=0, params={}, verdict=verdict)

    repairs = [repair(1, "c" * 32)]
    for newest, said in (
        (cleansed("d", "model 1 class 3"), True),
        (cleansed("c", "model 1 class 0"), False),  # the repairs act on the newest
        (cleansed("d", "none"), False),  # nothing to repair
    ):
        doc = Document("twml")
        report_mitigation.section(doc, repairs, newest)
        text = "\n".join(b.text for b in doc.blocks if isinstance(b, Para))
        assert "Every repair below acts on the findings of cleanse run cccccccc." in text
        assert ("The newest cleanse run (dddddddd, above) flagged model 1 class 3; no repair" in text) == said
    (table,) = [b for b in doc.blocks if isinstance(b, Table)]
    assert "cleanse run" not in table.header  # one and the same: said in the text
    assert "Unlearning took the real trigger's attack success from 0.9800 to 0.0100" in text  # one repair: no name
    assert report_mitigation.FROZEN_CAVEAT not in text  # the default: the unstamped images' statistics
    assert "normalized with the statistics of each batch's unstamped images, estimated at the end on all" in text
    for settings, caveat in (
        ({"unlearn_freeze_norm": True}, True),
        ({"unlearn_clean_norm": False}, False),
        ({"mitigation": "prune"}, False),
    ):
        doc = Document("twml")
        report_mitigation.section(doc, [repair(9, "c" * 32, **settings)])
        text = "\n".join(b.text for b in doc.blocks if isinstance(b, Para))
        assert (report_mitigation.FROZEN_CAVEAT in text) == caveat, settings
        assert ("normalization statistics frozen" in text) == caveat
    doc = Document("twml")
    report_mitigation.section(doc, [*repairs, repair(2, "e" * 32)], cleansed("e", "model 1 class 0"))
    (table,) = [b for b in doc.blocks if isinstance(b, Table)]
    assert [r[table.header.index("cleanse run")] for r in table.rows] == ["cccccccc", "eeeeeeee"]
    text = "\n".join(b.text for b in doc.blocks if isinstance(b, Para))
    assert "Unlearning of class 0 (run 00000002) took the real trigger's attack success" in text  # which row it reads
    assert "settings" not in table.header and "other settings" not in text  # all made alike
    # the text describes the settings most repairs share; a repair made otherwise names what it changed
    doc = Document("twml")
    varied = [
        repair(5, "c" * 32, unlearn_freeze_norm=True),
        repair(4, "c" * 32, unlearn_lr=0.01),
        repair(3, "c" * 32, unlearn_lr=0.01),
        *repairs,
    ]
    report_mitigation.section(doc, varied)
    (table,) = [b for b in doc.blocks if isinstance(b, Table)]
    text = "\n".join(b.text for b in doc.blocks if isinstance(b, Para))
    assert text.count("unlearning fine-tunes for") == 1 and "(SGD, lr 0.01 warmed up" in text
    assert [r[table.header.index("settings")] for r in table.rows] == [
        "--unlearn-lr 0.005, --unlearn-freeze-norm",  # as the option that makes it
        "–",
        "–",
        "--unlearn-lr 0.005",
    ]
    # repairs that started again: the rate kept, and whether the model kept held its clean images
    held, lost = repair(7, "c" * 32), repair(6, "c" * 32)
    held.restarts, held.lr_used, held.train_accuracy = 1, 0.0025, (0.9951, 0.9944)
    lost.restarts, lost.lr_used, lost.train_accuracy = 4, 0.00125, (0.9951, 0.9517)
    doc = Document("twml")
    report_mitigation.section(doc, [held, lost])
    text = "\n".join(b.text for b in doc.blocks if isinstance(b, Para))
    assert text.count("started again from the model as it was at half the rate") == 2
    assert "(1 restart): the model kept was fine-tuned at lr 0.0025." in text
    assert text.count("None of its fine-tunes kept those images within 2 points") == 1
    assert "the one kept ended highest, at 0.9517 from 0.9951." in text


def test_a_repaired_model_searched_again_is_reported_under_its_repair():
    """`twml cleanse --run <mitigate run>` on a repaired model: the mitigation part says, per
    repair, whether that search flags the repaired class, another class or none, and where the
    repaired class's trigger now stands; a repair not searched again gets the command."""
    from twml_cli.report.runs import MitigateRun

    def repair(c: str, target: int) -> MitigateRun:
        settings = config.resolve_one("mitigate", config.load_preset(), {"cleanse_run": "c" * 32})
        return MitigateRun(
            id=c * 32,
            name="",
            command="mitigate",
            start_time=0,
            params={"model_run": "b" * 32, "target": str(target)},
            settings=settings,
            mitigation=results.MitigationMetrics(0.99, 0.98, 0.97, 0.01),
            real=results.RealTriggerMetrics(0.98, 0.01),
        )

    def searched(c: str, models: list[str], norms: list[list[float]], flagged: set[tuple[int, int]]) -> CleanseRun:
        rows = []
        for i, each in enumerate(norms):
            median = pd.Series(each).median()
            for k, n in enumerate(each):
                rows.append({"model": i, "class": k, "norm": n, "anomaly_index": abs(n - median) / 2.0,
                             "flagged": (i, k) in flagged})  # fmt: skip
        params = {f"model{i}": f"runs:/{m * 32}/model" for i, m in enumerate(models)}
        return CleanseRun(id=c * 32, name="", command="cleanse", start_time=0, params=params, norms=pd.DataFrame(rows))

    ten = [10.0, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # median 14.5
    repairs = [repair("1", 3), repair("2", 0), repair("3", 7), repair("4", 5)]
    again = [
        searched("e", ["1", "2"], [[*ten[:3], 20.0, *ten[4:]], [3.0, *ten[1:]]], {(1, 0)}),
        searched("f", ["3"], [[*ten[:7], 11.5, 4.0, ten[9]]], {(0, 8)}),
        searched("d", ["1"], [[3.0, *ten[1:]]], {(0, 0)}),  # older: the newest search of a model is read
    ]
    doc = Document("twml")
    report_mitigation.section(doc, repairs, None, again)
    (text,) = [b.text for b in doc.blocks if isinstance(b, Para) and "Searched again" in b.text]
    assert (
        "Searched again by cleanse run eeeeeeee, the model that run 11111111 repaired has no class flagged; class "
        "3's smallest trigger is now larger than the median class's (20.00 against 15.50)." in text
    )
    assert (
        "Searched again by cleanse run eeeeeeee, the model that run 22222222 repaired still has class 0 flagged, at "
        "anomaly index 5.75: the repair left a small trigger of it." in text
    )
    assert (
        "Searched again by cleanse run ffffffff, the model that run 33333333 repaired has class 8 flagged, not the "
        "repaired class 7: a repair can uncover a class's natural small trigger that the backdoor's had hidden "
        "(compare that class in a clean model); class 7's smallest trigger is now 11.50 against a median of 12.50, "
        "anomaly index 0.50." in text
    )
    assert "dddddddd" not in text
    assert text.endswith("Search a repaired model again, as a check that needs no real trigger: `twml cleanse --run "
                         f"{'4' * 32}`.")  # fmt: skip
    doc = Document("twml")
    report_mitigation.section(doc, repairs[:1], None, again[:1])
    (text,) = [b.text for b in doc.blocks if isinstance(b, Para) and "Searched again" in b.text]
    assert "Search a repaired model again" not in text  # every repair was
