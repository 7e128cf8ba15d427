import numpy as np
import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

from twml_cli.models import ModelSpec, create_model
from twml_cli.smoothing import (
    ABSTAIN,
    Smooth,
    average_certified_radius,
    certified_accuracy,
    certify_dataset,
    lower_confidence_bound,
)


class LinearBinary(nn.Module):
    """Class 1 when w.x + b > 0: the L2 distance to the decision boundary is |w.x + b| / |w|."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.b = b

    def forward(self, x):
        z = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([-z, z], dim=1)

    def margin(self, x):
        return ((x.flatten(1) @ self.w.flatten() + self.b).abs() / self.w.norm()).numpy()


@pytest.fixture
def linear():
    g = torch.Generator().manual_seed(0)
    model = LinearBinary(torch.randn(1, 4, 4, generator=g), 0.0)
    x = torch.rand(12, 1, 4, 4, generator=g)
    return model, x


def test_certificates_never_exceed_the_exact_margin_and_approach_it_with_many_samples(linear):
    model, x = linear
    sigma = 0.25
    margin = model.margin(x)
    labels = (x.flatten(1) @ model.w.flatten() > 0).long().numpy()
    cert = Smooth(model, 2, sigma, seed=1).certify_batch(x, n0=100, n=100_000, alpha=0.001, batch_size=50_000)
    certified = cert.prediction != ABSTAIN
    assert certified.sum() >= 8
    assert np.all(cert.prediction[certified] == labels[certified])
    assert np.all(cert.radius <= margin + 1e-9)
    # For a linear f, pA = Phi(margin / sigma) exactly, so with n = 100,000 the radius falls
    # short of the margin only by the confidence bound's width: about 0.003 near pA = 1/2 and
    # 0.011 at margin 2.5 sigma (sigma = 0.25).
    close = certified & (margin < 2.5 * sigma)
    assert close.sum() >= 8
    assert np.all(margin[close] - cert.radius[close] < 0.02)


def test_predict_returns_the_class_far_from_the_boundary_and_abstains_on_it(linear):
    model, x = linear
    smooth = Smooth(model, 2, 0.1, seed=0)
    far = x[np.argmax(model.margin(x))]
    assert smooth.predict(far, n=1000, alpha=0.001, batch_size=500) == int((far.flatten() @ model.w.flatten()) > 0)
    w = model.w.flatten()
    on_boundary = (far.flatten() - (far.flatten() @ w) / (w @ w) * w).view(1, 4, 4)  # project onto w.x = 0
    assert smooth.predict(on_boundary, n=1000, alpha=0.001, batch_size=500) == ABSTAIN


class Constant(nn.Module):
    """Votes for class 0 whatever the noise: the best case for certification."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], dim=1) + 0 * self.p


def test_tiny_n_cannot_certify():
    x = torch.zeros(1, 2, 2)
    smooth = Smooth(Constant(), 2, sigma=0.5)
    # with n <= 9 even unanimous votes give pA_lower = 0.001 ** (1 / n) < 1/2: always abstain
    for n in range(1, 10):
        assert smooth.certify(x, n0=100, n=n, alpha=0.001, batch_size=100) == (ABSTAIN, 0.0)
    # n = 10 is the first that can: 10 of 10 votes give pA_lower = 0.001 ** 0.1 = 0.50119 > 1/2,
    # a radius of 0.5 * Phi^-1(0.50119) = 0.0015 (not an abstention, despite folklore)
    c, r = smooth.certify(x, n0=100, n=10, alpha=0.001, batch_size=100)
    assert c == 0 and r == pytest.approx(0.5 * norm.ppf(0.001**0.1))
    assert r < 0.002


def test_n_10_abstains_unless_unanimous():
    assert lower_confidence_bound(9, 10, 0.001) < 0.5 <= lower_confidence_bound(10, 10, 0.001)


def test_the_bound_is_the_beta_quantile():
    n = 1000
    for n_a in (1, 17, 500, 660, 999, 1000):
        assert lower_confidence_bound(n_a, n, 0.001) == pytest.approx(beta.ppf(0.001, n_a, n - n_a + 1), rel=1e-10)
    assert lower_confidence_bound(0, n, 0.001) == 0.0
    assert np.allclose(lower_confidence_bound(np.array([5, 50]), 100, 0.01), beta.ppf(0.01, [5, 50], [96, 51]))
    # n = 100, alpha = 0.001: the top class needs 66 votes
    assert lower_confidence_bound(65, 100, 0.001) < 0.5 <= lower_confidence_bound(66, 100, 0.001)


