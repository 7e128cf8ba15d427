"""Adaptive certification on a radius grid (Smooth.certify_grid): as sound as CERTIFY, far
cheaper where the answer is clear, and the CLI's --adaptive."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm
from torch import nn

from twml_cli.smoothing import ABSTAIN, ESTIMATION, Smooth, look_levels, rounds


class LinearBinary(nn.Module):
    """Class 1 when w.x > 0, |w| = 1: the smoothed classifier's exact radius is the L2 margin
    |w.x| (pA = Phi(margin / sigma))."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w / w.norm(), requires_grad=False)

    def forward(self, x):
        z = x.flatten(1) @ self.w.flatten()
        return torch.stack([-z, z], dim=1)


def points(margins: np.ndarray, w: torch.Tensor) -> torch.Tensor:
    """Images whose margin to the linear boundary is each of `margins`."""
    unit = (w / w.norm()).flatten()
    return (torch.tensor(margins, dtype=torch.float32)[:, None] * unit[None]).view(-1, *w.shape)


@pytest.fixture(scope="module")
def linear():
    return LinearBinary(torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0)))


def test_no_more_than_alpha_of_the_certificates_exceed_the_true_margin(linear):
    sigma, radii, alpha = 0.25, [0.25, 0.5, 0.75], 0.05
    rng = np.random.default_rng(1)
    # most points just inside a grid radius (certifying it would be wrong), some anywhere
    margins = np.concatenate([r - rng.uniform(0, 0.06, 400) for r in radii] + [rng.uniform(0, 1.2, 400)])
    cert = Smooth(linear, 2, sigma, seed=2).certify_grid(points(margins, linear.w), radii, 100, 8000, alpha, 20_000)
    wrong = cert.radius > margins + 1e-12
    n = len(margins)
    assert wrong.sum() <= alpha * n + 3 * np.sqrt(alpha * (1 - alpha) * n)  # at most alpha, within binomial noise
    assert np.all(cert.prediction[cert.radius > 0] == 1) and np.all(cert.radius[cert.prediction == ABSTAIN] == 0)
    assert set(np.unique(cert.radius)) <= {0.0, *radii}


def test_points_far_beyond_the_grid_are_certified_there_with_far_fewer_samples(linear):
    alpha, looks = 0.001, rounds(20_000)
    cert = Smooth(linear, 2, 0.25, seed=0).certify_grid(
        points(np.full(50, 2.0), linear.w), [0.25, 0.5, 0.75], 100, 20_000, alpha, 20_000
    )
    assert np.all(cert.radius == 0.75)
    # All votes agree (margin 8 sigma), so after n samples the lower bound at level alpha_k is alpha_k^(1/n):
    # radius 0.75 = 3 sigma needs it to reach Phi(3) = 0.99865, first at n >= 7,250 at the earlier looks' alpha / 18.
    levels = look_levels(len(looks), alpha)
    first = next(n for n, a in zip(looks, levels) if a ** (1 / n) >= norm.cdf(3.0))
    assert first == 9000 and np.log(levels[0]) / np.log(norm.cdf(3.0)) == pytest.approx(7250, abs=10)
    assert np.all(cert.samples == 100 + first) and cert.samples.mean() < 20_100 / 2


def test_the_looks_grow_1_5_times_and_spend_alpha_half_at_the_last():
    assert rounds(20_000) == [500, 800, 1200, 1800, 2700, 4000, 6000, 9000, 13_500, 20_000]
    assert rounds(700) == [500, 700] and rounds(300) == [300]
    levels = look_levels(10, 0.001)
    assert levels.sum() == pytest.approx(0.001) and levels[-1] == 0.0005 and np.all(levels[:-1] == 0.0005 / 9)
    assert look_levels(1, 0.01).tolist() == [0.01]


def test_looks_cut_anywhere_count_fixed_ns_own_samples(linear):
    x = points(np.array([0.1, 0.3]), linear.w)
    smooth = Smooth(linear, 2, 0.5, seed=4)
    whole = smooth._counts(x, [7, 8], ESTIMATION, 2500, 1000)  # fixed n = 2,500: blocks of 1,000, 1,000, 500
    cuts = [0, 500, 1700, 2000, 2500]
    parts = sum(smooth._counts(x, [7, 8], ESTIMATION, b, 300, skip=a, total=2500) for a, b in zip(cuts, cuts[1:]))
    assert torch.equal(whole, parts) and int(whole.sum()) == 2 * 2500


