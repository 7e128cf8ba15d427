"""Neural Cleanse: all classes optimized together (one forward over K x B stamped images)
against class after class, as every public implementation does, at equal optimization
steps, measured in one run.

    python benchmarks/cleanse.py                    # CPU: the embedded default's model, 10 classes
    python benchmarks/cleanse.py --device cuda      # GPU: timm resnet18 on 3x32x32, 10 classes

Early stopping is switched off so both do exactly `--steps` rounds. Prints both times, the
speed-up and how far apart their norms are, then one JSON line.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from _models import subject
from _profile import where_time_goes

from twml_cli.cleanse import CleanseConfig, reverse_engineer
from twml_cli.models import create_model, prepare
from twml_cli.runtime import Timer, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--steps", type=int, default=20, help="rounds (default 20; class after class takes 10x as many passes)"
    )
    parser.add_argument("--images", type=int, default=None, help="clean images (default 256 on CPU, 1,000 on CUDA)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per class per step (default 32 CPU, 64 CUDA: the presets')"
    )
    parser.add_argument(
        "--skip-alone",
        action="store_true",
        help="time only all classes together (with early stopping, as twml runs it)",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps
    images = args.images or (1_000 if cuda else 256)
    batch = args.batch_size or (64 if cuda else 32)
    torch.manual_seed(0)
    spec, x, name = subject(cuda, images, "train")
    model = prepare(create_model(spec), device).eval()
    # early stopping off unless only the together path is timed, so both do exactly `steps` rounds
    cfg = CleanseConfig(steps=steps, batch_size=batch, **({} if args.skip_alone else {"early_stop_patience": 10**9}))

    reverse_engineer(model, x[:batch], 10, CleanseConfig(steps=1, batch_size=batch))  # warm-up
    with Timer(device) as together_t:
        together = reverse_engineer(model, x, 10, cfg)
    print(f"together: {together_t.seconds:.2f} s, rounds per class {together.rounds.tolist()}", flush=True)
    if args.skip_alone:
        return
    with Timer(device) as alone_t:
        alone = [reverse_engineer(model, x, 10, cfg, classes=[c]) for c in range(10)]
    norms_alone = np.array([a.norms[0] for a in alone])
    row = {
        "model": name,
        "device": str(device),
        "classes": 10,
        "steps": steps,
        "images": images,
        "batch_per_class": batch,
        "together_s": round(together_t.seconds, 2),
        "class_by_class_s": round(alone_t.seconds, 2),
        "speedup": round(alone_t.seconds / together_t.seconds, 2),
        "max_relative_norm_difference": float(np.max(np.abs(together.norms - norms_alone) / norms_alone)),
    }
    for k, v in row.items():
        print(f"{k:>30}: {v}")
    print(json.dumps(row))
    print(
        where_time_goes(
            lambda: reverse_engineer(model, x[: batch * 2], 10, CleanseConfig(steps=1, batch_size=batch)), calls=2
        )
    )


if __name__ == "__main__":
    main()
