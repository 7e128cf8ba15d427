"""Training and PGD throughput against issue 10's targets, measured in one run: standard training
at batch 128, free training (m = 8) at equal SGD steps, PGD-10 evaluation, and a plain
DataLoader reference loop (fp32, host memory, no channels_last) as tutorials write it.

    python benchmarks/train.py                          # CPU: the digits model (and a small resnet18 case)
    python benchmarks/train.py --device cuda            # GPU: resnet18 (CIFAR stem) on 50,000 3x32x32
    python benchmarks/train.py --device cuda --compile graphs --compile off

Each timed run follows an untimed one of the same shape, so cuDNN autotuning and torch.compile
are paid before the clock starts (the compile time is printed on its own). Random data: speed
does not depend on it. Prints a JSON line per measurement as it is made (with the seconds since the
case began), the case's whole row, and a profile line saying where time goes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from _models import RESNET18_CIFAR, digits_spec
from _profile import where_time_goes
from torch.utils.data import DataLoader, TensorDataset

from twml_cli.attacks import PGDConfig, evaluate_robustness
from twml_cli.models import compiled, create_model, prepare
from twml_cli.runtime import Timer, resolve_device
from twml_cli.training import FreeAdversarial, TrainConfig, train

MODES = {"off": None, "on": "default", "graphs": "reduce-overhead"}


def reference_loop(model, x, y, config: TrainConfig, device) -> float:
    """Images per second of a plain loop: DataLoader from host memory, fp32."""
    loader = DataLoader(TensorDataset(x, y), batch_size=config.batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    model.train()
    with Timer(device) as timer:
        for _ in range(config.epochs):
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
    return config.epochs * len(x) / timer.seconds


def case(name, spec, x, y, x_test, y_test, *, epochs, m, eps, batch_size, device, mode) -> dict:
    def fresh():
        torch.manual_seed(0)
        return prepare(create_model(spec), device)

    row = {"case": name, "device": str(device), "compile": mode, "images": len(x), "batch_size": batch_size}
    began = time.perf_counter()

    def report(**figures) -> None:
        """One line per measurement as it is made, so a run stopped at a time limit keeps what it measured."""
        row.update(figures)
        print(
            json.dumps({"case": name, "compile": mode, **figures, "elapsed_s": round(time.perf_counter() - began, 1)}),
            flush=True,
        )

    data = (x.to(device), y.to(device))
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.05)
    train(fresh(), data, TrainConfig(epochs=1, batch_size=batch_size), compile_mode=MODES[mode])  # compile, autotune
    report(warm_up_standard_s=round(time.perf_counter() - began, 1))
    standard = train(fresh(), data, cfg, compile_mode=MODES[mode])
    report(
        epochs=epochs,
        standard_images_per_s=round(standard.images_per_s),
        epoch_of_50k_s=round(50_000 / standard.images_per_s, 2),
    )
    mark = time.perf_counter()
    train(
        fresh(), data, TrainConfig(epochs=m, batch_size=batch_size), FreeAdversarial(eps, m), compile_mode=MODES[mode]
    )
    report(warm_up_free_s=round(time.perf_counter() - mark, 1))
    free = train(fresh(), data, cfg, FreeAdversarial(eps, m), compile_mode=MODES[mode])
    report(
        m=m,
        free_over_standard_time=round(free.train_time_s / standard.train_time_s, 3),
        same_sgd_steps=standard.steps == free.steps,
    )
    model = fresh().eval()
    attacked = compiled(model, MODES[mode])
    pgd_cfg = PGDConfig(eps=eps, alpha=eps / 4, steps=10)
    # warm-up on the same images: every batch shape (1,024 and the remainder) is compiled, and with
    # CUDA graphs recorded, before the clock starts
    evaluate_robustness(attacked, (x_test, y_test), pgd_cfg, batch_size=1024)
    pgd = evaluate_robustness(attacked, (x_test, y_test), pgd_cfg, batch_size=1024)
    report(pgd10_images_per_s=round(pgd.num_examples / pgd.attack_time_s))
    reference = reference_loop(fresh(), x, y, TrainConfig(epochs=1, batch_size=batch_size, lr=0.05), device)
    report(reference_images_per_s=round(reference), speedup_over_reference=round(standard.images_per_s / reference, 2))
    print(json.dumps(row), flush=True)
    net = fresh()
    print(
        where_time_goes(
            lambda: train(
                net,
                (data[0][: 4 * batch_size], data[1][: 4 * batch_size]),
                TrainConfig(epochs=1, batch_size=batch_size),
                compile_mode=MODES[mode],
            )
        ),
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--compile", action="append", choices=list(MODES), help="repeatable (default: graphs on CUDA, off on CPU)"
    )
    parser.add_argument(
        "--images", type=int, default=None, help="resnet18 case size (default 50,000 on CUDA, 256 on CPU)"
    )
    parser.add_argument(
        "--epochs", type=int, default=8, help="SGD budget of each timed run (default 8: free m=8 makes one pass)"
    )
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    modes = args.compile or (["graphs"] if cuda else ["off"])
    if not args.skip_digits:
        spec, train_set, test_set = digits_spec()
        for mode in modes:
            case(
                "digits/test_byobnet",
                spec,
                *train_set.tensors,
                *test_set.tensors,
                epochs=28,
                m=4,
                eps=0.1,
                batch_size=128,
                device=device,
                mode=mode,
            )
    n = args.images or (50_000 if cuda else 256)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    test = 10_000 if cuda else 64
    for mode in modes:
        case(
            "cifar-shaped/resnet18",
            RESNET18_CIFAR,
            x,
            y,
            x[:test],
            y[:test],
            epochs=args.epochs if cuda else 1,
            m=8 if cuda else 1,
            eps=8 / 255,
            batch_size=128,
            device=device,
            mode=mode,
        )


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f} s")
