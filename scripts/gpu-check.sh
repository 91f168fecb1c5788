#!/bin/sh
# One pass over everything that needs a GPU, for a machine that has torch, torchvision and pytest but neither Ray
# nor MLflow, sized to about 8 minutes on one H100/H200 (a lent machine's session has 15, start-up included): the
# pure-torch tests on CUDA, the GPU benchmark rows with the fast path as it ships, then the natural-image check,
# BadNets and Blend with AFT, D-BR and ASD on CIFAR-10 (JPEG copy) (docs/reproduce-cifar10.md). The check reads
# the archive from ./shared/data (carry it there: ../shared does not travel) or BDO_DATA_ROOT. Results go to $OUT
# (default ./gpu-out). The opt-in CUDA-graph rows (--compile reduce-overhead) were dropped to make room for the
# natural-image check; run them in a call of their own.
set -u
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
"$PY" -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__)" >> "$OUT/gpu.txt"
timeout 150 make --no-print-directory test-gpu PYTHON="$PY" > "$OUT/test-gpu.txt" 2>&1
echo "make test-gpu exit $?" >> "$OUT/test-gpu.txt"
timeout 120 "$PY" -m benchmarks --device cuda --timeout 100 \
    --only train.resnet18.fast,share4 \
    --json "$OUT/bench.json" --markdown > "$OUT/bench.txt" 2>&1
# Steps that would start after 200 s are skipped; the timeout leaves the last one started time to finish.
timeout 260 "$PY" scripts/gpu-natural.py --device cuda --budget-s 200 --json "$OUT/natural.json" \
    > "$OUT/natural.txt" 2>&1
echo "gpu-natural exit $?" >> "$OUT/natural.txt"
tail -n 5 "$OUT/test-gpu.txt"; cat "$OUT/bench.txt"; tail -n 13 "$OUT/natural.txt"
