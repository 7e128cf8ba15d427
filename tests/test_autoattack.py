"""AutoAttack (APGD-CE, APGD-T, FAB-T, Square): analytic answers on a linear model, the pieces
against their papers, and the evaluation that runs it beside PGD."""

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from twml_cli.attacks import AutoAttackConfig, PGDConfig, autoattack, evaluate_robustness
from twml_cli.attacks.apgd import apgd, checkpoints, dlr_targeted
from twml_cli.attacks.fab import project_linf
from twml_cli.attacks.square import square, window_fraction


class Linear2(nn.Module):
    """Two classes, logits (0, w.x + b): the minimal L-inf adversarial distance is |w.x + b| / |w|_1."""

    def __init__(self, w: torch.Tensor, b: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = b

    def forward(self, x):
        z = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(z), z], dim=1)


@pytest.fixture
def linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4, 4, generator=g)
    w[w.abs() < 0.05] = 0.3
    x = 0.3 + 0.4 * torch.rand(300, 1, 4, 4, generator=g)  # far from 0 and 1: the box never binds at eps 0.05
    z = x.flatten(1) @ w.flatten()
    return Linear2(w).eval(), x, (z > 0).long(), (z.abs() / w.abs().sum()), w


def test_autoattack_leaves_robust_exactly_the_points_beyond_eps(linear):
    model, x, y, distance, _ = linear
    eps = 0.05
    adv, robust, after, stages = autoattack(model, x, y, AutoAttackConfig(eps=eps, n_queries=200), seed=1)
    assert torch.equal(robust, distance > eps)  # the exact L-inf answer, point by point
    assert 0.2 < robust.float().mean() < 0.95  # both kinds of points are there
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert list(after) == ["apgd-ce", "apgd-t", "fab-t", "square"] and after["square"] == int(robust.sum())
    assert all(int(stages[a].sum()) == after[a] for a in after) and torch.equal(stages["square"], robust)
    assert all(not (stages[b] & ~stages[a]).any() for a, b in zip(list(after), list(after)[1:]))  # robust only shrinks
    with torch.no_grad():
        assert torch.all(model(adv[~robust]).argmax(1) != y[~robust])


def test_apgd_reaches_the_exact_optimum_x_minus_eps_sign_w(linear):
    model, x, y, distance, w = linear
    eps = 0.05
    out = apgd(model, x, y, eps, n_iter=50, seed=3)
    optimum = x + eps * torch.where(y.view(-1, 1, 1, 1) == 1, -torch.sign(w), torch.sign(w))
    robust = distance > eps  # there APGD keeps the point of highest loss: the corner of the ball
    assert torch.allclose(out[robust], optimum[robust], atol=1e-6)


def test_apgd_checkpoints_are_the_papers():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_targeted_is_scale_invariant():
    z = torch.tensor([[5.0, 3.0, 1.0, 0.5, -1.0]])
    y, t = torch.tensor([0]), torch.tensor([1])
    assert dlr_targeted(z, y, t).item() == pytest.approx(-(5 - 3) / (5 - (1 + 0.5) / 2))
    assert dlr_targeted(10 * z + 3, y, t).item() == pytest.approx(dlr_targeted(z, y, t).item())


def test_fab_projection_is_the_smallest_linf_move_onto_the_plane_in_the_box():
    rng = np.random.default_rng(0)
    for _ in range(25):
        d = 6
        p, w, f = rng.random(d), rng.normal(size=d), rng.normal() * 0.5
        move = project_linf(torch.tensor(p)[None], torch.tensor(w)[None], torch.tensor([f], dtype=torch.float64))[
            0
        ].numpy()
        # the same problem as a linear program: min t  s.t. |d_i| <= t, w.d = -f, 0 <= p + d <= 1
        c = np.r_[np.zeros(d), 1.0]
        a_ub = np.r_[np.c_[np.eye(d), -np.ones(d)], np.c_[-np.eye(d), -np.ones(d)]]
        lp = linprog(
            c,
            A_ub=a_ub,
            b_ub=np.zeros(2 * d),
            A_eq=np.r_[w, 0.0][None],
            b_eq=[-f],
            bounds=[(-pi, 1 - pi) for pi in p] + [(0, None)],
        )
        if lp.status == 0:
            assert abs(move @ w + f) < 1e-9 and np.abs(move).max() == pytest.approx(lp.x[-1], abs=1e-7)
        else:  # no point of the box is on the plane: every coordinate moves as far as it can toward it
            assert np.all((p + move <= 1 + 1e-12) & (p + move >= -1e-12))
        assert np.all(p + move >= -1e-12) and np.all(p + move <= 1 + 1e-12)


