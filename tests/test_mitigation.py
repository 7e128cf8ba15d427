"""Neural Cleanse's mitigation: unlearning and pruning on a planted backdoor, and `twml mitigate`
on the embedded default's Neural Cleanse findings."""

import pytest
import torch

from twml_cli.backdoor import Trigger, attack_success_rate, poison
from twml_cli.mitigation import UnlearnConfig, penultimate, prune, unlearn
from twml_cli.models import ModelSpec, create_model
from twml_cli.training import TrainConfig, train


@pytest.fixture(scope="module")
def planted(digits):
    """A digits model with a 2x2 bottom-right trigger to class 0, and that trigger as a mask/pattern."""
    x, y = digits.train.tensors
    trigger = Trigger(2)
    xp, yp, _ = poison(x, y, target=0, rate=0.1, trigger=trigger, seed=0)
    torch.manual_seed(0)
    model = create_model(ModelSpec.for_data("test_byobnet", digits.info))
    train(model, (xp, yp), TrainConfig(epochs=10, batch_size=128))
    mask = torch.zeros(8, 8)
    mask[6:, 6:] = 1.0
    return model, trigger, mask, torch.ones(1, 8, 8)


def test_unlearning_removes_the_backdoor_and_keeps_accuracy(planted, digits):
    import copy

    from twml_cli.attacks import accuracy

    model, trigger, mask, pattern = planted
    x_test, y_test = digits.test.tensors
    before = attack_success_rate(model, x_test, y_test, 0, trigger)
    assert before > 0.9
    repaired = copy.deepcopy(model)
    unlearn(repaired, *digits.train.tensors, [(mask, pattern)], UnlearnConfig())  # the defaults
    # the matrix's bar (docs/neural-cleanse-measurements.md); 6 epochs with 10% stamped lost 1.1 points here
    assert attack_success_rate(repaired, x_test, y_test, 0, trigger) <= 0.05
    assert accuracy(repaired, digits.test.tensors) >= accuracy(model, digits.test.tensors) - 0.01
    assert not torch.equal(
        next(repaired.parameters()), next(model.parameters())
    )  # a copy was repaired, not the original


def test_unlearning_that_loses_the_clean_images_starts_again_at_half_the_rate(planted, digits):
    """A fine-tune that ends more than restart_fall (2 points) below the unstamped training images'
    accuracy it started at starts again from the model as it was, at half the rate, until one keeps them: the
    fine-tune kept is, weight for weight, unlearning run at that rate from the start, which itself
    never restarts. With the statistics frozen, which makes a fine-tune at four times the rate lose
    them here (on the unstamped images' statistics it keeps them: 0.9959 -> 0.9803)."""
    import copy

    model, _, mask, pattern = planted
    x, y = digits.train.tensors
    wild = copy.deepcopy(model)
    went = unlearn(wild, x, y, [(mask, pattern)], UnlearnConfig(epochs=3, lr=0.02, freeze_norm=True))  # 4x the rate
    assert went.lost and [lr for lr, _ in went.lost] == [0.02 / 2**k for k in range(len(went.lost))]
    assert went.lr == 0.02 / 2 ** len(went.lost) and all(acc < went.started - 0.02 for _, acc in went.lost)
    direct = copy.deepcopy(model)
    kept = unlearn(direct, x, y, [(mask, pattern)], UnlearnConfig(epochs=3, lr=went.lr, freeze_norm=True))
    assert kept.lost == () and kept.lr == went.lr and kept.started == went.started
    assert all(torch.equal(a, b) for a, b in zip(wild.state_dict().values(), direct.state_dict().values()))
    assert went.ended == kept.ended >= went.started - 0.02 and not wild.training
    never = copy.deepcopy(model)  # --unlearn-restart-fall 1: the first fine-tune is kept, whatever it ends at
    once = unlearn(never, x, y, [(mask, pattern)], UnlearnConfig(epochs=3, lr=0.02, restart_fall=1.0, freeze_norm=True))
    assert once.lost == () and once.lr == 0.02 and once.ended == went.lost[0][1]


