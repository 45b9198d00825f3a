#!/usr/bin/env bash
# Issue 6's CUDA checks in one pass, for a GPU machine (in this workplace: the `device` tool's `run`).
# It needs no install: vaelens runs from src/ with the machine's own torch. Figures and logs go to $OUT
# (default /tmp/vaelens-device-check). MNIST is optional: copy the four IDX files into a git-ignored folder
# of the checkout, carry it, and pass it as VAELENS_DATA_DIR; without it the throughput figures use random
# data of MNIST's shape and say so.
#
#   bash benchmarks/device_check.sh            # about 3-5 minutes on one H100/H200
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 VAELENS_OFFLINE=1
OUT="${OUT:-/tmp/vaelens-device-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DATA_ARGS=()
[ -n "${VAELENS_DATA_DIR:-}" ] && DATA_ARGS=(--data-dir "$VAELENS_DATA_DIR")

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$OUT/gpu.txt"
rc=0
echo "== tests/test_cuda.py"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest-cuda.txt" || rc=1
echo "== throughput, fp32 and bf16"
"$PY" benchmarks/throughput.py --device cuda --epochs 3 --bf16 --iw-n 1000 "${DATA_ARGS[@]}" 2>&1 \
    | tee "$OUT/throughput-cuda.txt" || rc=1
exit $rc
