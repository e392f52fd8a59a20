#!/usr/bin/env bash
# One GPU call on the device machine: install the carried wheels (.whl: diffusers and the small packages the
# device image lacks), then run the given bench commands with the repository on the path. Each command's output
# goes to $OUT/<n>.log as well as to the call's output.
#   bash bench/device_call.sh "python bench/budgets.py --out \$OUT/budgets ..." "python bench/sweep.py ..."
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
n=0
for cmd in "$@"; do
    n=$((n + 1))
    echo "=== $cmd"
    start=$(date +%s)
    eval "$cmd" 2>&1 | tee "$OUT/$n.log" | tail -60
    echo "=== exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
done
