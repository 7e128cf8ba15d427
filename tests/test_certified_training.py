"""Training the base classifier for larger certified radii: consistency regularization, SmoothAdv
and MACER, each against a hand computation or an analytic answer, then through the training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from twml_cli import certified_training as ct
from twml_cli.perturbations import Batch, noise_draws


def test_consistency_kl_is_zero_when_all_copies_agree_and_positive_when_they_differ():
    logits = torch.randn(1, 6, 10).repeat(3, 1, 1)
    y = torch.arange(6)
    loss, kl, entropy = ct.consistency_loss(logits, y, lam=20.0, eta=0.5)
    assert kl.abs().max() < 1e-6
    ce = nn.functional.cross_entropy(logits[0], y)
    assert loss.item() == pytest.approx((ce + 0.5 * entropy.mean()).item(), rel=1e-5)
    _, kl, _ = ct.consistency_loss(logits + 0.5 * torch.randn_like(logits), y, lam=20.0, eta=0.5)
    assert (kl > 1e-4).all()


def test_consistency_loss_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 4, 5))
    y = np.array([0, 3, 1, 4])
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    p_bar = p.mean(0)
    ce = -np.log(p[:, np.arange(4), y]).mean()
    kl = (p_bar * (np.log(p_bar) - np.log(p))).sum(-1).mean(0)
    h = -(p_bar * np.log(p_bar)).sum(-1)
    expected = ce + (10 * kl + 0.5 * h).mean()
    loss, _, _ = ct.consistency_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(y), lam=10.0, eta=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def _linear(num_classes=2, d=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, num_classes)).eval()


def test_smoothadv_attack_on_a_linear_model_is_the_exact_l2_worst_case():
    """Two classes, no noise, an interior point: -log p_y grows fastest along w_other - w_y, so
    PGD with normalized steps reaches eps * (w_other - w_y) / ||w_other - w_y|| exactly."""
    model = _linear()
    x = torch.full((3, 1, 4, 4), 0.5)
    y = torch.tensor([0, 1, 0])
    eps = 0.2
    x_adv = ct.smoothadv_attack(model, x, y, torch.zeros(2, *x.shape), eps, steps=4)
    w = model[1].weight.detach()
    for i, label in enumerate(y.tolist()):
        direction = (w[1 - label] - w[label]) / (w[1 - label] - w[label]).norm()
        assert torch.allclose((x_adv[i] - x[i]).flatten(), eps * direction, atol=1e-5)


def test_smoothadv_stays_in_its_ball_and_the_image_and_raises_the_soft_classifiers_loss(digits):
    model = _linear(10, 64)
    x, y = digits.test.x[:64].float(), digits.test.y[:64]
    noise = 0.25 * torch.randn(4, *x.shape, generator=torch.Generator().manual_seed(1))
    eps = 0.5
    x_adv = ct.smoothadv_attack(model, x, y, noise, eps, steps=5)
    moved = (x_adv - x).flatten(1).norm(dim=1)
    assert moved.max() <= eps + 1e-5 and moved.min() > 0.1
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        before = ct.soft_smoothed_nll(ct.forward_copies(model, x, noise), y)
        after = ct.soft_smoothed_nll(ct.forward_copies(model, x_adv, noise), y)
    assert (after > before).float().mean() > 0.95 and after.mean() > before.mean() + 0.1
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(ct.smoothadv_attack(model, x, y, noise, 0.0, steps=5), x)


def test_smoothadv_warms_up_eps_linearly_over_its_warmup_passes():
    method = ct.SmoothAdv(0.25, eps=1.0, steps=2, m=2, warmup=4)
    assert [method.eps_at(p) for p in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert method.passes_per_step == 6 and method.copies == 2


def test_macer_hinge_is_zero_beyond_gamma_and_on_wrong_points_and_gamma_minus_xi_elsewhere():
    sigma, beta, gamma = 0.5, 1.0, 8.0
    # one draw per image, so G is a plain softmax: [confident, near the boundary, wrong]
    logits = torch.tensor([[[30.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 2.0, 0.0]]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0])
    hinge = ct.macer_hinge(logits, y, sigma, beta, gamma)
    assert hinge[0] == 0 and hinge[2] == 0
    p = torch.softmax(logits[0, 1], -1).numpy()
    xi = norm.ppf(p[0]) - norm.ppf(p[1])
    assert 0 < xi < gamma
    assert hinge[1].item() == pytest.approx(sigma / 2 * (gamma - xi), rel=1e-9)
    loss = ct.macer_loss(logits, y, sigma, beta, gamma, lam=12.0)
    expected = -torch.log(torch.softmax(logits[0], -1)[range(3), 0]).mean() + 12.0 * hinge.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_macer_deferred_trains_without_the_radius_term_first():
    method = ct.Macer(0.5, k=2, lam=12.0, deferred=2)
    assert [method.lam_at(p) for p in range(4)] == [0.0, 0.0, 12.0, 12.0]
    logits, y = torch.randn(2, 5, 3), torch.zeros(5, dtype=torch.long)
    assert ct.macer_loss(logits, y, 0.5, 16.0, 8.0, lam=0.0) == ct.soft_smoothed_nll(logits, y, floor=1e-10).mean()


def test_macer_averages_the_draws_softmax_before_the_margin():
    """G is the mean of the draws' softmax: two draws that each favour another class give a tie."""
    logits = torch.tensor([[[5.0, 0.0]], [[0.0, 5.0]]], dtype=torch.float64)
    xi, _ = ct.macer_margin(logits, beta=1.0)
    assert abs(xi.item()) < 1e-9


