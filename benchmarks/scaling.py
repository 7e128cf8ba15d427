"""Certification throughput with 1 and with 2 processes (torch.distributed.run; gloo on a CPU,
NCCL on GPUs), the same images and n, checked to give the same certificates.

    python benchmarks/scaling.py                      # CPU: the embedded default's model, n = 1,000
    python benchmarks/scaling.py --procs 1 --n 100000 --device cuda   # one GPU: resnet18 on 3x32x32

Launches itself once per process count; each launch prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def worker(args) -> None:
    import torch
    from _models import subject

    from twml_cli import distributed, runtime
    from twml_cli.models import create_model, prepare
    from twml_cli.smoothing import Smooth, certify_dataset

    distributed.init()
    device = runtime.resolve_device(args.device)
    torch.manual_seed(0)
    spec, x, name = subject(device.type == "cuda", args.images, "test")
    model = prepare(create_model(spec), device).eval()
    y = torch.zeros(len(x), dtype=torch.long)
    smooth = Smooth(model, 10, 0.25)
    certify_dataset(smooth, (x[:2], y[:2]), [0, 1], 100, min(args.n, args.batch), 0.001, args.batch)  # warm-up
    distributed.barrier()
    began = time.perf_counter()
    table = certify_dataset(smooth, (x, y), list(range(len(x))), 100, args.n, 0.001, args.batch)
    distributed.barrier()
    seconds = time.perf_counter() - began
    if distributed.rank() == 0:
        samples = len(x) * (100 + args.n)
        print(
            json.dumps(
                {
                    "model": name,
                    "device": str(device),
                    "processes": distributed.world_size(),
                    "images": len(x),
                    "n": args.n,
                    "seconds": round(seconds, 2),
                    "samples_per_s": round(samples / seconds),
                    "s_per_image": round(seconds / len(x), 4),
                    "radius_sum": float(np.sum(table["radius"])),
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--procs", type=int, action="append", help="process counts (default: 1 and 2)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for procs in args.procs or [1, 2]:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(procs),
            "--",
            __file__,
            "--worker",
            "--device",
            args.device,
            "--images",
            str(args.images),
            "--n",
            str(args.n),
            "--batch",
            str(args.batch),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": f"{Path(__file__).parent}:{Path(__file__).parents[1]}:{os.environ.get('PYTHONPATH', '')}",
        }
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        row = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            same = abs(r["radius_sum"] - base["radius_sum"]) == 0
            print(
                f"{r['processes']} processes: {r['samples_per_s'] / base['samples_per_s']:.2f}x the samples/s of "
                f"{base['processes']}, "
                f"certificates {'identical' if same else 'DIFFERENT'}"
            )


if __name__ == "__main__":
    main()
