#!/usr/bin/env bash
# Run training stages on a lent GPU machine (no registry access there): installs the carried skia wheel,
# points the loader at the carried GL/X libraries, runs the given stages, and copies results to $OUT.
#   bash scripts/device_train.sh STAGE[:KEY=VAL,KEY=VAL] ...
# Weight shards come back as files, everything else (logs, metrics, small weights) in $OUT/bundle.tar.
# Carry: data (the packs), .whl (skia-python for the device's Python), .carry/lib (libEGL & co.).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
OUT=${OUT:-out/device}
mkdir -p "$OUT"
for spec in "$@"; do
  stage=${spec%%:*}
  sets=()
  if [[ "$spec" == *:* ]]; then IFS=',' read -ra kv <<< "${spec#*:}"; for x in "${kv[@]}"; do sets+=(--set "$x"); done; fi
  echo "== $stage ${sets[*]:-}"
  python3 -m talkstream.cli train "$stage" --config "configs/$stage.yaml" "${sets[@]}" 2>&1 | grep -v -i "warn" | tr '\r' '\n' | grep -v "it/s\]$" | tail -30
  run=runs/$stage
  [ "$stage" = decoder ] && run=runs/decoder
  cp -f $run/*.safetensors $run/*.index.json "$OUT"/ 2>/dev/null
  cp -f $run/metrics.json "$OUT/${stage}_metrics.json" 2>/dev/null
  cp -f $run/log.jsonl "$OUT/${stage}_log.jsonl" 2>/dev/null
  cp -f $run/loss.png "$OUT/${stage}_loss.png" 2>/dev/null
done
[ "${BUNDLE:-1}" = 1 ] && bash "$(dirname "$0")/device_bundle.sh"
ls -la "$OUT"
