#!/usr/bin/env bash
# One call on a lent GPU machine: several training stages at once (one process each, sharing the GPU),
# then the held-out suite on what they made, then selected files to $OUT (the rest in $OUT/bundle.tar).
#   PAR="vae:time_budget=200 | teacher:... decoder:..."  phases (|) run in turn, the configs of a phase side by side
#                                                       (CONFIG[:KEY=VAL,...] reads configs/CONFIG.yaml)
#   SUITE="MODEL VAE STEPS CLIPS NAME"                       optional, ';'-separated: eval suite runs afterwards
#   AFTER="python3 benchmarks/... --out \$OUT/logs/x.json"   optional command run after the stages and suites
#   EXPORT="runs/teacher/teacher-*.safetensors ..."         files that come back as themselves
# Carry: data/dit_pack.npz, data/suite_inputs.pkl, .whl (skia-python), .carry (libEGL & co.).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
OUT=${OUT:-out/device}
mkdir -p "$OUT/logs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/logs/gpu.txt" 2>&1
IFS='|' read -ra phases <<< "${PAR:-}"
for phase in "${phases[@]}"; do  # phases run one after the other, the stages of a phase side by side
  pids=()
  for spec in $phase; do
    name=${spec%%:*}
    stage=$(sed -n 's/^stage: *//p' "configs/$name.yaml")
    sets=()
    if [[ "$spec" == *:* ]]; then IFS=',' read -ra kv <<< "${spec#*:}"; for x in "${kv[@]}"; do sets+=(--set "$x"); done; fi
    echo "== $name ($stage) ${sets[*]:-}" | tee -a "$OUT/logs/stages.txt"
    python3 -m talkstream.cli train "$stage" --config "configs/$name.yaml" "${sets[@]}" > "$OUT/logs/$name.txt" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; echo "pid $p exit $? at ${SECONDS}s" >> "$OUT/logs/stages.txt"; done
done
IFS=';' read -ra suites <<< "${SUITE:-}"
for s in "${suites[@]}"; do
  read -r model vae steps clips name <<< "$s"
  [ -z "${model:-}" ] && continue
  timeout "${SUITE_S:-120}" python3 -m talkstream.cli eval suite --model "$model" --vae "$vae" --steps "$steps" \
    --clips "$clips" --inputs data/suite_inputs.pkl --device cuda --out "$OUT/logs/suite_$name.json" \
    --sample "$OUT/logs/sample_$name.gif" > "$OUT/logs/suite_$name.txt" 2>&1
done
if [ -n "${AFTER:-}" ]; then bash -c "$AFTER" > "$OUT/logs/after.txt" 2>&1; fi  # e.g. benchmarks, into $OUT/logs
for d in runs/*/; do
  n=$(basename "$d")
  for f in log.jsonl metrics.json loss.png; do cp -f "$d$f" "$OUT/logs/${n}_$f" 2>/dev/null; done
done
for f in ${EXPORT:-}; do cp -f $f "$OUT"/ 2>/dev/null; done
for f in "$OUT"/logs/*.txt; do tr '\r' '\n' < "$f" | grep -v "it/s\]$\|s/it\]$" | tail -40 > "$f.tail"; mv "$f.tail" "$f"; done
tar -cf "$OUT/bundle.tar" -C "$OUT" logs && rm -rf "$OUT/logs"
ls -la "$OUT"
