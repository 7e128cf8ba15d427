"""`twml attack`: PGD with other settings against any logged model, as a run of its own."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import attacks, config, models
from ..errors import TwmlError
from .common import Data, Hooks, Run, check_fits, data_name, device, load_data, load_model, model_source
from .train import record_robustness, robustness_lines

COMMAND = "attack"


@dataclass
class Inputs:
    settings: config.Attack
    device: torch.device
    data: Data
    model: models.Classifier


@dataclass
class Outcome:
    settings: config.Attack
    robustness: attacks.RobustnessResult


def run_name(s: config.Attack) -> str:
    return "attack"


def tags(s: config.Attack) -> dict[str, str]:
    return {f"twml.{k}": v for k, v in model_source(s.model_run).items()}


def prepare(s: config.Attack) -> Inputs:
    if not s.model_run:
        raise TwmlError("name the model to attack with --run (a run id, runs:/RUN_ID/model or a folder)")
    dev = device(s)
    model = load_model(s.model_run, dev)
    data = load_data(data_name(s.dataset, model, "digits"), s, model)
    check_fits(model, data.info, f"model {s.model_run}")
    return Inputs(dataclasses.replace(s, dataset=data.info.name), dev, data, model)


def compute(inputs: Inputs, hooks: Hooks = Hooks()) -> Outcome:
    s = inputs.settings
    model = models.compiled(inputs.model, s.compile_mode(inputs.device, len(inputs.data.test) * (s.pgd_steps + 2) * s.pgd_restarts))
    robust = attacks.evaluate_robustness(model, inputs.data.test, s.pgd_config(), s.eval_batch_size, s.seed, hooks.progress, s.autoattack_config())
    return Outcome(s, robust)


def extra_params(inputs: Inputs) -> dict[str, str]:
    return {**model_source(inputs.settings.model_run), "model": inputs.model.spec.arch}


def record(run: Run, outcome: Outcome) -> None:
    record_robustness(run, outcome.robustness)


def summarize(outcome: Outcome) -> list[str]:
    return robustness_lines(outcome.robustness, outcome.settings.pgd_config())
