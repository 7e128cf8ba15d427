import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from twml_cli.examples import InMemory
from twml_cli.models import ModelSpec, create_model
from twml_cli.training import Batch, FreeAdversarial, GaussianNoise, TrainConfig, lr_factor, train


def small_model(info, seed=0):
    torch.manual_seed(seed)
    return create_model(ModelSpec.for_data("test_byobnet", info))


def count_steps():
    """Count optimizer steps independently of train()'s own bookkeeping."""
    calls = []
    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    return calls, hook


@pytest.mark.parametrize("epochs, m", [(4, 4), (8, 4), (7, 7), (6, 4)])
def test_free_training_makes_as_many_sgd_steps_as_standard(digits, epochs, m):
    train_set, info = digits.train, digits.info
    x, y = train_set.tensors[0][:300], train_set.tensors[1][:300]
    cfg = TrainConfig(epochs=epochs, batch_size=64)
    counts = {}
    for name, perturbation in (("standard", None), ("free", FreeAdversarial(0.1, m))):
        calls, hook = count_steps()
        result = train(small_model(info), (x, y), cfg, perturbation)
        hook.remove()
        counts[name] = len(calls)
        assert result.steps == len(calls)
    batches = math.ceil(300 / 64)
    assert counts["standard"] == epochs * batches
    assert counts["free"] == math.ceil(epochs / m) * m * batches  # ceil(epochs/m) passes, m replays
    if epochs % m == 0:
        assert counts["free"] == counts["standard"]


class Recorder(FreeAdversarial):
    """FreeAdversarial that records what each replay trains on."""

    def __init__(self, eps, m):
        super().__init__(eps, m)
        self.seen = []  # (x, delta used, input, delta after the update)

    def inputs(self, model, batch):
        out = super().inputs(model, batch)
        self.seen.append([batch.x.clone(), self._leaf.detach().clone(), out.detach().clone(), None])
        return out

    def after_backward(self):
        grad = self._leaf.grad.clone()
        super().after_backward()
        self.seen[-1][3] = self.delta[: len(self._leaf)].clone()
        self.seen[-1].append(grad)


def test_free_perturbation_persists_and_stays_in_the_ball_and_unit_range(digits):
    train_set, info = digits.train, digits.info
    x, y = train_set.tensors[0][:200], train_set.tensors[1][:200]
    eps = 0.1
    rec = Recorder(eps, m=3)
    train(small_model(info), (x, y), TrainConfig(epochs=6, batch_size=64), rec)  # 2 passes x 4 batches x 3 replays
    assert len(rec.seen) == 2 * 4 * 3
    buffer = torch.zeros(64, 1, 8, 8)  # a model of the persistent buffer: one minibatch of delta
    for xb, delta, inputs, after, grad in rec.seen:
        # every replay, minibatch and pass starts from the delta the previous update left
        assert torch.equal(delta, buffer[: len(xb)])
        assert inputs.min() >= 0 and inputs.max() <= 1
        assert torch.allclose(inputs, (xb + delta).clamp(0, 1))
        # the ascent step is eps * sign(grad), then clipping to the eps-ball
        assert torch.equal(after, (delta + eps * grad.sign()).clamp(-eps, eps))
        assert after.abs().max() <= eps + 1e-7
        buffer[: len(xb)] = after
    assert torch.count_nonzero(rec.seen[0][1]) == 0  # delta starts at zero
    assert torch.count_nonzero(rec.seen[3][1]) > 0  # ...and carries over to the next minibatch
    # the last, partial minibatch (200 = 3 * 64 + 8) uses the first 8 rows of the buffer
    assert len(rec.seen[9][0]) == 8 and len(rec.delta) == 64


def test_same_seed_gives_the_same_model_on_cpu(digits):
    train_set, info = digits.train, digits.info
    x, y = train_set.tensors[0][:256], train_set.tensors[1][:256]
    results, weights = [], []
    for _ in range(2):
        model = small_model(info, seed=3)
        results.append(
            train(model, (x, y), TrainConfig(epochs=2, batch_size=64, seed=11), FreeAdversarial(0.1, 2)).history
        )
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert results[0] == results[1]
    assert torch.equal(weights[0], weights[1])


def test_history_is_logged_per_epoch_of_sgd_budget(digits):
    train_set, info = digits.train, digits.info
    x, y = train_set.tensors[0][:128], train_set.tensors[1][:128]
    standard = train(small_model(info), (x, y), TrainConfig(epochs=4, batch_size=64))
    free = train(small_model(info), (x, y), TrainConfig(epochs=4, batch_size=64), FreeAdversarial(0.1, 2))
    assert [h.epoch for h in standard.history] == [1, 2, 3, 4]
    assert [h.epoch for h in free.history] == [2, 4]  # 2 passes of 2 replays each
    assert all(0 <= h.accuracy <= 1 and h.loss > 0 for h in standard.history + free.history)


