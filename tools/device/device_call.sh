#!/usr/bin/env bash
# A remote GPU machine's work as one detached pipeline: several training stages at once (one process each,
# sharing the GPU), then the held-out suite on what they made, then an optional command. Each device call
# lasts at most 10 minutes, so the pipeline runs in its own process session and later calls collect from it.
#
#   bash tools/device/device_call.sh start        start the pipeline (detached; its files stay in out/pipeline)
#   bash tools/device/device_call.sh wait SECONDS wait for it up to SECONDS, then put a snapshot of its logs
#                                            ($OUT/bundle.tar) and the EXPORT files into $OUT
# Settings (environment variables, read by `start` unless noted):
#   PAR="vae:time_budget=200 | teacher:... decoder:..."  phases (|) run in turn, the configs of a phase side by side
#                                                       (CONFIG[:KEY=VAL,...] reads configs/CONFIG.yaml)
#   BG="vae_decoder:time_budget=1300"                     stages run beside the phases (waited for before the suites)
#   SUITE="MODEL VAE STEPS CLIPS NAME; ..."                eval suite runs afterwards (SUITE_S: time limit of each)
#   AFTER="python3 benchmarks/... --out out/pipeline/logs/x.json"  a command run after the stages and suites
#   EXPORT="runs/teacher/teacher-*.safetensors ..."        (wait) files that come back as themselves
# Carry: data/dit_pack.npz, data/suite_inputs.pkl, .whl (skia-python), .carry (libEGL & co.).
set -uo pipefail
RES=out/pipeline
mode=${1:-start}

if [ "$mode" = start ]; then
  mkdir -p "$RES/logs"
  rm -f "$RES/DONE"
  setsid nohup bash "$0" run > "$RES/pipeline.log" 2>&1 < /dev/null &
  sleep 2
  echo "pipeline started (pid $!)"
  exit 0
fi

if [ "$mode" = wait ]; then
  limit=${2:-540}
  while [ ! -f "$RES/DONE" ] && [ "$SECONDS" -lt "$limit" ]; do sleep 5; done
  [ -f "$RES/DONE" ] && echo "pipeline done" || echo "pipeline still running after ${SECONDS}s"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  snap=$(mktemp -d)/logs
  mkdir -p "$snap"
  cp -f "$RES"/pipeline.log "$RES"/logs/* "$snap"/ 2>/dev/null
  for d in runs/*/; do
    n=$(basename "$d")
    for f in log.jsonl metrics.json loss.png; do cp -f "$d$f" "$snap/${n}_$f" 2>/dev/null; done
  done
  for f in "$snap"/*.txt "$snap"/pipeline.log; do  # progress bars out, last 40 lines kept
    [ -f "$f" ] && tr '\r' '\n' < "$f" | grep -v "it/s\]$\|s/it\]$" | tail -40 > "$f.tail" && mv "$f.tail" "$f"
  done
  tail -n 4 "$snap"/*.txt
  for f in "$snap"/*_log.jsonl; do echo "$f: $(tail -n 1 "$f")"; done
  tar -cf "$OUT/bundle.tar" -C "$(dirname "$snap")" logs
  for f in ${EXPORT:-}; do cp -f $f "$OUT"/ 2>/dev/null; done
  ls -la "$OUT"
  exit 0
fi

# mode run: the pipeline itself
source "$(dirname "$0")/device_env.sh"
device_install
L=$RES/logs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$L/gpu.txt" 2>&1
launch() {  # launch SPEC in the background; its pid in $pid
  local spec=$1 name stage log x
  name=${spec%%:*}
  stage=$(sed -n 's/^stage: *//p' "configs/$name.yaml")
  sets=()
  if [[ "$spec" == *:* ]]; then IFS=',' read -ra kv <<< "${spec#*:}"; for x in "${kv[@]}"; do sets+=(--set "$x"); done; fi
  log=$name
  for x in "${sets[@]}"; do [[ "$x" == out=* ]] && log=$(basename "${x#out=}"); done
  echo "== $log: $name ($stage) ${sets[*]:-} at ${SECONDS}s" | tee -a "$L/stages.txt"
  python3 -m talkstream.cli train "$stage" --config "configs/$name.yaml" "${sets[@]}" > "$L/$log.txt" 2>&1 &
  pid=$!
}
bg=()
for spec in ${BG:-}; do launch "$spec"; bg+=($pid); done  # beside every phase, waited for before the suites
IFS='|' read -ra phases <<< "${PAR:-}"
for phase in "${phases[@]}"; do  # phases run one after the other, the stages of a phase side by side
  pids=()
  for spec in $phase; do
    launch "$spec"
    pids+=($pid)
  done
  for p in "${pids[@]}"; do wait "$p"; echo "pid $p exit $? at ${SECONDS}s" >> "$L/stages.txt"; done
done
for p in "${bg[@]}"; do wait "$p"; echo "pid $p (BG) exit $? at ${SECONDS}s" >> "$L/stages.txt"; done
IFS=';' read -ra suites <<< "${SUITE:-}"
for s in "${suites[@]}"; do
  read -r model vae steps clips name <<< "$s"
  [ -z "${model:-}" ] && continue
  echo "== suite $name at ${SECONDS}s" >> "$L/stages.txt"
  timeout "${SUITE_S:-150}" python3 -m talkstream.cli eval suite --model "$model" --vae "$vae" --steps "$steps" \
    --clips "$clips" --inputs data/suite_inputs.pkl --device cuda --out "$L/suite_$name.json" \
    --sample "$L/sample_$name.gif" > "$L/suite_$name.txt" 2>&1
done
if [ -n "${AFTER:-}" ]; then bash -c "$AFTER" > "$L/after.txt" 2>&1; fi
echo "done at ${SECONDS}s" >> "$L/stages.txt"
touch "$RES/DONE"
