#!/usr/bin/env bash
# Few-step distillation on one remote GPU as one detached pipeline: ODE pairs -> ODE init -> four DMD runs side by
# side ({Self-Forcing, LiveTalk} settings x {4, 2} steps) -> held-out suites of every student -> GPU stream speed
# -> the ship rule (tools/device/distill_rule.py) -> the chosen student handed back.
#
# Here first: `bash tools/device/distill_pipeline.sh prep` (the pack of 400 clips x 3.5 s, ~5 min on 2 cores, the
# suite's inputs, the renderer's wheel and libraries, the weights as .tar.gz in data/). The weights travel compressed
# (64 MiB a call, and the tree itself must travel without the tracked teacher / causal / VAE files: ~12 MB), one
# call each, and the pipeline waits for what it needs:
#   call 1 (carry .whl .carry data/distill_pack.npz data/suite_inputs.pkl data/keep):
#     bash tools/device/distill_pipeline.sh unpack data/keep/vae.tar.gz data/keep &&
#       bash tools/device/distill_pipeline.sh start
#   call 2 (carry data/carry_t0):    bash tools/device/distill_pipeline.sh unpack data/carry_t0/teacher.tar.gz data/t0
#   call 3 (carry data/carry_init):  bash tools/device/distill_pipeline.sh unpack data/carry_init/causal.tar.gz data/init
#   then:                            bash tools/device/distill_pipeline.sh wait SECONDS   (again until it says DONE)
#   after DONE:                      bash tools/device/distill_pipeline.sh fetch NAME     (another run's student)
# Make each call within the machine's idle release (30 s) of the last: a machine given back takes the runs with it.
# Settings: DMD_S (DMD time budget, s; 270), ODE_S (ODE init, s; 180), PAIRS (1536), DMD_RUNS ("sf4 lt4 sf2 lt2"),
# DMD_BATCH (rollouts per update, 8: four runs of 24 did not fit an H100's 80 GB), ODE_SEEDS (the ODE-init student's
# suites; "0 1"), FROM_DMD=1 (pairs and ODE init are on the machine already), SUITE_PAR (suites at once; 6).
set -uo pipefail
mode=${1:-}; shift || true
R=runs/distill
mkdir -p "$R"
source "$(dirname "$0")/device_env.sh"

wait_for() {  # FILE...: until each exists
  local f; for f in "$@"; do while [ ! -e "$f" ]; do sleep 2; done; done
}

train() {  # CONFIG OUT [KEY=VAL ...]: one stage, its output in OUT.txt, exit code in OUT.rc
  local config=$1 out=$2; shift 2
  local stage sets=(--set "out=$out" --set vae=data/keep/vae.safetensors --set teacher=data/t0/teacher.safetensors)
  stage=$(sed -n 's/^stage: *//p' "configs/$config.yaml")
  for kv in "$@"; do sets+=(--set "$kv"); done
  python3 -m talkstream.cli train "$stage" --config "configs/$config.yaml" "${sets[@]}" > "$out.txt" 2>&1
  echo $? > "$out.rc"
  echo "$(date +%T) $out ($config) exit $(cat "$out.rc")" >> "$R/stages.txt"
}

suite() {  # MODEL NAME SEED
  OMP_NUM_THREADS=3 python3 -m talkstream.cli eval suite --model "$1" --vae data/keep/vae.safetensors --clips 4 \
    --noise-seed "$3" --inputs data/suite_inputs.pkl --device cuda --out "$R/suite_$2_s$3.json" \
    $([ "$3" = 0 ] && echo --sample "$R/sample_$2.gif") > "$R/suite_$2_s$3.txt" 2>&1
  echo "$(date +%T) suite $2 seed $3 exit $?" >> "$R/stages.txt"
}

hand_back() {  # NAME: the student of runs/NAME, its large shards as files, the rest in small_NAME.tar
  local d=runs/$1 t=/tmp/hb_$1
  rm -rf "$t"; mkdir -p "$t" "$OUT/$1"
  find "$d" -maxdepth 1 -name 'student*.safetensors' -size +8M -exec cp {} "$OUT/$1"/ \;
  find "$d" -maxdepth 1 \( -name 'student*.safetensors*' ! -size +8M -o -name log.jsonl -o -name metrics.json \
    -o -name loss.png \) -exec cp {} "$t"/ \;
  tar -cf "$OUT/small_$1.tar" -C "$t" .
}

case $mode in
prep)  # here (the machine with espeak-ng, Whisper and MiniLM): everything the calls carry
  [ -f data/distill_pack.npz ] || python3 -m talkstream.cli train pack --out data/distill_pack.npz --clips 400 \
    --seconds 3.5 --seed 11000
  [ -f data/suite_inputs.pkl ] || python3 -m talkstream.cli eval suite --save-inputs data/suite_inputs.pkl --clips 4
  ls .whl/skia_python-*.whl > /dev/null 2>&1 && [ -d .carry/lib ] || echo "make .whl and .carry with the first part of tools/device/device_prep.sh"
  mkdir -p data/carry_t0 data/carry_init data/keep
  for w in teacher:carry_t0 causal:carry_init vae:keep; do
    name=${w%%:*} dir=data/${w#*:}
    [ -f "$dir/$name.tar.gz" ] || (cd talkstream/weights && tar -cf - "$name"-0000?-of-0000?.safetensors \
      "$name.safetensors.index.json" | gzip -6 > "../../$dir/$name.tar.gz")
  done
  du -sh data/distill_pack.npz data/suite_inputs.pkl data/carry_t0 data/carry_init data/keep .whl .carry ;;
start)
  device_install && echo "renderer ok" || exit 3
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$R/gpu.txt"
  rm -f "$R/DONE"
  setsid nohup bash "$0" run > "$R/pipeline.log" 2>&1 < /dev/null &
  sleep 3; echo "pipeline started"; cat "$R/pipeline.log" ;;
