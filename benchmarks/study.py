"""The embedded-default study through each study's compute() (no MLflow, no CLI), on any
device: standard and free training with PGD, smoothing at sigma 0.05 and 0.20, a BadNets
model and Neural Cleanse on both models. Prints each study's console lines with its time and
checks the findings (twml_cli/findings.py, the thresholds the tests use); exits 1 when one
misses.

    python benchmarks/study.py                  # CUDA when present: checks the bf16 / channels_last path
    python benchmarks/study.py --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from twml_cli import config, findings
from twml_cli.runtime import describe_device, resolve_device
from twml_cli.studies import backdoor, cleanse, smooth, train


def run(study, settings):
    began = time.perf_counter()
    outcome = study.compute(study.prepare(settings))
    print(f"-- {study.COMMAND} ({time.perf_counter() - began:.1f} s)")
    for line in study.summarize(outcome):
        print("  " + line)
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    device = parser.parse_args().device
    print(f"device: {describe_device(resolve_device(device))}, torch {torch.__version__}")
    preset = config.load_preset()
    settings = {
        c: [dataclasses.replace(s, device=device) for s in config.resolve(c, preset)]
        for c in ("train", "smooth", "backdoor", "cleanse")
    }
    base = settings["train"][0]
    warm = dataclasses.replace(base, epochs=1, pgd_steps=1)
    train.compute(train.prepare(warm))  # warm-up: kernels, autotuning

    standard = run(train, base)
    free = run(train, dataclasses.replace(base, method="free", m=4))
    run(train, dataclasses.replace(base, method="free", m=7))
    checks = findings.free_training(train.metrics(standard), train.metrics(free))

    small, large = (run(smooth, dataclasses.replace(settings["smooth"][0], sigma=sigma)) for sigma in (0.05, 0.20))
    checks += findings.smoothing(
        smooth.metrics(small), smooth.metrics(large), *(smooth.certified_at(o, [0.25])[0] for o in (small, large))
    )

    poisoned = run(backdoor, settings["backdoor"][0])
    folder = "benchmark-logs/models"  # cleanse takes models from folders here, so no MLflow is needed
    from twml_cli.models import save_model

    paths = [
        str(save_model(m, f"{folder}/{name}"))
        for name, m in (("standard", standard.model), ("backdoor", poisoned.model))
    ]
    inspected = run(cleanse, dataclasses.replace(settings["cleanse"][0], model_runs=paths, dataset="digits"))
    strongest = inspected.strongest
    checks += findings.neural_cleanse(
        standard.robustness.accuracy,
        backdoor.metrics(poisoned),
        inspected.verdict,
        poisoned.settings.target,
        strongest.success_rate if strongest else None,
    )
    for check in checks:
        print(check)
    missed = [c for c in checks if not c.ok]
    print("all findings hold" if not missed else f"{len(missed)} finding(s) missed")
    return 1 if missed else 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"total {time.time() - t0:.0f} s")
    sys.exit(code)
