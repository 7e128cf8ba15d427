"""`twml backdoor`: BadNets (Gu et al., 2017): poison the training set, train as usual, measure
clean accuracy and attack success."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import attacks, backdoor, config, figures, models, results, runtime, training
from ..data import MemoryDataSet
from ..errors import TwmlError
from ..examples import InMemory
from .common import Hooks, Run, artifacts, device, in_memory, new_model, with_augmentation
from .train import record_training

COMMAND = "backdoor"


@dataclass
class Inputs:
    settings: config.Backdoor
    device: torch.device
    data: MemoryDataSet
    trigger: backdoor.Trigger
    poisoned: InMemory  # the training set with the poisoned images
    chosen: torch.Tensor  # indices of the poisoned images
    model: models.Classifier


@dataclass
class Outcome:
    settings: config.Backdoor
    model: models.Classifier
    training: training.TrainResult
    accuracy: float
    attack_success_rate: float
    trigger: backdoor.Trigger
    poisoned: int  # how many training images
    num_train: int
    example: tuple[torch.Tensor, torch.Tensor, int]  # a clean image, its poisoned copy, its label


def run_name(s: config.Backdoor) -> str:
    return f"badnets-target{s.target}"


def prepare(s: config.Backdoor) -> Inputs:
    dev = device(s)
    data = in_memory(s.dataset, s, COMMAND)
    h, w = data.info.input_size
    if not 0 <= s.target < data.info.num_classes:
        raise TwmlError(
            f"target class {s.target} is outside the classes 0..{data.info.num_classes - 1} of '{data.info.name}'"
        )
    s = dataclasses.replace(
        with_augmentation(s, data), trigger_size=s.trigger_size or backdoor.default_trigger_size(h, w)
    )
    try:
        trigger = backdoor.Trigger(s.trigger_size, s.position)
        x_p, y_p, chosen = backdoor.poison(
            data.train.x.cpu(), data.train.y.cpu(), s.target, s.poison_rate, trigger, s.seed
        )
    except ValueError as err:
        raise TwmlError(str(err)) from None
    return Inputs(s, dev, data, trigger, InMemory(x_p, y_p), chosen, new_model(s, data.info, dev))


def compute(inputs: Inputs, hooks: Hooks = Hooks()) -> Outcome:
    s, model = inputs.settings, inputs.model
    mode = s.compile_mode(inputs.device, s.epochs * len(inputs.poisoned))
    with runtime.phase("train"):
        result = training.train(
            model, inputs.poisoned, s.train_config(), None, hooks=hooks.training(s), compile_mode=mode
        )
    x_test, y_test = inputs.data.test.x.cpu(), inputs.data.test.y.cpu()
    with runtime.phase("evaluate"):
        accuracy = attacks.accuracy(model, inputs.data.test, s.eval_batch_size)
        success = backdoor.attack_success_rate(model, x_test, y_test, s.target, inputs.trigger, s.eval_batch_size)
    i = int(inputs.chosen[0])
    example = (inputs.data.train.x[i].cpu(), inputs.poisoned.x[i], int(inputs.data.train.y[i]))
    return Outcome(
        s, model, result, accuracy, success, inputs.trigger, len(inputs.chosen), len(inputs.poisoned), example
    )


def datasets(inputs: Inputs) -> list:
    """What the run trained on is the poisoned set (its own digest), evaluated on the clean test set."""
    name = inputs.data.info.name
    return [(f"{name} (poisoned)", inputs.poisoned, "train"), (name, inputs.data.test, "test")]


def extra_params(inputs: Inputs) -> dict:
    return {"method": "badnets", "poisoned_images": len(inputs.chosen)}


def metrics(outcome: Outcome) -> results.BackdoorMetrics:
    return results.BackdoorMetrics(outcome.accuracy, outcome.attack_success_rate)


def record(run: Run, outcome: Outcome) -> None:
    run.log_model(outcome.model, outcome.settings.register)  # first: the metrics below are linked to it
    record_training(run, outcome.training)
    run.log_metrics(results.metrics(metrics(outcome)))
    clean, triggered, label = outcome.example
    with artifacts(run) as folder:
        pair, alone, stamped = results.BACKDOOR_EXAMPLES
        figures.save(figures.example_figure(clean, triggered, label, outcome.settings.target), folder / pair)
        figures.save_image(clean, folder / alone)
        figures.save_image(triggered, folder / stamped)


def summarize(o: Outcome) -> list[str]:
    t, target = o.trigger, o.settings.target
    return [
        f"Time (in seconds) to complete training on poisoned data: {o.training.train_time_s:.4f}",
        f"Poisoned training images: {o.poisoned} of {o.num_train} (target class {target}, {t.size}x{t.size} "
        f"{t.position} trigger)",
        f"Model accuracy (clean test): {o.accuracy:.4f}",
        f"Attack success rate (triggered test images not of class {target}): {o.attack_success_rate:.4f}",
    ]