unpack)  # FILE DIR: a tar.gz of weights (gzip gets bf16 weights to ~78%)
  mkdir -p "$2"
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2] + '.part', filter='data')" "$1" "$2" &&
    mv "$2".part/* "$2"/ && rmdir "$2".part && ls -la "$2" || exit 1
  tail -n 5 "$R/stages.txt" 2>/dev/null; exit 0 ;;  # (its exit code is the unpacking's: `unpack ... && start`)
run)
  T0=$SECONDS
  wait_for data/t0/teacher.safetensors.index.json data/keep/vae.safetensors.index.json
  echo "$(date +%T) weights here after $((SECONDS - T0)) s" >> "$R/stages.txt"
  if [ -z "${FROM_DMD:-}" ]; then  # FROM_DMD=1: the pairs and the ODE-init student are here already
    train ode_pairs runs/ode_pairs n_pairs="${PAIRS:-1536}"
    wait_for data/init/causal.safetensors.index.json
    train ode_init runs/ode_init init=data/init/causal.safetensors time_budget="${ODE_S:-180}"
  fi
  [ -f runs/ode_init/student.safetensors.index.json ] || { echo "no ODE-init student" >> "$R/stages.txt"; touch "$R/DONE"; exit 1; }
  budget=${DMD_S:-270}
  runs=${DMD_RUNS:-sf4 lt4 sf2 lt2}  # side by side on the GPU (an H100: four of batch 8 took 73 GB, four of 24 did not fit)
  for r in $runs; do
    config=distill_sf; [ "${r:0:2}" = lt ] && config=distill_livetalk
    steps=(); [ "${r:2}" = 2 ] && steps=("student_timesteps=[1000, 500]")
    train $config "runs/dmd_$r" time_budget="$budget" batch="${DMD_BATCH:-8}" "${steps[@]}" &
  done
  wait
  for spec in "ode_init ${ODE_SEEDS:-0 1}" $(for r in $runs; do echo "dmd_$r"; done); do
    read -r name one <<< "$spec"
    for seed in ${one:-0 1 2 3}; do
      [ -f "$R/suite_${name}_s$seed.json" ] && continue  # (done by an earlier start)
      while [ "$(jobs -rp | wc -l)" -ge "${SUITE_PAR:-6}" ]; do sleep 1; done
      suite "runs/$name/student.safetensors" "$name" "$seed" &
    done
  done
  wait
  python3 tools/device/stream_fps.py --out "$R/stream_fps_gpu.json" --device cuda \
    runs/ode_init/student.safetensors runs/dmd_sf4/student.safetensors runs/dmd_lt4/student.safetensors \
    runs/dmd_sf2/student.safetensors runs/dmd_lt2/student.safetensors data/init/causal.safetensors \
    > "$R/stream_fps.txt" 2>&1
  python3 tools/device/distill_rule.py "$R" > "$R/rule.txt" 2>&1
  echo "$(date +%T) done after $((SECONDS - T0)) s" >> "$R/stages.txt"
  touch "$R/DONE" ;;
wait)  # SECONDS: until DONE (or SECONDS); then the logs, suites and the chosen student come back
  deadline=$((SECONDS + ${1:-540}))
  while [ ! -f "$R/DONE" ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
  cat "$R/stages.txt"
  for f in runs/*.txt; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v "it/s\]$\|s/it\]$" | grep -v '^\s*$' | tail -n 3; done
  for f in runs/*/log.jsonl; do echo "$f: $(tail -n 1 "$f")"; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  t=/tmp/logs_bundle; rm -rf "$t"; mkdir -p "$t"
  cp "$R"/*.txt "$R"/*.json "$R"/pipeline.log "$t"/ 2>/dev/null  # (the GIFs come with fetch: 64 MiB a call)
  for d in runs/*/; do n=$(basename "$d"); for f in log.jsonl metrics.json loss.png; do cp "$d$f" "$t/${n}_$f" 2>/dev/null; done; done
  tar -cf "$OUT/logs.tar" -C "$t" .
  if [ -f "$R/DONE" ]; then
    cat "$R/rule.txt"
    ship=$(python3 -c "import json; print(json.load(open('$R/ship.json')).get('hand_back') or '')" 2>/dev/null)
    [ -n "$ship" ] && hand_back "$ship"
    echo DONE
  fi
  ls -la "$OUT" ;;
fetch)  # NAME [gifs]: another run's student (and the suites' GIFs)
  [ -n "${1:-}" ] && [ "$1" != gifs ] && hand_back "$1"
  [[ " $* " == *" gifs "* ]] && tar -cf "$OUT/gifs.tar" -C "$R" $(cd "$R" && ls *.gif)
  ls -la "$OUT"/* ;;
*)
  echo "usage: $0 start | unpack FILE DIR | wait SECONDS | fetch NAME"; exit 2 ;;
esac
