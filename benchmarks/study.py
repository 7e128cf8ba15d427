"""The embedded-default study through the library API alone (no MLflow, no CLI), on any
device: standard and free training with PGD, smoothing at sigma 0.05 and 0.20, a BadNets
model and Neural Cleanse on both models. Prints each finding with its time and exits 1
when one misses the issues' acceptance figures.

    python benchmarks/study.py                  # CUDA when present: checks the bf16 / channels_last path
    python benchmarks/study.py --device cpu

The settings are experiments/digits.toml's.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from twml_cli.attacks import PGDConfig, accuracy, evaluate_robustness
from twml_cli.backdoor import Trigger, attack_success_rate, default_trigger_size, poison
from twml_cli.cleanse import CleanseConfig, mad_outlier_test, reverse_engineer, reversed_trigger_success
from twml_cli.data import describe, load_dataset
from twml_cli.models import ModelSpec, create_model, prepare
from twml_cli.runtime import Timer, describe_device, resolve_device
from twml_cli.smoothing import Smooth, certified_accuracy, certify_dataset
from twml_cli.training import FreeAdversarial, GaussianNoise, TrainConfig, train

PRESET = tomllib.loads((Path(__file__).parents[1] / "experiments" / "digits.toml").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    device = resolve_device(parser.parse_args().device)
    t, s, b, c = PRESET["train"], PRESET["smooth"], PRESET["backdoor"], PRESET["cleanse"]
    train_set, test_set = load_dataset("digits")
    (x, y), (x_test, y_test) = train_set.tensors, test_set.tensors
    spec = ModelSpec.for_data(PRESET["model"], describe("digits", train_set, test_set))
    cfg = TrainConfig(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], schedule=t["schedule"])
    pgd_cfg = PGDConfig(eps=t["eps"], alpha=t["pgd_alpha"], steps=t["pgd_steps"])
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'MISS'}] {what}")
        if not ok:
            failures.append(what)

    def fit(x_fit, y_fit, perturbation=None):
        torch.manual_seed(0)
        model = prepare(create_model(spec), device)
        return model, train(model, x_fit, y_fit, cfg, perturbation)

    print(f"device: {describe_device(device)}, torch {torch.__version__}")
    fit(x[:256], y[:256])  # warm-up: kernels, autotuning
    results = {}
    for name, perturbation in [("standard", None), ("free m=4", FreeAdversarial(t["eps"], 4)), ("free m=7", FreeAdversarial(t["eps"], 7))]:
        model, result = fit(x, y, perturbation)
        r = evaluate_robustness(model, x_test, y_test, pgd_cfg)
        results[name] = (model, result, r)
        print(f"{name}: train {result.train_time_s:.2f} s ({result.steps} steps), accuracy {r.accuracy:.4f}, "
              f"PGD success {r.pgd_success_rate:.4f}, attack {r.attack_time_s:.2f} s")  # fmt: skip
    (clean_model, std, std_r), (_, free, free_r) = results["standard"], results["free m=4"]
    check(std_r.accuracy >= 0.95, f"standard accuracy {std_r.accuracy:.4f} >= 0.95")
    check(free_r.accuracy >= 0.90, f"free m=4 accuracy {free_r.accuracy:.4f} >= 0.90")
    check(free_r.pgd_success_rate <= 0.6 * std_r.pgd_success_rate, "free m=4 PGD success <= 0.6 x standard")
    check(free.train_time_s <= 1.5 * std.train_time_s, f"free/standard time {free.train_time_s / std.train_time_s:.2f} <= 1.5")

    indices = np.linspace(0, len(x_test) - 1, s["num_examples"]).round().astype(int)
    top = {}
    for sigma in s["sigma"]:
        model, _ = fit(x, y, GaussianNoise(sigma))
        with Timer(device) as timer:
            table = certify_dataset(Smooth(model, 10, sigma), x_test, y_test, indices, s["n0"], s["n"], s["alpha"], s["certify_batch_size"])
        curve = certified_accuracy(table["radius"], table["correct"], [0.0, 0.1, 0.25])
        top[sigma] = table["radius"].max()
        print(f"sigma {sigma}: base accuracy {accuracy(model, x_test, y_test):.4f}, certified accuracy at r=0, 0.1, 0.25: "
              f"{', '.join(f'{v:.4f}' for v in curve)}, max radius {top[sigma]:.4f}, certify {timer.seconds:.2f} s "
              f"({len(indices) * (s['n0'] + s['n']) / timer.seconds:,.0f} samples/s)")  # fmt: skip
        if sigma == 0.05:
            check(curve[0] >= 0.9, f"sigma 0.05 certified accuracy at r=0 {curve[0]:.4f} >= 0.9")
    check(top[0.20] > 2 * top[0.05], "sigma 0.20's largest radius > 2 x sigma 0.05's")

    trigger = Trigger(default_trigger_size(8, 8), b["position"])
    x_p, y_p, _ = poison(x, y, b["target"], b["poison_rate"], trigger)
    backdoored, _ = fit(x_p, y_p)
    asr = attack_success_rate(backdoored, x_test, y_test, b["target"], trigger)
    bd_acc = accuracy(backdoored, x_test, y_test)
    print(f"backdoor: accuracy {bd_acc:.4f}, attack success {asr:.4f}")
    check(asr >= 0.95 and bd_acc >= std_r.accuracy - 0.03, "backdoor: success >= 0.95, accuracy within 3 points")

    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: c["num_images"]]
    cleanse_cfg = CleanseConfig(steps=c["steps"], batch_size=c["batch_size"])
    flagged_per_model = []
    for i, model in enumerate([clean_model, backdoored]):
        with Timer(device) as timer:
            rev = reverse_engineer(model, x[pick], 10, cleanse_cfg)
        test = mad_outlier_test(rev.norms, c["anomaly_threshold"])
        flagged = [int(k) for k in np.flatnonzero(test.flagged)]
        flagged_per_model.append(flagged)
        print(f"cleanse model {i}: {timer.seconds:.2f} s, norms {np.round(rev.norms, 2).tolist()}, "
              f"max anomaly index {test.anomaly_index[rev.norms < test.median].max():.2f}, flagged {flagged}")  # fmt: skip
        for k in flagged:
            rate = reversed_trigger_success(model, rev, k, x_test, y_test)
            print(f"  reversed trigger of class {k}: success {rate:.4f}")
            if i == 1:
                check(rate >= 0.9, f"reversed trigger success {rate:.4f} >= 0.9")
    check(flagged_per_model == [[], [b["target"]]], f"cleanse flags only model 1 class {b['target']}")

    print("all findings hold" if not failures else f"{len(failures)} finding(s) missed")
    return 1 if failures else 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"total {time.time() - t0:.0f} s")
    sys.exit(code)
