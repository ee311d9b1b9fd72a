#!/usr/bin/env bash
# One device call: teacher -> causal (from the teacher) -> streaming benchmarks with the new causal model.
set -uo pipefail
OUT=${OUT:-out/device}; mkdir -p "$OUT"
BUNDLE=0 timeout ${TRAIN_S:-420} bash scripts/device_train.sh "teacher:time_budget=${TEACHER_S:-140},vae=talkstream/weights/vae.safetensors" \
  "causal:time_budget=${CAUSAL_S:-140},vae=talkstream/weights/vae.safetensors" > "$OUT/train.txt" 2>&1
cp -f runs/causal/causal* talkstream/weights/ 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
timeout ${BENCH_S:-150} python3 benchmarks/stream_speed.py --device cuda --cases gpu ${BENCH_ARGS:-} --out "$OUT/stream_speed_cuda.json" \
  > "$OUT/bench.txt" 2>&1
bash scripts/device_bundle.sh
