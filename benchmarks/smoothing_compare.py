"""twml's SmoothAdv and MACER beside IBM ART's (PyTorchSmoothAdv, PyTorchMACER) on the same data,
architecture, initial weights, sigma, optimizer and epochs; both certified by twml's CERTIFY on the
same test images with the same noise, so only the training differs. Prints one JSON line per
(method, implementation, seed), then a summary: ACR mean and standard deviation over the seeds, and
training time per epoch.

ART is not a twml dependency; put it in a scratch environment beside twml:

    python -m venv --system-site-packages /tmp/art-venv
    /tmp/art-venv/bin/pip install --no-deps adversarial-robustness-toolbox==1.20.1
    /tmp/art-venv/bin/python benchmarks/smoothing_compare.py --seeds 1,2,3 --sigma 0.5

Differences that are ART's, not the comparison's: ART steps its learning-rate scheduler once per
epoch (twml once per SGD step; the script gives ART the same cosine, per epoch); ART's SmoothAdv
takes one noise draw per image (num_noise_vec > 1 fails on a shape mismatch, see --art-smoothadv-m)
and runs its attack as ART's L-inf PGD (eps = epsilon, step 0.1, one iteration per attack step,
labels from the model's predictions), whatever the warm-up writes into the attack's `norm`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import traceback

import numpy as np
import torch

from twml_cli import config, runtime
from twml_cli.studies import smooth


def settings_for(method: str, seed: int, args) -> config.Smoothing:
    overrides = {"training": method, "seed": seed, "sigma": args.sigma, "epochs": args.epochs, "threads": args.threads}
    overrides.update({"num_examples": args.num_examples, "smoothadv_m": args.smoothadv_m})
    (s,) = config.resolve("smooth", config.load_preset(), overrides)
    return s.resolved()  # each "0: the paper's value" replaced by the value, for ART as for twml


def twml_run(s: config.Smoothing) -> tuple[float, smooth.Outcome]:
    inputs = smooth.prepare(s)
    outcome = smooth.compute(inputs)
    assert outcome.training is not None
    return outcome.training.train_time_s, outcome


def art_run(s: config.Smoothing, args) -> tuple[float, smooth.Outcome]:
    from art.estimators.certification.randomized_smoothing import PyTorchMACER, PyTorchSmoothAdv

    inputs = smooth.prepare(s)  # the same initial weights as twml's run of this seed
    model, data = inputs.model, inputs.data
    x, y = (t.numpy() for t in data.train.tensors)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.momentum > 0
    )
    cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / s.epochs)))
    common = dict(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=model.spec.num_classes,
        optimizer=optimizer,
        clip_values=(0.0, 1.0),
        device_type="cpu",
        scale=s.sigma,
    )
    if s.training == "macer":
        estimator = PyTorchMACER(
            **common, gaussian_samples=s.macer_k, beta=s.macer_beta, gamma=s.macer_gamma, lmbda=s.macer_lambda
        )
    else:
        estimator = PyTorchSmoothAdv(
            **common,
            epsilon=s.smoothadv_eps,
            num_noise_vec=args.art_smoothadv_m,
            num_steps=s.smoothadv_steps,
            warmup=s.smoothadv_warmup,
        )
    torch.manual_seed(s.seed)
    start = time.perf_counter()
    estimator.fit(x.astype(np.float32), y, batch_size=s.batch_size, nb_epochs=s.epochs, scheduler=cosine)
    seconds = time.perf_counter() - start
    model.eval()
    return seconds, smooth.compute(dataclasses.replace(inputs, given=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="macer,smoothadv")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=28)
    parser.add_argument("--num-examples", type=int, default=360)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoothadv-m", type=int, default=1, help="twml's noise draws per image in SmoothAdv")
    parser.add_argument("--art-smoothadv-m", type=int, default=1, help="ART's num_noise_vec (it fails above 1)")
    parser.add_argument("--implementations", default="twml,art")
    args = parser.parse_args()
    runtime.apply_threads(runtime.choose_threads(args.threads))
    rows = []
    for method in args.methods.split(","):
        for seed in [int(v) for v in args.seeds.split(",")]:
            s = settings_for(method, seed, args)
            for impl in args.implementations.split(","):
                try:
                    seconds, outcome = twml_run(s) if impl == "twml" else art_run(s, args)
                except Exception as err:  # noqa: BLE001 - a failing implementation is a finding, not a stop
                    row = {"method": method, "impl": impl, "seed": seed, "error": f"{type(err).__name__}: {err}"}
                    traceback.print_exc()
                else:
                    m = smooth.metrics(outcome)
                    row = {
                        "method": method,
                        "impl": impl,
                        "seed": seed,
                        "sigma": s.sigma,
                        "acr": round(m.average_certified_radius, 4),
                        "certified_r0": round(m.certified_accuracy, 4),
                        "accuracy": round(outcome.accuracy, 4),
                        "train_s": round(seconds, 1),
                        "s_per_epoch": round(seconds / s.epochs, 2),
                    }
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\nmethod     impl   seeds  ACR mean ± sd     s/epoch")
    for method in args.methods.split(","):
        for impl in args.implementations.split(","):
            ok = [r for r in rows if r["method"] == method and r["impl"] == impl and "acr" in r]
            if not ok:
                print(f"{method:10} {impl:6} failed: {next(r['error'] for r in rows if r['method'] == method)}")
                continue
            acr = np.array([r["acr"] for r in ok])
            sd = acr.std(ddof=1) if len(acr) > 1 else 0.0
            per_epoch = np.mean([r["s_per_epoch"] for r in ok])
            print(f"{method:10} {impl:6} {len(ok):5}  {acr.mean():.4f} ± {sd:.4f}   {per_epoch:.2f}")


if __name__ == "__main__":
    main()