def test_square_lowers_the_margin_inside_the_ball(linear):
    model, x, y, distance, _ = linear
    eps = 0.05
    out = square(model, x, y, eps, n_queries=300, seed=0)
    assert (out - x).abs().max() <= eps + 1e-6
    with torch.no_grad():
        z = model(out)
    fooled = z.argmax(1) != y
    assert fooled.float().mean() > 0.5 * (distance <= eps).float().mean() and not fooled[distance > eps].any()
    # the original's standard schedule (resc_schedule=False): by query, not rescaled to the budget
    assert [window_fraction(0.8, i) for i in (0, 10, 11, 50, 51, 2500, 4999)] == [
        0.8,
        0.8,
        0.4,
        0.4,
        0.2,
        0.8 / 2**6,
        0.8 / 2**7,
    ]


def test_autoattack_beside_pgd_on_the_digits_model(digits):
    from twml_cli.models import ModelSpec, create_model
    from twml_cli.training import FreeAdversarial, TrainConfig, train

    torch.manual_seed(0)
    model = create_model(ModelSpec.for_data("test_byobnet", digits.info))
    train(model, digits.train.tensors, TrainConfig(epochs=4, batch_size=128), FreeAdversarial(0.1, 2))
    x, y = digits.test.x[:96], digits.test.y[:96]
    cfg = AutoAttackConfig(eps=0.1, n_iter=10, n_targets=3, n_queries=100)
    r = evaluate_robustness(model, (x, y), PGDConfig(eps=0.1, alpha=0.025, steps=10), batch_size=40, autoattack=cfg)
    assert r.autoattack_robust_accuracy <= r.robust_accuracy  # AutoAttack finds at least what PGD-10 finds
    assert r.robust_accuracy_worst <= min(r.autoattack_robust_accuracy, r.robust_accuracy)
    assert list(r.autoattack_after.values()) == sorted(
        r.autoattack_after.values(), reverse=True
    )  # each attack only removes
    again = evaluate_robustness(model, (x, y), PGDConfig(eps=0.1, alpha=0.025, steps=10), batch_size=96, autoattack=cfg)
    assert again.autoattack_robust_accuracy == r.autoattack_robust_accuracy  # keyed by example: batch-independent


def test_attack_autoattack_logs_its_metrics_and_the_report_shows_them_on_the_model(reproduced, tmp_path):
    """`twml attack --run ID --autoattack` (a small budget) on the default's standard model."""
    cli, model = reproduced.cli, reproduced.standard
    args = ("--autoattack-iterations", "5", "--autoattack-queries", "50", "--experiment", "aa")
    result = cli("attack", "--run", model.info.run_id, "--autoattack", *args)
    assert result.code == 0, result.err
    (run,) = cli.runs("attack", experiment="aa")
    m, p = run.data.metrics, run.data.params
    assert p["eval"] == "autoattack" and p["autoattack_iterations"] == "5" and p["model_run"] == model.info.run_id
    assert (
        m["autoattack_robust_accuracy"] <= m["robust_accuracy"]
        and m["robust_accuracy_worst"] <= m["autoattack_robust_accuracy"]
    )
    after = [m[f"autoattack_after_{a}"] for a in ("apgd_ce", "apgd_t", "fab_t", "square")]
    assert after == sorted(after, reverse=True) and after[-1] == m["autoattack_robust_accuracy"]
    assert f"AutoAttack robust accuracy (standard, eps=0.1): {m['autoattack_robust_accuracy']:.4f}" in result.out
    # the report's training table takes a model's AutoAttack from a later attack run on it
    from twml_cli.report.adversarial import aa
    from twml_cli.report.runs import load

    cli.use()
    trained = next(r for r in load("twml").train if r.id == model.info.run_id)
    attacked = next(a for a in load("aa").attack if a.id == run.info.run_id)
    assert aa(trained) == "–" and aa(trained, {trained.id: attacked}) == f"{m['autoattack_robust_accuracy']:.4f}"