def test_a_larger_futility_gives_up_sooner_and_is_never_wrong_for_it(linear):
    # margins just inside 0.5 and 0.75: out of reach of n_max, so only futility or the cap stops them
    margins = np.concatenate([np.full(40, 0.49), np.full(40, 0.74)])
    smooth = Smooth(linear, 2, 0.25, seed=5)
    runs = {
        f: smooth.certify_grid(points(margins, linear.w), [0.25, 0.5, 0.75], 100, 20_000, 0.001, 20_000, futility=f)
        for f in (0.01, 0.2, 0.4)
    }
    means = [runs[f].samples.mean() for f in (0.01, 0.2, 0.4)]
    assert means[0] > means[1] > means[2]
    for cert in runs.values():
        assert np.all(cert.radius <= margins) and np.all(cert.radius >= np.where(margins > 0.5, 0.5, 0.25))
    with pytest.raises(ValueError, match="futility"):
        smooth.certify_grid(points(margins[:1], linear.w), [0.25], 100, 1000, 0.001, 1000, futility=0.5)


@pytest.mark.slow  # 20-40 s; benchmarks/adaptive.py measures the same at full size
@pytest.mark.e2e  # a whole certification of the digits test split, twice
def test_against_fixed_n_on_digits_it_certifies_as_much_with_far_fewer_samples(digits):
    """A small version of the benchmark (benchmarks/adaptive.py runs n = 20,000 on all 360 images)."""
    from twml_cli.models import ModelSpec, create_model
    from twml_cli.smoothing import certified_accuracy, certify_dataset
    from twml_cli.training import GaussianNoise, TrainConfig, train

    torch.manual_seed(0)
    model = create_model(ModelSpec.for_data("test_byobnet", digits.info))
    train(model, digits.train.tensors, TrainConfig(epochs=8, batch_size=128), GaussianNoise(0.25))
    smooth, radii, indices = Smooth(model, 10, 0.25), [0.25, 0.5, 0.75], list(range(0, 360, 6))
    fixed = certify_dataset(smooth, digits.test.tensors, indices, 100, 4000, 0.001, 2000)
    adaptive = certify_dataset(smooth, digits.test.tensors, indices, 100, 4000, 0.001, 2000, grid=radii)
    for r in radii:
        a, f = (certified_accuracy(t["radius"], t["correct"], [r])[0] for t in (adaptive, fixed))
        assert a >= f - 0.02, (r, a, f)
    assert adaptive["samples"].mean() < fixed["samples"].mean() / 2


def test_the_cli_logs_an_adaptive_run(reproduced):
    cli, source = reproduced.cli, reproduced.smooth[0.2]
    result = cli(
        "smooth",
        "--run",
        source.info.run_id,
        "--sigma",
        "0.2",
        "--radii",
        "0.1,0.25",
        "--adaptive",
        "--n",
        "4000",
        "--num-examples",
        "24",
        "--experiment",
        "adaptive",
    )
    assert result.code == 0, result.err
    (run,) = cli.runs("smooth", experiment="adaptive")
    p, m = run.data.params, run.data.metrics
    assert (p["adaptive"], p["radii"], p["futility"]) == ("True", "[0.1, 0.25]", "0.2")
    assert {"certified_accuracy_r0.1", "certified_accuracy_r0.25", "samples_per_image"} <= set(m) and m[
        "samples_per_image"
    ] < 4100
    table = pd.read_csv(cli.download(run, "certify.csv"))
    assert table["samples"].mean() == pytest.approx(m["samples_per_image"]) and set(table["radius"]) <= {0.0, 0.1, 0.25}
    assert "Adaptive certification on the grid" in result.out
    assert cli("report", "--experiment", "adaptive", "--out", "adaptive-report").code == 0
    md = (cli.path / "adaptive-report" / "adaptive.md").read_text()
    assert (
        "at most n = 4,000" in md
        and "| adaptive, n ≤ 4,000, futility 0.2, grid 0.1, 0.25 |" in md
        and "Adaptive rows were" in md
    )
    refused = cli("smooth", "--adaptive", "--experiment", "adaptive")
    assert refused.code == 2 and "adaptive certification needs a grid" in refused.err
