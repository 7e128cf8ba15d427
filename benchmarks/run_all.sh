#!/usr/bin/env bash
# Every benchmark in one go, each under a time limit, logs in $OUT (default ./benchmark-logs).
# Made for a short GPU lease: run from the repository root, `bash benchmarks/run_all.sh`.
# The package need not be installed and MLflow need not be present.
set -u
OUT=${OUT:-benchmark-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt"
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/device.txt"
status=0
bench() {  # bench NAME SECONDS SCRIPT ARGS...
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" python "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name exited $rc"; status=1; }
}
bench train 150 benchmarks/train.py
bench certify 100 benchmarks/certify.py
bench cleanse 150 benchmarks/cleanse.py
bench study 100 benchmarks/study.py
bench certify-large-batch 60 benchmarks/certify.py --batch-size 10000 --images 10 --reference-images 1
exit $status
