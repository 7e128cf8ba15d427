"""twml's AutoAttack against two libraries' on the same models: torchattacks' AutoAttack
(version 'standard', a port of the original: APGD-CE, APGD-T, FAB-T, Square) and ART's
(its own composition: APGD-CE, APGD-DLR, DeepFool, Square, five restarts each). Robust
accuracy, per-example agreement with twml and time, on the digits default's standard and
free (m=4) models, eps 0.1.

The libraries are not twml's dependencies (torchattacks pins requests~=2.25.1 and would
downgrade requests, idna and urllib3 under MLflow; ART's AutoAttack is not the standard one).
Install them beside, without their pins, to run this:

    pip install --no-deps --target /tmp/aa-libs torchattacks==3.5.1 adversarial-robustness-toolbox==1.20.1
    PYTHONPATH=.:benchmarks:/tmp/aa-libs python benchmarks/autoattack_compare.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from twml_cli import config
from twml_cli.attacks import AutoAttackConfig, autoattack
from twml_cli.studies import train
from twml_cli.studies.common import load_data


def robust_mask(model, x, y, adv) -> np.ndarray:
    with torch.no_grad():
        return ((model(adv).argmax(1) == y) & (model(x).argmax(1) == y)).numpy()


def twml_aa(model, x, y, eps):
    return autoattack(model, x, y, AutoAttackConfig(eps=eps), seed=0)[0]


def torchattacks_aa(model, x, y, eps):
    import torchattacks

    return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)(x, y)


def art_aa(model, x, y, eps):
    from art.attacks.evasion import AutoAttack
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10, clip_values=(0.0, 1.0))
    return torch.from_numpy(AutoAttack(estimator=clf, eps=eps, eps_step=eps / 4, batch_size=len(x)).generate(x.numpy(), y=y.numpy()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=360)
    parser.add_argument("--skip", action="append", default=[], help="twml, torchattacks or art")
    args = parser.parse_args()
    preset = config.load_preset()
    base = dataclasses.replace(config.resolve_one("train", preset), device="cpu", pgd_steps=10)
    for method, m in (("standard", 4), ("free", 4)):
        outcome = train.compute(train.prepare(dataclasses.replace(base, method=method, m=m)))
        model = outcome.model.eval()
        test = load_data("digits", base).test
        x, y = test.x[: args.images], test.y[: args.images]
        masks, row = {}, {"model": method, "images": len(x), "pgd_robust_accuracy": outcome.robustness.robust_accuracy}
        for name, run in (("twml", twml_aa), ("torchattacks", torchattacks_aa), ("art", art_aa)):
            if name in args.skip:
                continue
            try:
                began = time.perf_counter()
                adv = run(model, x, y, base.eps)
                row[f"{name}_s"] = round(time.perf_counter() - began, 1)
            except ImportError as err:
                row[f"{name}"] = f"not installed ({err.name})"
                continue
            assert float((adv - x).abs().max()) <= base.eps + 1e-5, name
            masks[name] = robust_mask(model, x, y, adv)
            row[f"{name}_robust_accuracy"] = round(float(masks[name].mean()), 4)
        for name, mask in masks.items():
            if name != "twml" and "twml" in masks:
                row[f"agreement_{name}"] = round(float((mask == masks["twml"]).mean()), 4)
                row[f"robust_only_for_twml_vs_{name}"] = int((masks["twml"] & ~mask).sum())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