def test_unlearning_that_never_keeps_the_clean_images_keeps_the_fine_tune_that_ended_highest(
    planted, digits, monkeypatch
):
    """When every fine-tune loses the clean images, the one whose unstamped images ended highest is
    kept (not the last, at the smallest rate): weight for weight the fine-tune at its rate. Here one
    epoch at the default rate (warming up over all of it), with the statistics frozen, ends more than
    4 points down at every rate, and the third of five ends highest, above the last."""
    import copy

    from twml_cli import mitigation
    from twml_cli.studies.mitigate import _restarts

    model, _, mask, pattern = planted
    x, y = digits.train.tensors
    wild = copy.deepcopy(model)
    went = unlearn(wild, x, y, [(mask, pattern)], UnlearnConfig(epochs=1, freeze_norm=True))
    tried = sorted([*went.lost, (went.lr, went.ended)], reverse=True)  # every fine-tune, from the highest rate
    assert [lr for lr, _ in tried] == [0.005 / 2**k for k in range(5)]
    assert went.ended == max(acc for _, acc in tried) > tried[-1][1] and went.ended < went.started - 0.02
    assert went.lr != tried[-1][0]  # the last was not the one kept
    monkeypatch.setattr(mitigation, "RESTARTS", 0)
    direct = copy.deepcopy(model)
    once = unlearn(direct, x, y, [(mask, pattern)], UnlearnConfig(epochs=1, lr=went.lr, freeze_norm=True))
    assert once.ended == went.ended and once.lost == ()
    assert all(torch.equal(a, b) for a, b in zip(wild.state_dict().values(), direct.state_dict().values()))
    lines = _restarts(went, 0.02)
    assert len(lines) == 5
    assert lines[-1].startswith(f"  No fine-tune kept them within 2 points: kept the one at lr {went.lr:g}")
    assert lines[3].endswith(f"-> {tried[-1][1]:.4f})")  # the last rate tried: no "started again"


def test_unlearning_with_frozen_norm_keeps_batchnorm_statistics(planted, digits):
    import copy

    model, _, mask, pattern = planted
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    assert stats  # test_byobnet has BatchNorm
    for freeze in (True, False):
        repaired = copy.deepcopy(model)
        unlearn(repaired, *digits.train.tensors, [(mask, pattern)], UnlearnConfig(epochs=1, freeze_norm=freeze))
        after = repaired.state_dict()
        same = all(torch.equal(after[k], v) for k, v in stats.items())
        assert same == freeze  # frozen: as trained; not frozen: moved by the stamped batches
        assert not repaired.training


def test_clean_statistics_normalize_every_image_with_the_unstamped_images_alone(planted, digits):
    """--unlearn-clean-norm's BatchNorm: the unstamped images of a batch come out as a batch of
    them alone would in train mode, and the running statistics move as that batch's would; the
    stamped images are normalized with the same statistics, so they never enter them. With no image
    stamped it is train-mode BatchNorm (outputs and gradients, in float64). Modes and hooks are
    restored, though a forward raises."""
    import copy

    from twml_cli.mitigation import _CleanStatistics

    model, _, mask, pattern = planted
    x = digits.train.x[:64].double()
    stamped = x.clone()
    stamped[:24] = torch.where(mask.bool(), pattern.double(), stamped[:24])  # the first 24 stamped
    plain, hooked = copy.deepcopy(model).double().train(), copy.deepcopy(model).double().train()
    with _CleanStatistics(hooked, torch.arange(24), 64) as norm:
        order = norm.batch(torch.arange(64))
        assert order.tolist() == [*range(24, 64), *range(24)]  # the unstamped first
        out = hooked(stamped[order])
    assert torch.allclose(out[:40], plain(x[24:]), atol=1e-10)  # the clean images, as a batch of their own
    stats = {k: v for k, v in plain.state_dict().items() if "running_" in k}
    assert all(torch.allclose(hooked.state_dict()[k], v, atol=1e-12) for k, v in stats.items())
    mixed = copy.deepcopy(model).double().train()
    assert not torch.allclose(out[40:], mixed(stamped[order])[40:], atol=1e-3)  # train mode: with the stamped
    assert all(m.training for m in hooked.modules()) and not any(m._forward_pre_hooks for m in hooked.modules())

    plain, hooked = copy.deepcopy(model).double().train(), copy.deepcopy(model).double().train()
    with _CleanStatistics(hooked, torch.tensor([], dtype=torch.long), 64) as norm:
        norm.batch(torch.arange(64))
        ours = hooked(x)
    theirs = plain(x)
    assert torch.allclose(ours, theirs, atol=1e-10)
    grads = torch.autograd.grad(ours.square().sum(), list(hooked.parameters()))
    for mine, want in zip(grads, torch.autograd.grad(theirs.square().sum(), list(plain.parameters()))):
        assert torch.allclose(mine, want, rtol=1e-8, atol=1e-10)

    broken = copy.deepcopy(model).train()
    with pytest.raises(RuntimeError, match="mid-way"), _CleanStatistics(broken, torch.arange(3), 64) as norm:
        norm.batch(torch.arange(64))
        raise RuntimeError("stopped mid-way")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in broken.modules())


