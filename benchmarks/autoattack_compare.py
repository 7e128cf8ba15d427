"""twml's AutoAttack beside the original (Croce and Hein's fra31/auto-attack, run unchanged from a
copy that twml does not depend on), and optionally beside torchattacks' and ART's, on the
embedded default's standard and free (m=4) models: robust accuracy, per-example agreement
with twml, the points twml leaves robust that the other breaks, and time, one implementation
after the other on the same CPU threads.

    git clone https://github.com/fra31/auto-attack /tmp/auto-attack      # not a twml dependency
    PYTHONPATH=. python benchmarks/autoattack_compare.py --original /tmp/auto-attack --seeds 0,1,2

torchattacks and ART are not twml's dependencies either (torchattacks pins requests~=2.25.1,
which would downgrade requests, idna and urllib3 under MLflow; ART's AutoAttack is not the
standard composition). To add them:

    pip install --no-deps --target /tmp/aa-libs torchattacks==3.5.1 adversarial-robustness-toolbox==1.20.1
    PYTHONPATH=.:/tmp/aa-libs python benchmarks/autoattack_compare.py \
        --original /tmp/auto-attack --others torchattacks,art

Prints one JSON line per (model, seed), with the indices of the test images on which the
implementations disagree, and a summary per model: the points robust for twml and broken by
another implementation in more than one seed, and each implementation's agreement with itself
across seeds (how often two of its own seeds agree: the floor that randomness sets under any
two randomized evaluations).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
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


def twml_aa(model, x, y, eps, seed):
    return autoattack(model, x, y, AutoAttackConfig(eps=eps), seed=seed)[0]


def pairwise_agreement(masks: list[np.ndarray]) -> list[int]:
    """Examples on which each pair of masks agrees."""
    return [int((a == b).sum()) for i, a in enumerate(masks) for b in masks[i + 1 :]]


def original_aa(model, x, y, eps, seed):
    from autoattack import AutoAttack  # the fetched copy, on sys.path

    adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device="cpu", verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its checks
        return adversary.run_standard_evaluation(x, y, bs=len(x))


def torchattacks_aa(model, x, y, eps, seed):
    import torchattacks

    return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=seed)(x, y)


def art_aa(model, x, y, eps, seed):
    from art.attacks.evasion import AutoAttack
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(
        model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10, clip_values=(0.0, 1.0)
    )
    return torch.from_numpy(
        AutoAttack(estimator=clf, eps=eps, eps_step=eps / 4, batch_size=len(x)).generate(x.numpy(), y=y.numpy())
    )


RUNNERS = {"twml": twml_aa, "original": original_aa, "torchattacks": torchattacks_aa, "art": art_aa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default=None, help="a copy of fra31/auto-attack (the folder holding autoattack/)")
    parser.add_argument("--others", default="", help="also torchattacks and/or art (comma-separated)")
    parser.add_argument(
        "--models", default="standard,free", help="the embedded default's standard and/or free (m=4) model"
    )
    parser.add_argument("--seeds", default="0", help="attack seeds (each implementation runs with each)")
    parser.add_argument("--images", type=int, default=360, help="the first N test images (360: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["twml"] + (["original"] if args.original else []) + [n for n in args.others.split(",") if n]
    if args.original:
        sys.path.insert(0, args.original)
    preset = config.load_preset()
    base = dataclasses.replace(config.resolve_one("train", preset), device="cpu", pgd_steps=10)
    test = load_data("digits", base).test
    x, y = test.x[: args.images].cpu(), test.y[: args.images].cpu()
    for method in args.models.split(","):
        outcome = train.compute(train.prepare(dataclasses.replace(base, method=method, m=4)))
        model = outcome.model.eval()
        totals: dict[str, list] = {}
        by_seed: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for seed in (int(s) for s in args.seeds.split(",")):
            masks, row = {}, {"model": method, "seed": seed, "images": len(x), "threads": args.threads}
            row["load_1min"] = round(os.getloadavg()[0], 2)  # about this benchmark's threads when nothing else runs
            for name in names:
                began = time.perf_counter()
                adv = RUNNERS[name](model, x, y, base.eps, seed)
                row[f"{name}_s"] = round(time.perf_counter() - began, 1)
                assert float((adv - x).abs().max()) <= base.eps + 1e-5, name
                masks[name] = robust_mask(model, x, y, adv)
                by_seed[name].append(masks[name])
                row[f"{name}_robust_accuracy"] = round(float(masks[name].mean()), 4)
            for name, mask in masks.items():
                if name != "twml":
                    row[f"agreement_{name}"] = round(float((mask == masks["twml"]).mean()), 4)
                    row[f"robust_for_twml_broken_by_{name}"] = int((masks["twml"] & ~mask).sum())
                    row[f"robust_for_{name}_broken_by_twml"] = int((mask & ~masks["twml"]).sum())
                    row[f"robust_for_twml_broken_by_{name}_indices"] = np.flatnonzero(masks["twml"] & ~mask).tolist()
                    row[f"robust_for_{name}_broken_by_twml_indices"] = np.flatnonzero(mask & ~masks["twml"]).tolist()
            for k, v in row.items():
                totals.setdefault(k, []).append(v)
            print(json.dumps(row), flush=True)
        means = {
            k: round(float(np.mean(v)), 4)
            for k, v in totals.items()
            if k not in ("model", "seed", "images", "threads") and not k.endswith("_indices")
        }
        summary = {"model": method, "seeds": len(totals["seed"]), "mean": means}
        for name in names:
            if name != "twml":  # points robust for twml and broken by the other in more than one seed
                seen = [i for ids in totals[f"robust_for_twml_broken_by_{name}_indices"] for i in ids]
                summary[f"robust_for_twml_broken_by_{name}_in_2_or_more_seeds"] = sorted(
                    {i for i in seen if seen.count(i) > 1}
                )
            if len(by_seed[name]) > 1:  # the implementation against itself, seed against seed
                summary[f"{name}_self_agreement_across_seeds"] = pairwise_agreement(by_seed[name])
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
