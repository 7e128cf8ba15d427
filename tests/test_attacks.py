import pytest
import torch
from torch import nn

from twml_cli.attacks import PGDConfig, accuracy, classified_right, evaluate_robustness, pgd
from twml_cli.models import ModelSpec, create_model


class Linear2(nn.Module):
    """Two classes, logits (0, w.x + b): the CE-maximizing L-inf perturbation is known exactly."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x):
        z = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(z), z], dim=1)


def linear_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 4, 4, generator=g)
    w[w.abs() < 0.05] = 0.3  # no zero weights: every pixel has a defined worst direction
    x = 0.3 + 0.4 * torch.rand(6, 1, 4, 4, generator=g)  # far from 0 and 1: clamping never binds
    return Linear2(w, 0.1).eval(), x, w


def test_classified_right_reads_each_image_of_a_linear_model_in_order():
    model, x, w = linear_case()
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    predicted = ((x.flatten(1) @ w.flatten() + 0.1) > 0).long()  # class 1 where w.x + b > 0
    for batch_size in (1, 4, 1024):  # the same images in the same order, however they are batched
        found = classified_right(model, (x, y), batch_size)
        assert found.dtype == torch.bool and torch.equal(found, predicted == y)
    assert accuracy(model, (x, y)) == int((predicted == y).sum()) / len(y)
    assert 0 < accuracy(model, (x, y)) < 1  # the case has images right and wrong: the check can fail


@pytest.mark.parametrize("label", [0, 1])
def test_pgd_reaches_the_exact_optimum_of_a_linear_model(label):
    model, x, w = linear_case()
    y = torch.full((len(x),), label)
    eps = 0.05
    x_adv = pgd(model, x, y, PGDConfig(eps=eps, alpha=eps / 4, steps=12), seed=3)
    # class 1 wants w.x large, so the attack pushes each pixel against sign(w); class 0, along it
    direction = -1 if label == 1 else 1
    assert torch.allclose(x_adv, x + direction * eps * torch.sign(w), atol=1e-6)


def test_pgd_stays_in_the_eps_ball_and_in_unit_range(digits):
    test, info = digits.test, digits.info
    torch.manual_seed(0)
    model = create_model(ModelSpec.for_data("test_byobnet", info)).eval()
    x, y = test.tensors[0][:64], test.tensors[1][:64]
    x_adv = pgd(model, x, y, PGDConfig(eps=0.2, alpha=0.1, steps=5, restarts=2))
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


def test_more_restarts_never_fool_fewer_examples(digits):
    test, info = digits.test, digits.info
    torch.manual_seed(0)
    model = create_model(ModelSpec.for_data("test_byobnet", info)).eval()
    x, y = test.tensors[0][:100], test.tensors[1][:100]
    fooled = {}
    for restarts in (1, 4):
        x_adv = pgd(model, x, y, PGDConfig(eps=0.1, alpha=0.025, steps=3, restarts=restarts), seed=7)
        with torch.no_grad():
            fooled[restarts] = model(x_adv).argmax(1) != y
    assert torch.all(fooled[4] | ~fooled[1])  # restart 0 is shared, the best of 4 keeps its successes


def test_robustness_figures_are_consistent_and_batch_independent(digits):
    test, info = digits.test, digits.info
    torch.manual_seed(1)
    model = create_model(ModelSpec.for_data("test_byobnet", info)).eval()
    x, y = test.tensors[0][:90], test.tensors[1][:90]
    cfg = PGDConfig(eps=0.1, alpha=0.05, steps=3)
    a = evaluate_robustness(model, (x, y), cfg, batch_size=512, seed=5)
    b = evaluate_robustness(model, (x, y), cfg, batch_size=7, seed=5)
    assert (a.accuracy, a.pgd_success_rate) == (b.accuracy, b.pgd_success_rate)
    assert a.accuracy == accuracy(model, (x, y))
    assert a.pgd_success_rate == pytest.approx(1 - a.robust_accuracy)
    # with eps = 0 the attack can do nothing: success is exactly the clean error
    z = evaluate_robustness(model, (x, y), PGDConfig(eps=0.0, alpha=0.01, steps=2))
    assert z.pgd_success_rate == pytest.approx(1 - z.accuracy)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": 1.5, "alpha": 0.1}, "eps must lie in"),
        ({"eps": 0.1, "alpha": 0.0}, "alpha"),
        ({"eps": 0.1, "alpha": 0.1, "steps": 0}, "steps"),
        ({"eps": 0.1, "alpha": 0.1, "restarts": 0}, "restarts"),
    ],
)
def test_pgd_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PGDConfig(**kwargs)
