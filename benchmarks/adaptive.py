"""Adaptive certification on a radius grid against fixed-n CERTIFY: the same base classifier
(trained with Gaussian noise at sigma), the same images, n = n_max. Certified accuracy at
each grid radius, noise samples per image, seconds per image.

    python benchmarks/adaptive.py       # CPU: digits, sigma 0.25, n = 20,000, all 360 test images
    python benchmarks/adaptive.py --futility 0.01,0.05,0.1,0.2,0.3  # what each futility level saves and misses
    python benchmarks/adaptive.py --device cuda --n 100000 --model resnet18   # GPU: resnet18 (CIFAR stem) on 3x32x32

Prints one JSON line per procedure and a comparison line per futility level.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from twml_cli import config
from twml_cli.models import create_model, prepare
from twml_cli.runtime import Timer, resolve_device
from twml_cli.smoothing import FUTILITY, Smooth, certified_accuracy, certify_dataset
from twml_cli.studies import smooth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--n", type=int, default=20_000, help="fixed n, and the adaptive cap n_max")
    parser.add_argument("--radii", default="0.25,0.5,0.75")
    parser.add_argument("--images", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0, help="seed of the base classifier's training and of the noise")
    parser.add_argument(
        "--futility", default=str(FUTILITY), help="comma-separated futility levels, one adaptive run each"
    )
    parser.add_argument(
        "--model", default=None, help="resnet18: random 3x32x32 images (speed only); default: a digits base classifier"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    radii = [float(r) for r in args.radii.split(",")]
    if args.model:
        from _models import RESNET18_CIFAR

        torch.manual_seed(0)
        model = prepare(create_model(RESNET18_CIFAR), device).eval()
        x = torch.rand(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        data, indices, name = (
            (x, torch.zeros(len(x), dtype=torch.long)),
            list(range(len(x))),
            "resnet18 3x32x32 (random weights)",
        )
    else:
        s = dataclasses.replace(
            config.resolve("smooth", config.load_preset())[0],
            sigma=args.sigma,
            device=args.device,
            num_examples=args.images,
            seed=args.seed,
        )
        inputs = smooth.prepare(s)
        base = smooth.compute(inputs)  # trains the base classifier (and certifies at the preset's n, unused here)
        model, data, indices, name = (
            base.model,
            inputs.data.test.tensors,
            inputs.indices,
            f"test_byobnet digits, noise-trained at sigma {args.sigma}",
        )
    batch = 4000 if device.type == "cuda" else 2000
    certify_dataset(
        Smooth(model, 10, args.sigma, args.seed), data, indices[:2], 100, 1000, 0.001, batch
    )  # warm-up, so the first timing is not the slowest
    rows = {}
    levels = [float(f) for f in args.futility.split(",")]
    for procedure, grid, futility in [*(("adaptive", radii, f) for f in levels), ("fixed", None, FUTILITY)]:
        with Timer(device) as timer:
            table = certify_dataset(
                Smooth(model, 10, args.sigma, args.seed),
                data,
                indices,
                100,
                args.n,
                0.001,
                batch,
                grid=grid,
                futility=futility,
            )
        accs = certified_accuracy(table["radius"], table["correct"], radii)
        rows[procedure, futility if grid else None] = row = {
            "procedure": procedure,
            "model": name,
            "device": str(device),
            "images": len(indices),
            "n": args.n,
            "sigma": args.sigma,
            "seed": args.seed,
            **({"futility": futility} if grid else {}),
            **{f"certified_accuracy_r{r:g}": round(float(a), 4) for r, a in zip(radii, accs)},
            "samples_per_image": round(float(table["samples"].mean())),
            "seconds_per_image": round(timer.seconds / len(indices), 4),
        }
        print(json.dumps(row), flush=True)
    f = rows["fixed", None]
    for futility in levels:
        a = rows["adaptive", futility]
        gaps = [f[f"certified_accuracy_r{r:g}"] - a[f"certified_accuracy_r{r:g}"] for r in radii]
        print(
            f"adaptive (futility {futility:g}): {f['samples_per_image'] / a['samples_per_image']:.2f}x fewer samples, "
            f"{f['seconds_per_image'] / a['seconds_per_image']:.1f}x less time per image; certified accuracy at most "
            f"{max(gaps):.4f} "
            f"below fixed n (per radius: {', '.join(f'{g:+.4f}' for g in gaps)})"
        )


if __name__ == "__main__":
    main()