def test_unlearning_on_clean_statistics_holds_when_they_are_estimated_again(planted, digits):
    """A repair with frozen statistics (--unlearn-freeze-norm) removes the trigger under those
    statistics only: estimated again on the clean training images (as training on would), they
    bring it back. The default fine-tune normalizes with the unstamped images' statistics and ends
    by estimating them on the clean training images, so estimating them again changes nothing and
    the trigger stays out. Both without the pull on the features, which would hold some of the
    frozen repair in place (at the default 0.5 the trigger comes back to 0.22 here, not 1.0)."""
    import copy

    from twml_cli.mitigation import estimate_norm_statistics

    model, trigger, mask, pattern = planted
    x, y = digits.train.tensors
    x_test, y_test = digits.test.tensors
    success = {}
    for name, config in (
        ("frozen", UnlearnConfig(epochs=3, freeze_norm=True, distill=0)),
        ("clean", UnlearnConfig(epochs=3, distill=0)),  # the default's statistics
    ):
        repaired = copy.deepcopy(model)
        unlearn(repaired, x, y, [(mask, pattern)], config)
        kept = {k: v.clone() for k, v in repaired.state_dict().items() if "running_" in k}
        as_left = attack_success_rate(repaired, x_test, y_test, 0, trigger)
        estimate_norm_statistics(repaired, x)
        success[name] = (as_left, attack_success_rate(repaired, x_test, y_test, 0, trigger))
        if name == "clean":
            assert all(torch.equal(repaired.state_dict()[k], v) for k, v in kept.items())  # estimated at the end
    assert success["frozen"][0] <= 0.05 < 0.5 < success["frozen"][1], success  # 0.0185, then 0.9969 here
    assert success["clean"][0] == success["clean"][1] <= 0.05, success


def test_unlearning_with_distillation_holds_the_clean_images_features(planted, digits):
    """--unlearn-distill: the unstamped images' features (the classifier's input) stay nearer to
    the model's before than plain unlearning leaves them, the trigger still goes, and no hook is
    left on the model. With the statistics frozen, as the pull was chosen (docs/neural-cleanse-measurements.md):
    six epochs on the unstamped images' statistics cost this model 3.3 points, where twenty give
    them back."""
    import copy

    from twml_cli.attacks import accuracy

    model, trigger, mask, pattern = planted
    x, y = digits.train.tensors
    x_test, y_test = digits.test.tensors
    before = penultimate(model, x)
    moved = {}
    for weight in (0.0, 1.0):
        repaired = copy.deepcopy(model)
        unlearn(repaired, x, y, [(mask, pattern)], UnlearnConfig(epochs=6, distill=weight, freeze_norm=True))
        moved[weight] = float(((penultimate(repaired, x) - before) ** 2).sum(1).mean() / (before**2).sum(1).mean())
        assert attack_success_rate(repaired, x_test, y_test, 0, trigger) <= 0.05
        assert accuracy(repaired, digits.test.tensors) >= accuracy(model, digits.test.tensors) - 0.02
        head = repaired.backbone.get_classifier()
        assert not head._forward_hooks and not repaired.training
    assert moved[1.0] < 0.5 * moved[0.0], moved
    with pytest.raises(ValueError, match="distillation weight must be >= 0"):
        UnlearnConfig(distill=-0.1)
    from twml_cli.mitigation import _FeaturePull

    repaired = copy.deepcopy(model)
    with (
        pytest.raises(RuntimeError, match="mid-way"),
        _FeaturePull(repaired, torch.arange(3), len(x), UnlearnConfig(), None),
    ):
        assert repaired.backbone.get_classifier()._forward_hooks
        raise RuntimeError("stopped mid-way")
    assert not repaired.backbone.get_classifier()._forward_hooks  # gone, though unlearning raised


