#!/bin/sh
# One pass over everything that needs a GPU, for a machine that has torch, torchvision and pytest but neither Ray
# nor MLflow: the pure-torch tests on CUDA, then the GPU benchmark rows with the fast path as it ships and with the
# opt-in CUDA-graph step. Sized to finish in about 8 minutes on one H200. Results go to $OUT (default ./gpu-out).
set -u
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
"$PY" -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__)" >> "$OUT/gpu.txt"
timeout 300 make --no-print-directory test-gpu PYTHON="$PY" > "$OUT/test-gpu.txt" 2>&1
echo "make test-gpu exit $?" >> "$OUT/test-gpu.txt"
timeout 300 "$PY" -m benchmarks --device cuda --timeout 240 \
    --only train.resnet18.fast,train.resnet18.fast.b512,train.wrn16_1.fast,share4 \
    --json "$OUT/bench.json" --markdown > "$OUT/bench.txt" 2>&1
timeout 240 "$PY" -m benchmarks --device cuda --timeout 200 --compile reduce-overhead \
    --only train.resnet18.fast,train.resnet18.fast.b512 \
    --json "$OUT/bench-graphs.json" --markdown > "$OUT/bench-graphs.txt" 2>&1
tail -n 5 "$OUT/test-gpu.txt"; cat "$OUT/bench.txt" "$OUT/bench-graphs.txt"