def test_noise_draws_do_not_depend_on_how_the_global_batch_is_split():
    x = torch.rand(6, 1, 4, 4)
    whole = noise_draws(Batch(x, torch.zeros(6), torch.arange(6), 3, 0, 6), 2, 0.5, seed=1)
    parts = [
        noise_draws(Batch(x[s:e], torch.zeros(e - s), torch.arange(s, e), 3, s, 6), 2, 0.5, 1)
        for s, e in [(0, 4), (4, 6)]
    ]
    assert torch.equal(torch.cat(parts, 1), whole) and whole.shape == (2, 6, 1, 4, 4)
    assert whole.std().item() == pytest.approx(0.5, rel=0.25)


@pytest.mark.parametrize(
    "method",
    [
        ct.Consistency(0.25, m=2, lam=20.0, seed=0),
        ct.SmoothAdv(0.25, eps=0.5, steps=2, m=2, warmup=1, seed=0),
        ct.Macer(0.25, k=4, lam=12.0, seed=0),
    ],
    ids=lambda m: m.name,
)
def test_each_method_trains_through_the_loop_deterministically_and_learns(digits, method):
    from twml_cli import attacks, training

    def run():
        model = _linear(10, 64)
        model.train()
        config = training.TrainConfig(epochs=3, batch_size=128, lr=0.1, seed=0)
        result = training.train(model, digits.train.tensors, config, method)
        return model, result

    first, result = run()
    second, _ = run()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert result.passes_per_step == method.passes_per_step and result.steps == 3 * math.ceil(len(digits.train) / 128)
    assert 0 < result.history[-1].accuracy <= 1 and result.history[-1].loss < result.history[0].loss
    assert attacks.accuracy(first, digits.test, 512) > 0.5


def test_smooth_trains_each_method_logs_its_settings_and_cost_and_the_report_compares_them(cli):
    """A sweep over training methods and seeds: each run logs its method's resolved settings and
    cost, and the report compares the methods at the sigma with an ACR table and figure."""
    args = ["--sigma", "0.25", "--seed", "0,1", "--epochs", "2", "--num-examples", "20", "--n", "100"]
    result = cli("smooth", "--training", "gaussian,consistency", "--consistency-lambda", "0", *args)
    assert result.code == 0, result.err
    runs = cli.runs("smooth")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    consistency = [r for r in runs if r.data.params["training"] == "consistency"]
    assert len(consistency) == 2
    for r in consistency:
        assert r.data.params["consistency_lambda"] == "20.0"  # 0: the paper's value at sigma 0.25
        assert r.data.params["consistency_m"] == "2"
        assert r.info.run_name == f"consistency sigma=0.25 seed={r.data.params['seed']}"
        assert r.data.metrics["passes_per_step"] == 2
    gaussian = [r for r in runs if r.data.params["training"] == "gaussian"]
    assert all("consistency_lambda" not in r.data.params and r.data.metrics["passes_per_step"] == 1 for r in gaussian)
    assert cli("report", "--out", "out").code == 0
    md = (cli.path / "out" / "twml.md").read_text()
    section = md[md.index("How should the base classifier be trained?") :]
    assert "| consistency | 2 |" in section and "| gaussian | 2 |" in section
    assert (
        "The ACR, from Gaussian training to consistency," in section and "Gaussian's training time per epoch" in section
    )
    assert (cli.path / "out" / "twml" / "training-methods-sigma-0.25.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--training", "sgd"], "unknown training 'sgd': use one of gaussian, consistency"),
        (["--training", "consistency", "--consistency-m", "1"], "needs m >= 2 noisy copies"),
        (["--training", "macer", "--macer-gamma", "0"], "MACER needs beta > 0, gamma > 0"),
        (["--training", "smoothadv", "--smoothadv-steps", "0"], "SmoothAdv steps and warmup must be >= 1"),
    ],
)
def test_bad_training_settings_end_with_one_line(cli, args, message):
    result = cli("smooth", *args)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err
    assert cli.runs() == []