def test_certified_accuracy_counts_abstentions_as_wrong_and_never_increases():
    labels = np.array([0, 1, 2, 3, 4])
    prediction = np.array([0, 1, ABSTAIN, 0, 4])
    radius = np.array([0.3, 0.1, 0.0, 0.5, 0.0])
    correct = prediction == labels
    acc = certified_accuracy(radius, correct, np.array([0.0, 0.1, 0.2, 0.3, 0.31]))
    assert acc.tolist() == pytest.approx([0.6, 0.4, 0.2, 0.2, 0.0])  # the abstention never counts
    assert average_certified_radius(radius, correct) == pytest.approx((0.3 + 0.1) / 5)
    rng = np.random.default_rng(0)
    r, ok = rng.random(200), rng.random(200) > 0.3
    curve = certified_accuracy(r, ok, np.linspace(0, 1.2, 50))
    assert np.all(np.diff(curve) <= 0) and curve[-1] == 0


@pytest.fixture(scope="module")
def small_base(digits):
    test, info = digits.test, digits.info
    torch.manual_seed(0)
    return create_model(ModelSpec.for_data("test_byobnet", info)).eval(), test.tensors


def test_a_certificate_does_not_depend_on_batch_size_or_company(small_base):
    model, (x, y) = small_base
    smooth = Smooth(model, 10, 0.25, seed=4)
    idx = [3, 40, 41, 200, 359]
    together = smooth.certify_batch(x[idx], n0=100, n=1500, alpha=0.001, batch_size=4000, indices=idx)
    small = smooth.certify_batch(x[idx], n0=100, n=1500, alpha=0.001, batch_size=37, indices=idx)
    assert np.array_equal(together.count, small.count) and np.array_equal(together.prediction, small.prediction)
    for j, i in enumerate(idx):
        c, r = smooth.certify(x[i], n0=100, n=1500, alpha=0.001, batch_size=256, index=i)
        assert (c, r) == (together.prediction[j], pytest.approx(together.radius[j]))
    # a different seed draws different noise
    other = Smooth(model, 10, 0.25, seed=5).certify_batch(x[idx], 100, 1500, 0.001, 4000, indices=idx)
    assert not np.array_equal(other.count, together.count)


def test_certification_on_two_threads_counts_every_vote_as_one_thread_does(small_base):
    """Two threads run two noisy batches at once (runtime.forward_pool): the same votes, to the
    last one, as one thread running them in turn; a lost or doubled batch would change them."""
    model, (x, y) = small_base
    smooth = Smooth(model, 10, 0.5, seed=2)
    idx = list(range(0, 360, 9))
    before = torch.get_num_threads()
    counts = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            counts[threads] = smooth._counts(x[idx], idx, 1, 1000, 256)
            assert torch.get_num_threads() == threads  # the pool gives the threads back
    finally:
        torch.set_num_threads(before)
    assert int(counts[2].sum()) == 1000 * len(idx)
    assert torch.equal(counts[1], counts[2])


def test_certify_dataset_builds_the_per_example_table(small_base):
    model, (x, y) = small_base
    smooth = Smooth(model, 10, 0.25)
    table = certify_dataset(smooth, (x, y), [0, 10, 20, 30], n0=20, n=200, alpha=0.01, batch_size=128)
    assert (
        set(table) == {"idx", "label", "predict", "radius", "correct", "time_s", "samples"}
        and (table["samples"] == 220).all()
    )
    assert table["idx"].tolist() == [0, 10, 20, 30] and table["label"].tolist() == y[[0, 10, 20, 30]].tolist()
    assert np.array_equal(table["correct"], table["predict"] == table["label"])
    assert np.all(table["radius"][table["predict"] == ABSTAIN] == 0) and np.all(table["time_s"] > 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"n0": 0}, "n0"), ({"n": 0}, "n must"), ({"alpha": 1.0}, "alpha"), ({"batch_size": 0}, "batch")],
)
def test_certify_refuses_bad_arguments(kwargs, message):
    args = {"n0": 10, "n": 10, "alpha": 0.01, "batch_size": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        Smooth(Constant(), 2, 0.5).certify(torch.zeros(1, 2, 2), **args)
    with pytest.raises(ValueError, match="sigma"):
        Smooth(Constant(), 2, 0.0)