def test_unlearning_holds_the_stamped_images_features_at_their_clean_images(planted, digits):
    """--unlearn-hold-stamped: each stamped image's features are pulled toward what the model
    before unlearning made of that same image unstamped. Before any step the pull is nil for a
    trigger that changes nothing (each stamped image meets its own original, not another image) and
    not for the real one; after unlearning, the trigger moves the other classes' features less
    than unlearning without the pull leaves it, and the backdoor goes. With the statistics frozen,
    as the pull was measured (docs/neural-cleanse-measurements.md): on the unstamped images' statistics it
    moves them less (0.27 against 0.36 here)."""
    import copy

    from twml_cli.cleanse import stamp
    from twml_cli.mitigation import _FeaturePull, draw, stamped_at

    model, trigger, mask, pattern = planted
    x, y = digits.train.tensors
    chosen = draw(len(x), 0.15, torch.Generator().manual_seed(0))
    idx = torch.arange(128)  # a batch holding stamped and unstamped images
    assert 0 < int(torch.isin(idx, chosen).sum()) < 128
    config = UnlearnConfig(distill=0, hold_stamped=1.0)
    pulls = {}
    for name, m in (("nothing", torch.zeros_like(mask)), ("trigger", mask)):
        xs = stamped_at(x, [(m, pattern)], chosen)
        with _FeaturePull(model, chosen, len(x), config, x[chosen]) as held, torch.no_grad():
            model.eval()
            model(xs[idx])
            pulls[name] = float(held.pull(xs[idx], idx))
    assert pulls["nothing"] < 1e-6 < 1e-3 < pulls["trigger"], pulls
    others = x[y != 0]
    clean = penultimate(model, others)
    moved = {}
    for weight in (0.0, 1.0):
        repaired = copy.deepcopy(model)
        config = UnlearnConfig(epochs=6, distill=0, hold_stamped=weight, freeze_norm=True)
        unlearn(repaired, x, y, [(mask, pattern)], config)
        stamped = penultimate(repaired, stamp(others, mask, pattern))
        moved[weight] = float(((stamped - clean) ** 2).sum(1).mean() / (clean**2).sum(1).mean())
        assert attack_success_rate(repaired, *digits.test.tensors, 0, trigger) <= 0.05
    assert moved[1.0] < 0.7 * moved[0.0], moved  # 0.34 against 0.75 here
    with pytest.raises(ValueError, match="stamped-image pull weight must be >= 0"):
        UnlearnConfig(hold_stamped=-1)