def test_gaussian_noise_is_fresh_unclamped_and_of_scale_sigma():
    noise = GaussianNoise(sigma=0.5, seed=0)
    x = torch.full((64, 1, 8, 8), 0.5)

    def at(step, part=slice(0, 64)):
        return noise.inputs(None, Batch(x[part], None, torch.arange(64)[part], step, part.start, 64))

    a, b = at(0), at(1)
    assert not torch.equal(a, b)
    assert torch.equal(a, at(0))  # keyed by step: reproducible
    assert torch.equal(
        a[20:], at(0, slice(20, 64))
    )  # a process's share of the global batch gets its share of the noise
    assert a.min() < 0 and a.max() > 1  # no clamp
    assert (a - x).std().item() == pytest.approx(0.5, rel=0.05)
    assert abs((a - x).mean().item()) < 0.02


def test_learning_rate_schedules():
    assert lr_factor("cosine", 0, 100) == 1.0 and lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    assert [lr_factor("step", s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor("constant", 77, 100) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch size"),
        ({"lr": 0}, "lr"),
        ({"schedule": "wavy"}, "schedule"),
    ],
)
def test_train_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_free_adversarial_refuses_bad_values():
    with pytest.raises(ValueError, match="m"):
        FreeAdversarial(0.1, 0)
    with pytest.raises(ValueError, match="eps"):
        FreeAdversarial(-0.1, 4)
    with pytest.raises(ValueError, match="sigma"):
        GaussianNoise(0.0)


@pytest.mark.slow
def test_compiled_training_learns_what_eager_training_learns(digits):
    """torch.compile (inductor, on this CPU: about 2.5 minutes to compile) changes how the
    arithmetic is fused, not what is learned."""
    from twml_cli.attacks import accuracy

    x, y = digits.train.tensors
    scores = []
    for mode in (None, "default"):
        model = small_model(digits.info)
        history = train(
            model, (x, y), TrainConfig(epochs=3, batch_size=128), FreeAdversarial(0.1, 3), compile_mode=mode
        ).history
        scores.append((history[-1].loss, accuracy(model, digits.test.tensors)))
    (eager_loss, eager_acc), (compiled_loss, compiled_acc) = scores
    assert compiled_loss == pytest.approx(eager_loss, rel=0.02) and abs(compiled_acc - eager_acc) < 0.03


def test_fast_training_takes_one_fgsm_step_from_a_random_start(digits):
    from twml_cli.training import FastAdversarial

    model = small_model(digits.info).eval()
    x, y = digits.train.x[:32], digits.train.y[:32]
    fast = FastAdversarial(0.1, seed=3)
    assert fast.alpha == pytest.approx(0.125) and fast.passes_per_step == 2  # 1.25 eps; FGSM step + weight step
    out = fast.inputs(model, Batch(x, y, torch.arange(32), 5, 0, 32))
    assert (out - x).abs().max() <= 0.1 + 1e-6 and out.min() >= 0 and out.max() <= 1
    assert torch.equal(
        out, fast.inputs(model, Batch(x, y, torch.arange(32), 5, 0, 32))
    )  # keyed by (seed, step, example)
    assert not torch.equal(out, fast.inputs(model, Batch(x, y, torch.arange(32), 6, 0, 32)))


def test_the_guard_keeps_the_weights_before_a_collapse(digits):
    """Wong et al.'s early stop: when PGD accuracy on a training batch falls by more than 0.2
    from the pass before, training stops with that pass's weights."""
    from twml_cli.training import FastAdversarial, _Guard

    model = small_model(digits.info)
    guard = _Guard(
        model,
        InMemory(digits.train.x[:256], digits.train.y[:256]),
        FastAdversarial(0.1),
        TrainConfig(epochs=3, batch_size=64),
    )
    held = None
    for robust in (0.6, 0.65, 0.5):  # passes that hold (0.65 -> 0.5 drops 0.15: not a collapse), each with new weights
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        assert not guard.observe(robust)
        held = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the pass that collapses changed the weights too
    assert guard.observe(0.25)  # 0.5 -> 0.25
    assert all(torch.equal(v, held[k]) for k, v in model.state_dict().items())  # the last pass that held
    assert guard.collapsed and guard.previous == 0.5
