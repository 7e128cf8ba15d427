"""Certification throughput: twml's batched CERTIFY against a one-image-at-a-time reference
written from the paper's pseudocode as the authors' public code does it (predictions copied
to the host after every batch and counted there in a Python loop). Same model, same n, one run.

    python benchmarks/certify.py                             # CPU: the embedded default's model
    python benchmarks/certify.py --device cuda --n 100000    # GPU: timm resnet18 on 3x32x32

Prints noise samples per second, seconds per image and the speed-up, then one JSON line.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from _models import subject
from _profile import where_time_goes
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from twml_cli.models import compiled, create_model, prepare
from twml_cli.runtime import Timer, resolve_device
from twml_cli.smoothing import Smooth


class ReferenceSmooth:
    """Cohen et al.'s core.py, restated: one image at a time, host-side counting."""

    def __init__(self, model, num_classes, sigma):
        self.model, self.num_classes, self.sigma = model, num_classes, sigma

    def certify(self, x, n0, n, alpha, batch_size):
        self.model.eval()
        counts_selection = self._sample_noise(x, n0, batch_size)
        c_a = int(counts_selection.argmax())
        counts_estimation = self._sample_noise(x, n, batch_size)
        p_a = proportion_confint(int(counts_estimation[c_a]), n, alpha=2 * alpha, method="beta")[0]
        return (-1, 0.0) if p_a < 0.5 else (c_a, self.sigma * norm.ppf(p_a))

    def _sample_noise(self, x, num, batch_size):
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            remaining = num
            while remaining > 0:
                this_batch = min(batch_size, remaining)
                remaining -= this_batch
                batch = x.repeat((this_batch, 1, 1, 1))
                noise = torch.randn_like(batch) * self.sigma
                predictions = self.model(batch + noise).argmax(1)
                for idx in predictions.cpu().numpy():
                    counts[idx] += 1
        return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--n", type=int, default=None, help="noise samples per image (default 1,000 on CPU, 100,000 on CUDA)"
    )
    parser.add_argument("--images", type=int, default=None, help="images certified (default 40 on CPU, 20 on CUDA)")
    parser.add_argument(
        "--reference-images",
        type=int,
        default=None,
        help="images the slow reference certifies (default: all on CPU, 4 on CUDA)",
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument(
        "--compile",
        choices=("off", "on", "graphs"),
        default=None,
        help="torch.compile twml's model (default: graphs on CUDA)",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    n, n0 = args.n or (100_000 if cuda else 1_000), 100
    images = args.images or (20 if cuda else 40)
    batch = args.batch_size or (4_000 if cuda else 1_000)
    reference_images = min(images, args.reference_images or (4 if cuda else images))
    torch.manual_seed(0)
    spec, x, name = subject(cuda, images, "test")
    model = prepare(create_model(spec), device).eval()
    x = x.to(device)
    samples = images * (n0 + n)

    mode = args.compile or ("graphs" if cuda else "off")
    smooth = Smooth(compiled(model, {"off": None, "on": "default", "graphs": "reduce-overhead"}[mode]), 10, args.sigma)
    smooth.certify_batch(x[:1], n0, 2 * batch, 0.001, batch)  # warm-up: compile, autotune, both batch shapes
    with Timer(device) as fast:
        smooth.certify_batch(x, n0, n, 0.001, batch)
    reference = ReferenceSmooth(model, 10, args.sigma)
    reference.certify(x[0], n0, min(n, batch), 0.001, batch)  # warm-up
    with Timer(device) as slow:
        for image in x[:reference_images]:
            reference.certify(image, n0, n, 0.001, batch)
    slow_per_image = slow.seconds / reference_images

    row = {
        "model": name,
        "device": str(device),
        "images": images,
        "n0": n0,
        "n": n,
        "batch_size": batch,
        "twml_samples_per_s": round(samples / fast.seconds),
        "twml_s_per_image": round(fast.seconds / images, 4),
        "reference_images": reference_images,
        "reference_samples_per_s": round((n0 + n) / slow_per_image),
        "reference_s_per_image": round(slow_per_image, 4),
        "speedup": round(slow_per_image / (fast.seconds / images), 2),
        "compile": mode,
    }
    for k, v in row.items():
        print(f"{k:>24}: {v}")
    print(json.dumps(row))
    print(where_time_goes(lambda: smooth.certify_batch(x[:1], n0, 2 * batch, 0.001, batch)))


if __name__ == "__main__":
    main()
