"""Training and PGD throughput: standard against free adversarial training at equal SGD steps,
and twml's loop against a plain DataLoader reference loop, measured in one run.

    python benchmarks/train.py                      # embedded default (digits) and resnet18 on 3x32x32
    python benchmarks/train.py --device cuda --cifar-images 50000

The resnet18 case uses random CIFAR-10-shaped tensors (speed does not depend on the data).
Prints one JSON line as each case ends, then a table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from _models import RESNET18_CIFAR, digits_spec
from torch.utils.data import DataLoader, TensorDataset

from twml_cli.attacks import PGDConfig, evaluate_robustness
from twml_cli.models import create_model, prepare
from twml_cli.runtime import Timer, resolve_device
from twml_cli.training import FreeAdversarial, TrainConfig, train


def reference_loop(model, x, y, config: TrainConfig, device) -> float:
    """A plain loop as tutorials write it: DataLoader from host memory, fp32, no channels_last.
    Returns images per second."""
    loader = DataLoader(TensorDataset(x, y), batch_size=config.batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    model.train()
    with Timer(device) as timer:
        for _ in range(config.epochs):
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return config.epochs * len(x) / timer.seconds


def case(name, spec, x, y, x_test, y_test, epochs, m, eps, batch_size, device, reference_epochs=None) -> dict:
    def fresh():
        torch.manual_seed(0)
        return prepare(create_model(spec), device)

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.05)
    train(fresh(), x[: 4 * batch_size], y[: 4 * batch_size], TrainConfig(epochs=1, batch_size=batch_size))  # warm-up
    standard = train(fresh(), x, y, cfg)
    free = train(fresh(), x, y, cfg, FreeAdversarial(eps, m))
    reference = reference_loop(fresh(), x, y, TrainConfig(epochs=reference_epochs or epochs, batch_size=batch_size, lr=0.05), device)
    model = fresh().eval()
    pgd = evaluate_robustness(model, x_test, y_test, PGDConfig(eps=eps, alpha=eps / 4, steps=10), batch_size=max(512, batch_size))
    row = {
        "case": name,
        "device": str(device),
        "images": len(x),
        "batch_size": batch_size,
        "epochs": epochs,
        "m": m,
        "standard_images_per_s": round(standard.images_per_s),
        "free_images_per_s": round(free.images_per_s),
        "standard_time_s": round(standard.train_time_s, 2),
        "free_time_s": round(free.train_time_s, 2),
        "free_over_standard_time": round(free.train_time_s / standard.train_time_s, 3),
        "same_sgd_steps": standard.steps == free.steps,
        "reference_images_per_s": round(reference),
        "speedup_over_reference": round(standard.images_per_s / reference, 2),
        "epoch_of_50k_s": round(50_000 / standard.images_per_s, 2),
        "pgd10_images_per_s": round(pgd.num_examples / pgd.attack_time_s),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cifar-images", type=int, default=None, help="resnet18 case size (default 50,000 on CUDA, 2,048 on CPU)")
    parser.add_argument("--epochs", type=int, default=None, help="resnet18 case SGD budget (default 2 on CUDA, 1 on CPU)")
    parser.add_argument("--batch-size", type=int, action="append", default=None, help="resnet18 case batch size, repeatable (default 128, the cifar10 preset's)")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = []

    def report(row: dict) -> None:  # as each case ends: a lease may end before the last
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not args.skip_digits:
        spec, train_set, test_set = digits_spec()
        report(case("digits/test_byobnet", spec, *train_set.tensors, *test_set.tensors, epochs=28, m=4, eps=0.1, batch_size=128, device=device))

    if not args.skip_cifar:
        n = args.cifar_images or (50_000 if device.type == "cuda" else 2_048)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        spec = RESNET18_CIFAR
        cuda = device.type == "cuda"
        epochs = args.epochs or (2 if cuda else 1)
        test = 2048 if cuda else 256
        for batch_size in args.batch_size or [128]:
            report(
                case("cifar-shaped/resnet18", spec, x, y, x[:test], y[:test], epochs=epochs, m=epochs, eps=8 / 255,
                     batch_size=batch_size, device=device, reference_epochs=1)
            )  # fmt: skip

    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f} s")