def test_several_reversed_triggers_share_the_stamped_images_in_turn():
    from twml_cli.mitigation import draw, stamped_at

    def stamp_some(x, triggers, fraction, g):  # as unlearning draws and stamps
        return stamped_at(x, triggers, draw(len(x), fraction, g))

    x = torch.zeros(101, 1, 8, 8)
    corner = []
    for i, j in ((0, 0), (7, 7), (0, 7)):
        mask = torch.zeros(8, 8)
        mask[i, j] = 1.0
        corner.append((mask, torch.ones(1, 8, 8)))
    for n in (1, 2, 3):
        out = stamp_some(x, corner[:n], 0.3, torch.Generator().manual_seed(0))
        lit = [out[:, 0, i, j] == 1 for i, j in ((0, 0), (7, 7), (0, 7))][:n]
        counts = [int(v.sum()) for v in lit]
        assert sum(counts) == 31 and max(counts) - min(counts) <= 1  # ceil(0.3 * 101), split evenly
        assert int(torch.stack(lit).sum(0).max()) == 1  # no image carries two triggers
        assert int((out != 0).flatten(1).any(1).sum()) == 31 and (x == 0).all()  # the rest untouched, x not changed
    first = stamp_some(x, corner[:1], 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(first, stamp_some(x, corner[:1] * 2, 0.3, torch.Generator().manual_seed(0)))  # same draw
    with pytest.raises(ValueError, match="at least one reversed trigger"):
        stamp_some(x, [], 0.3, torch.Generator())


def test_warmup_schedule_rises_for_an_epoch_then_falls_to_zero():
    from twml_cli.mitigation import _rates

    config = UnlearnConfig(epochs=3, lr=0.01, schedule="warmup")
    rates = _rates(config, per_epoch=10)
    assert (
        len(rates) == 30 and rates[0] == pytest.approx(0.001) and rates[9] == pytest.approx(0.01)
    )  # linear up to the peak
    assert rates[10] == pytest.approx(0.01) and all(a > b for a, b in zip(rates[10:], rates[11:]))  # then a cosine down
    assert rates[-1] < 0.001 and min(rates) > 0
    assert (
        _rates(UnlearnConfig(epochs=2, lr=0.01, schedule="constant"), per_epoch=5) == [0.01] * 10
    )  # constant: the paper's
    with pytest.raises(ValueError, match="unknown unlearning schedule 'step'"):
        UnlearnConfig(schedule="step")


def test_pruning_removes_the_neurons_the_trigger_excites(planted, digits):
    import copy

    model, trigger, mask, pattern = planted
    repaired = copy.deepcopy(model)
    result = prune(repaired, *digits.train.tensors, 0, mask, pattern, step=0.05, stop_below=0.05)
    head = repaired.backbone.get_classifier()
    assert (
        0 < result.pruned <= result.neurons // 2 and (head.weight == 0).all(0).sum() == result.pruned
    )  # whole input columns zeroed
    assert result.reversed_success < 0.05 or result.pruned == result.neurons // 2
    assert penultimate(repaired, digits.test.x[:5]).shape == (5, result.neurons)


def test_the_input_filter_rejects_the_trigger_and_at_most_its_share_of_clean_images(planted, digits, tmp_path):
    """The paper's filter: the penultimate neurons the reversed trigger excites most (by their mean
    activation stamped less unstamped), a threshold on their mean activation that rejects at most 5%
    of the clean images it is calibrated on; behind it, a rejected image is neither right nor sent
    to the target."""
    from twml_cli.attacks import accuracy
    from twml_cli.backdoor import stamped_success_rate
    from twml_cli.cleanse import stamp
    from twml_cli.mitigation import Filtered, fit_filter, load_filter, save_filter

    model, trigger, mask, pattern = planted
    x, y = digits.train.tensors
    fitted = fit_filter(model, x, y, 0, [(mask, pattern)])  # the paper's 1% of the neurons, 5% of clean images rejected
    others = x[y != 0]
    gain = penultimate(model, stamp(others, mask, pattern)).mean(0) - penultimate(model, others).mean(0)
    assert len(fitted.neurons) == max(1, round(0.01 * fitted.of)) and fitted.of == gain.numel()
    assert set(fitted.neurons.tolist()) == set(gain.topk(len(fitted.neurons)).indices.tolist())

    def rejected_share(input_filter, images):  # what the filter rejects of the images
        return input_filter.rejects(penultimate(model, images)).float().mean().item()

    profiles = penultimate(model, x)[:, fitted.neurons].mean(1)
    assert rejected_share(fitted, x) == (profiles > fitted.threshold).float().mean().item() <= 0.05
    assert (profiles >= fitted.threshold).float().mean().item() > 0.05  # the threshold is a calibration image's
    assert rejected_share(fit_filter(model, x, y, 0, [(mask, pattern)], rejects=0.0), x) == 0.0
    corner = torch.zeros(8, 8)
    corner[0, 0] = 1.0  # a second search's trigger, elsewhere: the neurons are ranked by the mean of both gains
    both = fit_filter(model, x, y, 0, [(mask, pattern), (corner, pattern)], neurons=0.05)
    other = penultimate(model, stamp(others, corner, pattern)).mean(0) - penultimate(model, others).mean(0)
    assert both.neurons.tolist() == ((gain + other) / 2).topk(len(both.neurons)).indices.tolist()
    assert len(both.neurons) == round(0.05 * fitted.of)
    x_test, y_test = digits.test.tensors
    assert rejected_share(fitted, trigger.apply(x_test[y_test != 0])) > 0.9
    behind = Filtered(model, fitted)
    rejected = fitted.rejects(penultimate(model, x_test))
    right = (model(x_test).argmax(1) == y_test) & ~rejected
    assert accuracy(behind, (x_test, y_test)) == pytest.approx(right.float().mean().item())
    assert (behind(x_test).argmax(1) == 10).tolist() == rejected.tolist()  # the extra logit wins where it rejects
    before = attack_success_rate(model, x_test, y_test, 0, trigger)
    assert before > 0.9 and attack_success_rate(behind, x_test, y_test, 0, trigger) <= 0.05
    assert stamped_success_rate(behind, x_test[:0], 0, trigger.apply) == 0.0  # no image: no success
    save_filter(fitted, tmp_path / "f.safetensors")
    back = load_filter(tmp_path / "f.safetensors")
    assert torch.equal(back.neurons, fitted.neurons) and (back.threshold, back.of) == (fitted.threshold, fitted.of)


def test_the_filters_tradeoff_figure_traces_every_threshold_and_marks_the_one_chosen():
    """What each threshold rejects: from rejecting nothing (0, 0) to rejecting everything (1, 1),
    never falling, through the dot at the threshold chosen; one curve per kind of stamped image."""
    import numpy as np

    from twml_cli.figures import filter_tradeoff_figure

    clean = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    stamped = {"a": np.array([0.95, 1.5, 2.0, 0.15]), "b": np.array([0.05, 0.25])}
    fig = filter_tradeoff_figure(clean, stamped, threshold=0.85)
    ax = fig.axes[0]
    curves = [line for line in ax.lines if line.get_linestyle() == "-"]
    dots = [line for line in ax.lines if line.get_marker() == "o" and len(line.get_xdata())]
    assert [c.get_label() for c in curves] == ["a", "b"] and len(dots) == 2
    for curve, dot, values in zip(curves, dots, stamped.values()):
        x, y = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
        assert (x[0], y[0], x[-1], y[-1]) == (0, 0, 1, 1)
        assert (np.diff(x) >= 0).all() and (np.diff(y) >= 0).all()
        share = ((clean > 0.85).mean(), (values > 0.85).mean())  # 0.2 of the clean images, 0.75 and 0 stamped
        assert (dot.get_xdata()[0], dot.get_ydata()[0]) == share
        assert any(np.isclose(x, share[0]) & np.isclose(y, share[1]))  # on its curve
    assert ax.get_xlim()[1] >= 0.5  # wide enough for the chosen dot (2.5 x 0.2)
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("lost, gained", [(6, 0), (5, 1), (0, 6), (3, 3), (7, 2), (12, 30), (1, 0)])
def test_a_repairs_lost_and_gained_images_are_tested_by_mcnemars_exact_test(lost, gained):
    """Two-sided: the binomial(lost + gained, 1/2) outcomes no likelier than the one seen, summed."""
    from math import comb

    from twml_cli.results import AccuracyChange

    n = lost + gained
    chance = [comb(n, k) / 2**n for k in range(n + 1)]
    expected = sum(c for c in chance if c <= chance[lost] * (1 + 1e-12))
    assert AccuracyChange(lost, gained).p_value() == pytest.approx(min(1.0, expected), rel=1e-9)
    assert AccuracyChange(lost, gained).p_value() == pytest.approx(AccuracyChange(gained, lost).p_value(), rel=1e-12)


def test_a_repairs_changed_images_in_words():
    from twml_cli.results import AccuracyChange

    assert AccuracyChange(6, 0).in_words() == "6 test images lost, 0 gained; McNemar's exact test p = 0.031"  # 2 / 64
    assert AccuracyChange(1, 1).in_words() == "1 test image lost, 1 gained; McNemar's exact test p = 1"
    assert AccuracyChange(0, 0).in_words() == "no test image changed"


def test_mitigate_repairs_the_flagged_model_of_the_default(reproduced):
    from twml_cli.results import AccuracyChange

    cli, cleanse = reproduced.cli, reproduced.cleanse
    results = []
    for method in ("unlearn", "prune", "filter"):
        result = cli(
            "mitigate", "--cleanse-run", cleanse.info.run_id, "--mitigation", method, "--experiment", "mitigation"
        )
        assert result.code == 0, result.err
        results.append(result)
    runs = {r.data.params["mitigation"]: r for r in cli.runs("mitigate", experiment="mitigation")}
    unlearned = runs["unlearn"]
    m, p = unlearned.data.metrics, unlearned.data.params
    assert unlearned.data.tags["twml.cleanse_run"] == cleanse.info.run_id == p["cleanse_run"]
    assert p["model_run"] == reproduced.backdoor.info.run_id and p["target"] == "0"
    assert p["reversed_triggers"] == "2"  # both searches' reversed triggers stamped
    assert p["unlearn_distill"] == "0.5"  # the clean images' features held
    assert p["unlearn_restart_fall"] == "0.02" and m["unlearn_restarts"] == 0  # this repair keeps its clean images
    assert m["unlearn_train_accuracy"] >= m["unlearn_train_accuracy_before"] - 0.02
    assert "unlearning with the 2 searches' reversed triggers" in results[0].out
    assert m["attack_success_rate_before"] == reproduced.backdoor.data.metrics["attack_success_rate"]
    # at most 0.05 on 119 to 121 of the matrix's 124 detected cells in each of three draws (at most 0.1265;
    # docs/neural-cleanse-measurements.md, "How strongly to hold the clean images' features")
    assert m["attack_success_rate"] <= 0.05
    # a repair's accuracy change is a draw: 3 to 6 of those 124 cells lose more than a point in a draw, at worst 1.4
    assert m["accuracy"] >= m["accuracy_before"] - 0.02
    # the images it changed, one by one, make up the change in accuracy on the 360 test images
    for run in runs.values():
        r = run.data.metrics
        lost, gained = int(r["test_images_lost"]), int(r["test_images_gained"])
        assert lost - gained == round((r["accuracy_before"] - r["accuracy"]) * 360), run.data.params["mitigation"]
    change = AccuracyChange(int(m["test_images_lost"]), int(m["test_images_gained"]))
    assert f"Clean accuracy: {m['accuracy_before']:.4f} -> {m['accuracy']:.4f} ({change.in_words()})" in results[0].out
    # unlearning changes few answers: on the matrix's 205 detected models (first draw), 3 to 6 (quartiles), at most 17
    assert m["test_images_lost"] + m["test_images_gained"] <= 17
    # the filter only rejects: an image it lets through keeps the model's answer, so it never gains one
    f = runs["filter"].data.metrics
    assert f["test_images_gained"] == 0 and 0 < f["test_images_lost"] <= round(f["filter_clean_rejected"] * 360)
    assert p["unlearn_clean_norm"] == "True" and p["unlearn_freeze_norm"] == "False"  # the repair that holds
    assert m["reversed_success"] < m["reversed_success_before"]
    assert m["unlearn_lr_used"] == 0.005 and m["unlearn_restarts"] == 0  # the default's fine-tune keeps its images
    assert "lost the clean training images" not in results[0].out
    assert cli.model_files(unlearned) == {"model.safetensors", "spec.json"}  # the repaired model
    check = f"Check the repair by searching it again: twml cleanse --run {unlearned.info.run_id}"
    assert check in results[0].out
    quick = ["--searches", "1", "--search-steps", "3", "--search-images", "40", "--experiment", "mitigation"]
    studied = cli("cleanse", "--run", p["model_run"], *quick)  # a search of the backdoored model, before the recheck
    assert studied.code == 0, studied.err
    searched = cli(*check.split(": ")[1].split()[1:], *quick)  # the command it prints searches the repaired model
    assert searched.code == 0, searched.err
    assert f"Accuracy of model 0 (run {unlearned.info.run_id[:8]}): {m['accuracy']:.4f}" in searched.out
    from twml_cli import config
    from twml_cli.studies import cleanse as cleanse_study

    cli.use()  # which class each searched model was repaired for: the mitigate run's, none for the backdoor run's
    both = config.resolve_one("cleanse", config.load_preset(), {"model_runs": [unlearned.info.run_id, p["model_run"]]})
    assert cleanse_study.prepare(both).repaired == [0, None]
    assert runs["prune"].data.params["reversed_triggers"] == "1"  # pruning ranks neurons by the first search's
    pruned = runs["prune"].data.metrics
    assert pruned["pruned_neurons"] > 0 and pruned["attack_success_rate"] < pruned["attack_success_rate_before"]
    assert "Real trigger's attack success rate:" in results[1].out
    filtered = runs["filter"]  # the paper's input filter: the model unchanged, no model logged, the filter instead
    fm = filtered.data.metrics
    assert filtered.data.params["reversed_triggers"] == "2" and cli.model_files(filtered) == set()
    from twml_cli.mitigation import load_filter

    fitted = load_filter(cli.download(filtered, "input-filter.safetensors"))
    assert len(fitted.neurons) == fm["filter_neurons"] == max(1, round(0.01 * fm["penultimate_neurons"]))
    assert fitted.threshold == fm["filter_threshold"] and fitted.of == fm["penultimate_neurons"]
    # the matrix: attack success at most 0.05 behind the filter on 271 of its 312 detected cells, all in a corner
    assert fm["filter_real_rejected"] >= 0.9 and fm["attack_success_rate"] <= 0.05
    assert 0 < fm["filter_clean_rejected"] <= 0.1  # calibrated to reject 5% of the clean training images
    cost = fm["accuracy_before"] - fm["accuracy"]
    assert 0 <= cost <= fm["filter_clean_rejected"] + 1e-9  # each rejected image costs at most its own answer
    assert "Check the repair" not in results[2].out  # the model it filters is the one the cleanse run searched
    assert {"input-filter.safetensors", "filter-tradeoff.png"} <= cli.artifacts(filtered)
    assert f"The filter is input-filter.safetensors in run {filtered.info.run_id}: " in results[2].out
    assert f"Test images carrying the real trigger rejected: {fm['filter_real_rejected']:.4f}" in results[2].out
    # at ten times the rate, over 3 epochs, with the statistics frozen, the fine-tune wrecks the clean images and
    # starts again at half the rate (on the unstamped images' statistics, the default, it keeps them)
    wild = cli(
        "mitigate", "--cleanse-run", cleanse.info.run_id, "--unlearn-lr", "0.05", "--unlearn-epochs", "3",
        "--unlearn-freeze-norm", "--experiment", "mitigation",
    )  # fmt: skip
    assert wild.code == 0, wild.err
    (restarted,) = [
        r for r in cli.runs("mitigate", experiment="mitigation") if r.data.params.get("unlearn_lr") == "0.05"
    ]
    m = restarted.data.metrics
    assert m["unlearn_restarts"] >= 1 and m["unlearn_lr_used"] == 0.05 / 2 ** m["unlearn_restarts"]
    assert "Unlearning at lr 0.05 lost the clean training images" in wild.out
    # the stamped images' features held at their clean images' too: logged, and named in the report's row
    held = cli(
        "mitigate", "--cleanse-run", cleanse.info.run_id, "--unlearn-hold-stamped", "0.3", "--experiment", "mitigation"
    )
    assert held.code == 0, held.err
    (pulled,) = [
        r for r in cli.runs("mitigate", experiment="mitigation") if r.data.params.get("unlearn_hold_stamped") == "0.3"
    ]
    assert pulled.data.metrics["attack_success_rate"] <= 0.05
    assert unlearned.data.params["unlearn_hold_stamped"] == "0.0"  # off by default
    assert cli("report", "--experiment", "mitigation", "--out", "out").code == 0
    md = (cli.path / "out" / "mitigation.md").read_text()
    section = md[md.index("### Mitigation") :]
    # section 3 reads the search of the models as they were; the recheck of the repaired one is read under its repair
    recheck, study = (r.info.run_id for r in cli.runs("cleanse", experiment="mitigation"))
    assert study == studied.out.split("Run id: ")[1].split()[0]
    assert f"The newest cleanse run ({study[:8]}; 1 newer one searched repaired models, under Mitigation)" in md
    assert f"Searched again by cleanse run {recheck[:8]}, the model that run {unlearned.info.run_id[:8]} repaired" in md
    assert f"`twml cleanse --run {runs['prune'].info.run_id}`" in section  # not searched again: the command
    assert section.count("unlearning fine-tunes for") == 1  # each method described once ...
    assert f"Filtering of class 0 (run {filtered.info.run_id[:8]}) rejected" in section
    shown = f"mitigation/mitigate-{filtered.info.run_id[:8]}-filter-tradeoff.png"
    assert f"]({shown})" in section and (cli.path / "out" / shown).is_file()  # its trade-off, in the report
    assert f"--run {filtered.info.run_id}" not in section  # a filter's model is not searched again
    assert "| --unlearn-epochs 3, --unlearn-lr 0.05, --unlearn-freeze-norm |" in section  # ... and what one changed
    assert "| --unlearn-hold-stamped 0.3 |" in section
    lr = f"{m['unlearn_lr_used']:g}"
    restarts = int(m["unlearn_restarts"])
    assert (
        f"Unlearning of class 0 (run {restarted.info.run_id[:8]}) at lr 0.05 lost the clean training images and "
        f"started again from the model as it was at half the rate ({restarts} restart{'s' * (restarts > 1)}): the "
        f"model kept was fine-tuned at lr {lr}. It took the real trigger's attack success" in section
    )
    refused = cli("cleanse", "--run", filtered.info.run_id, *quick)
    assert refused.code == 2
    assert "is an input filter (twml mitigate --mitigation filter) and holds no model" in refused.err
    assert len(cli.runs("cleanse", experiment="mitigation")) == 2  # the refusal left no run


def test_mitigate_needs_a_cleanse_run_that_flagged_something(cli):
    result = cli("mitigate")
    assert result.code == 2 and "no finished cleanse run" in result.err and cli.runs() == []
    # the newest cleanse run searched a repaired model (the check twml mitigate prints) and flagged none: the error
    # names the cleanse run the repair acted on
    client = cli.client()
    experiment = client.create_experiment("twml")

    def logged(command: str, params: dict, verdict: str | None = None) -> str:
        tags = {"twml.command": command, **({"twml.verdict": verdict} if verdict else {})}
        run = client.create_run(experiment, tags=tags)
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    repair = logged("mitigate", {"cleanse_run": "c" * 32})
    logged("cleanse", {"model0": repair}, verdict="none")
    result = cli("mitigate", "--mitigation", "prune")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "searched models twml mitigate repaired and flagged none: there is nothing to mitigate" in result.err
    assert result.err.strip().endswith(f"give --cleanse-run {'c' * 32}")
    assert len(cli.runs()) == 2  # nothing logged
    # a search of a model twml mitigate did not make: the run itself is read (and here holds nothing)
    logged("cleanse", {"model0": repair, "model1": logged("train", {})}, verdict="none")
    result = cli("mitigate")
    assert result.code == 2 and "holds no norms.csv" in result.err
