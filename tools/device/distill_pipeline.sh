#!/usr/bin/env bash
# Few-step distillation on one remote GPU as one detached pipeline: ODE pairs -> ODE init -> DMD runs side by side
# ({Self-Forcing, LiveTalk} settings x {4, 2} steps) -> held-out suites of every student -> GPU stream speed -> the
# ship rule (tools/device/distill_rule.py) -> the chosen student handed back. docs/distillation.md ("The next GPU
# run") has the plan of calls with their seconds.
#
# Here first: `bash tools/device/distill_pipeline.sh prep` (the pack of 400 clips x 3.5 s, the suite's inputs, the
# weights as .tar.gz in data/; the renderer's wheel and libraries come from tools/device/device_prep.sh), then
# `bash tools/device/slim_tree.sh on` (the tree without the tracked weight shards; `off` right after the calls).
# prep checks that every call below fits the 64 MiB a call sends. The weights travel compressed, one call each,
# and the pipeline waits for what it needs:
#   call 1 (carry .whl .carry data/distill_pack.npz data/keep):
#     bash tools/device/distill_pipeline.sh unpack data/keep/vae.tar.gz data/keep && bash tools/device/distill_pipeline.sh start
#   call 2 (carry data/carry_t0 data/suite_inputs.pkl): bash tools/device/distill_pipeline.sh unpack data/carry_t0/teacher.tar.gz data/t0
#   call 3 (carry data/carry_init):  bash tools/device/distill_pipeline.sh unpack data/carry_init/causal.tar.gz data/init
#   then:                            bash tools/device/distill_pipeline.sh wait SECONDS   (again until it says DONE)
#   after DONE:                      bash tools/device/distill_pipeline.sh fetch NAME     (another run's student)
# Make each call within the machine's idle release (30 s) of the last: a machine given back takes the runs with it.
#
# Every `wait` hands back, besides the logs, the newest weights of the running stage not handed back yet
# (ckpt_NAME.tgz.partNN, 15 MiB each; the runs export every ckpt_every steps). Here, `keep FILES_AT` joins them into
# data/resume/NAME.tgz. If the machine is taken back, a fresh one resumes: calls 1-2 as above with `RESUME="NAMES"`
# before `start` (e.g. RESUME="ode_init dmd_sf4"), then one call per carried run (carry data/resume/NAME.tgz):
# `bash tools/device/distill_pipeline.sh resume data/resume/NAME.tgz`; call 3 only if ODE init had not finished.
# A finished run carried is not run again; an unfinished one starts from its carried weights with what is left of
# its time budget (ODE_S / DMD_S less the seconds its log shows; the optimiser's moments start afresh).
#
# Settings: DMD_S (each DMD run's time budget, s; 400), ODE_S (ODE init, s; 540), PAIRS (1536), DMD_RUNS
# ("sf4 lt4 sf2 lt2"; "": ODE init alone; a name is settings + steps + an optional tag, e.g. lt4e, whose own
# overrides are SETS_lt4e="KEY=VALUE ..."), DMD_BATCH (rollouts per update; 8), ODE_SEEDS (the ODE-init student's
# suites' noise seeds; "0 1"; "": none), DMD_SEEDS ("0 1 2 3"), FROM_DMD=1 (pairs and ODE init are on the machine
# already), SUITE_PAR (suites at once; 6).
# For a rehearsal elsewhere (tests/test_distill.py runs start -> run -> wait and a resume on a CPU with tiny models):
# DEVICE (cuda), TEACHER / VAE / INIT (the weights' paths), PACK, INPUTS (the suite's; "" prepares them),
# SUITE_ARGS ("--clips 4"), STAGE_SETS / PAIRS_SETS / ODE_SETS / DMD_SETS (KEY=VALUE overrides: all stages / one
# stage), RULE_ARGS (e.g. "--seeds 1"), STREAM_FPS=0 (skip the speed run), INSTALL=0 (skip the renderer's install),
# OUT (where hand-backs go; the machine's $OUT). BENCH (a command run first, once the causal model and the VAE are
# there, with the GPU to itself, at most BENCH_S s, 240; its results belong in runs/distill/, which `wait` hands back).
set -uo pipefail
mode=${1:-}; shift || true
R=runs/distill
mkdir -p "$R"
source "$(dirname "$0")/device_env.sh"
DEVICE=${DEVICE:-cuda}
TEACHER=${TEACHER:-data/t0/teacher.safetensors}
VAE=${VAE:-data/keep/vae.safetensors}
INIT=${INIT:-data/init/causal.safetensors}
PACK=${PACK:-data/distill_pack.npz}
INPUTS=${INPUTS-data/suite_inputs.pkl}
OUT=${OUT:-$R/out}
PART=15m  # hand-back pieces (a call returns files of at most 16 MiB)
# what each call carries (prep checks each against the 64 MiB a call sends, with the slim tree)
CALLS=(".whl .carry data/distill_pack.npz data/keep" "data/carry_t0 data/suite_inputs.pkl" "data/carry_init")

log() { echo "$(date +%T) $*" >> "$R/stages.txt"; }

wait_for() {  # FILE...: until each exists
  local f; for f in "$@"; do while [ ! -e "$f" ]; do sleep 2; done; done
}

wait_weights() {  # CHECKPOINT...: until each is whole (a sharded one: its index, which unpack moves last)
  local f; for f in "$@"; do while [ ! -e "$f" ] && [ ! -e "$f.index.json" ]; do sleep 2; done; done
}

train() {  # CONFIG OUT [KEY=VAL ...]: one stage, its output in OUT.txt, exit code in OUT.rc
  local config=$1 out=$2; shift 2
  local stage kv sets=(--set "out=$out" --set "vae=$VAE" --set "teacher=$TEACHER" --set "data=$PACK")
  stage=$(sed -n 's/^stage: *//p' "configs/$config.yaml")
  for kv in ${STAGE_SETS:-}; do sets+=(--set "$kv"); done
  for kv in "$@"; do sets+=(--set "$kv"); done
  python3 -m talkstream.cli train "$stage" --config "configs/$config.yaml" "${sets[@]}" > "$out.txt" 2>&1
  echo $? > "$out.rc"
  log "$out ($config) exit $(cat "$out.rc")"
}

suite() {  # MODEL NAME SEED
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=3 python3 -m talkstream.cli eval suite --model "$1" --vae "$VAE" ${SUITE_ARGS:---clips 4} \
    --noise-seed "$3" $([ -n "$INPUTS" ] && echo --inputs "$INPUTS") --device "$DEVICE" \
    --out "$R/suite_$2_s$3.json" $([ "$3" = 0 ] && echo --sample "$R/sample_$2.gif") > "$R/suite_$2_s$3.txt" 2>&1
  log "suite $2 seed $3 exit $?"
}

resuming() { [[ " ${RESUME:-} " == *" $1 "* ]]; }  # NAME: a call brings this run's weights

carried_student() {  # NAME: the newest export of a carried, unfinished run
  local d=runs/$1.carried
  echo "$d/$(cat "$d/latest.txt")/student.safetensors"
}

budget_left() {  # NAME BUDGET: BUDGET less the seconds the carried run's log shows (at least 60)
  python3 -c "
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
print(max(60, int(float(sys.argv[2]) - (rows[-1]['seconds'] if rows else 0))))" "runs/$1.carried/log.jsonl" "$2"
}

ship_files() {  # NAME: the student of runs/NAME, its large shards as files, the rest in small_NAME.tar
  local d=runs/$1 t=/tmp/hb_$1
  rm -rf "$t"; mkdir -p "$t" "$OUT/$1"
  find "$d" -maxdepth 1 -name 'student*.safetensors' -size +8M -exec cp {} "$OUT/$1"/ \;
  find "$d" -maxdepth 1 \( -name 'student*.safetensors*' ! -size +8M -o -name log.jsonl -o -name metrics.json \
    -o -name loss.png \) -exec cp {} "$t"/ \;
  tar -cf "$OUT/small_$1.tar" -C "$t" .
}

checkpoint_back() {  # the newest weights not handed back yet (a finished run's student, else its latest export)
  local d n version best="" best_t=0 best_v="" t files
  for d in runs/ode_init runs/dmd_*; do
    [ -d "$d" ] || continue
    [[ $d == *.carried ]] && continue
    if [ -f "$d/metrics.json" ] && ls "$d"/student*.safetensors > /dev/null 2>&1; then
      version=final; t=$(stat -c %Y "$d/metrics.json")
    elif [ -f "$d/latest.txt" ]; then
      version=$(cat "$d/latest.txt"); t=$(stat -c %Y "$d/latest.txt")
    else
      continue
    fi
    [ "$(cat "$d/.handed" 2>/dev/null)" = "$version" ] && continue
    if [ "$t" -ge "$best_t" ]; then best=$d; best_t=$t; best_v=$version; fi
  done
  [ -n "$best" ] || return 0
  n=$(basename "$best")
  files=("$n/log.jsonl" "$n/config.json")
  if [ "$best_v" = final ]; then
    files+=("$n/metrics.json" $(cd runs && ls "$n"/student*.safetensors*))
  else
    files+=("$n/latest.txt" "$n/$best_v")
  fi
  (cd runs && tar -czf "/tmp/ckpt_$n.tgz" --ignore-failed-read "${files[@]}" 2> /dev/null) || return 0
  split -b "$PART" -d "/tmp/ckpt_$n.tgz" "$OUT/ckpt_$n.tgz.part" && echo "$best_v" > "$best/.handed"
  echo "handed back: $n ($best_v)"
}

case $mode in
prep)  # here (the machine with espeak-ng, Whisper and MiniLM): everything the calls carry
  [ -f data/distill_pack.npz ] || python3 -m talkstream.cli train pack --out data/distill_pack.npz --clips 400 \
    --seconds 3.5 --seed 11000 || exit 1
  [ -f data/suite_inputs.pkl ] || python3 -m talkstream.cli eval suite --save-inputs data/suite_inputs.pkl \
    --clips 4 || exit 1
  ls .whl/skia_python-*.whl > /dev/null 2>&1 && [ -d .carry/lib ] ||
    { echo "make .whl and .carry with the first part of tools/device/device_prep.sh"; exit 1; }
  mkdir -p data/carry_t0 data/carry_init data/keep
  for w in teacher:carry_t0 causal:carry_init vae:keep; do
    name=${w%%:*} dir=data/${w#*:}
    index=talkstream/weights/$name.safetensors.index.json
    # made again when the shipped weights are newer than the tarball (a stale tarball would train the wrong model)
    if [ ! -f "$dir/$name.tar.gz" ] || [ -n "$(find talkstream/weights -name "$name*" -newer "$dir/$name.tar.gz")" ]; then
      (cd talkstream/weights && tar -cf - "$name"-0000?-of-0000?.safetensors "$name.safetensors.index.json" |
        gzip -6 > "../../$dir/$name.tar.gz.tmp") && mv "$dir/$name.tar.gz.tmp" "$dir/$name.tar.gz" || exit 1
    fi
    python3 -c "
import json, sys, tarfile
want = set(json.load(open(sys.argv[2]))['weight_map'].values()) | {sys.argv[2].rsplit('/', 1)[1]}
have = set(tarfile.open(sys.argv[1]).getnames())
sys.exit(0 if want <= have else f'{sys.argv[1]}: missing {sorted(want - have)}')" "$dir/$name.tar.gz" "$index" || exit 1
  done
  du -sh data/distill_pack.npz data/suite_inputs.pkl data/carry_t0 data/carry_init data/keep .whl .carry
  ok=0
  for i in "${!CALLS[@]}"; do
    echo -n "call $((i + 1)): "
    # shellcheck disable=SC2086
    bash "$(dirname "$0")/slim_tree.sh" check ${CALLS[$i]} | tail -n 1 || ok=1
  done
  exit $ok ;;
start)
  if [ "${INSTALL:-1}" = 1 ]; then device_install && echo "renderer ok" || exit 3; fi
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$R/gpu.txt"
  rm -f "$R/DONE"
  setsid nohup bash "$0" run > "$R/pipeline.log" 2>&1 < /dev/null &
  sleep 3; echo "pipeline started${RESUME:+ (resuming: $RESUME)}"; cat "$R/pipeline.log" ;;
unpack)  # FILE DIR: a tar.gz of weights (gzip gets bf16 weights to ~78%)
  mkdir -p "$2"
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2] + '.part', filter='data')" "$1" "$2" &&
    mv "$2".part/* "$2"/ && rmdir "$2".part && ls -la "$2" || exit 1
  tail -n 5 "$R/stages.txt" 2>/dev/null; exit 0 ;;  # (its exit code is the unpacking's: `unpack ... && start`)
resume)  # FILE: a run's weights handed back by `wait` (data/resume/NAME.tgz): finished -> runs/NAME, else NAME.carried
  t=$(mktemp -d)
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$1" "$t" || exit 1
  n=$(ls "$t"); [ "$(echo "$n" | wc -l)" = 1 ] || { echo "$1: not one run's hand-back"; exit 1; }
  dest=runs/$n; [ -f "$t/$n/metrics.json" ] || dest=runs/$n.carried
  rm -rf "$dest"; mkdir -p runs; mv "$t/$n" "$dest" && rmdir "$t" && touch "runs/.resume_$n" || exit 1
  echo "$1 -> $dest"; tail -n 5 "$R/stages.txt" 2>/dev/null; exit 0 ;;
run)
  T0=$SECONDS
  for n in ${RESUME:-}; do wait_for "runs/.resume_$n"; done  # (its calls come before or while the weights do)
  if [ -n "${BENCH:-}" ] && [ ! -f "$R/bench.txt" ]; then  # speed figures first, with the GPU to themselves
    wait_weights "$INIT" "$VAE"
    timeout "${BENCH_S:-240}" bash -c "$BENCH" > "$R/bench.txt" 2>&1
    log "bench exit $? after $((SECONDS - T0)) s"
  fi
  wait_weights "$TEACHER" "$VAE"
  log "weights here after $((SECONDS - T0)) s"
  if [ -z "${FROM_DMD:-}" ] && [ ! -f runs/ode_init/metrics.json ]; then
    # shellcheck disable=SC2086
    train ode_pairs runs/ode_pairs n_pairs="${PAIRS:-1536}" ${PAIRS_SETS:-}
    init=$INIT budget=${ODE_S:-540}
    if resuming ode_init; then
      init=$(carried_student ode_init) budget=$(budget_left ode_init "$budget")
      log "ODE init resumes from $init for $budget s"
    else
      wait_weights "$INIT"
    fi
    # shellcheck disable=SC2086
    train ode_init runs/ode_init pairs=runs/ode_pairs init="$init" time_budget="$budget" ${ODE_SETS:-}
  fi
  if ! ls runs/ode_init/student*.safetensors* > /dev/null 2>&1 || [ ! -f runs/ode_init/metrics.json ]; then
    log "no ODE-init student"; touch "$R/DONE"; exit 1
  fi
  runs=${DMD_RUNS-sf4 lt4 sf2 lt2}  # side by side on the GPU (batch and count: docs/distillation.md); "": none
  for r in $runs; do
    [ -f "runs/dmd_$r/metrics.json" ] && { log "dmd_$r: carried whole"; continue; }
    config=distill_sf; [ "${r:0:2}" = lt ] && config=distill_livetalk
    steps=(); [ "${r:2:1}" = 2 ] && steps=("student_timesteps=[1000, 500]")
    own="SETS_$r"  # a variant's own overrides: DMD_RUNS="lt4 lt4e" SETS_lt4e="lr=1e-5 lr_critic=1e-5"
    init=runs/ode_init/student.safetensors budget=${DMD_S:-400}
    if resuming "dmd_$r"; then
      init=$(carried_student "dmd_$r") budget=$(budget_left "dmd_$r" "$budget")
      log "dmd_$r resumes from $init for $budget s"
    fi
    # shellcheck disable=SC2086
    train $config "runs/dmd_$r" init="$init" time_budget="$budget" batch="${DMD_BATCH:-8}" "${steps[@]}" \
      ${DMD_SETS:-} ${!own:-} &
  done
  wait
  for name in ode_init $(for r in $runs; do echo "dmd_$r"; done); do
    [ -f "runs/$name/metrics.json" ] || continue  # (a run that failed: its log says why)
    seeds=${DMD_SEEDS-0 1 2 3}; [ "$name" = ode_init ] && seeds=${ODE_SEEDS-0 1}
    for seed in $seeds; do
      [ -f "$R/suite_${name}_s$seed.json" ] && continue  # (done by an earlier start)
      while [ "$(jobs -rp | wc -l)" -ge "${SUITE_PAR:-6}" ]; do sleep 1; done
      suite "runs/$name/student.safetensors" "$name" "$seed" &
    done
  done
  wait
  if [ "${STREAM_FPS:-1}" = 1 ]; then
    models=(runs/ode_init/student.safetensors)
    for r in $runs; do [ -f "runs/dmd_$r/metrics.json" ] && models+=("runs/dmd_$r/student.safetensors"); done
    { [ -e "$INIT" ] || [ -e "$INIT.index.json" ]; } && models+=("$INIT")  # (c6: not carried when ODE init was)
    python3 tools/device/stream_fps.py --out "$R/stream_fps_gpu.json" --device "$DEVICE" --vae "$VAE" \
      --inputs "$INPUTS" "${models[@]}" > "$R/stream_fps.txt" 2>&1
    log "stream speed exit $?"
  fi
  # shellcheck disable=SC2086
  python3 tools/device/distill_rule.py "$R" ${RULE_ARGS:-} > "$R/rule.txt" 2>&1
  log "rule exit $?; done after $((SECONDS - T0)) s"
  touch "$R/DONE" ;;
wait)  # SECONDS: until DONE (or SECONDS); then the logs, suites, and the newest weights (the chosen student at DONE)
  deadline=$((SECONDS + ${1:-540}))
  while [ ! -f "$R/DONE" ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
  mkdir -p "$OUT"
  cat "$R/stages.txt"
  for f in runs/*.txt; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v "it/s\]$\|s/it\]$" | grep -v '^\s*$' | tail -n 3; done
  for f in runs/*/log.jsonl; do echo "$f: $(tail -n 1 "$f")"; done
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  t=/tmp/logs_bundle; rm -rf "$t"; mkdir -p "$t"
  cp "$R"/*.txt "$R"/*.json "$R"/pipeline.log "$t"/ 2>/dev/null  # (the GIFs come with fetch: 64 MiB a call)
  for d in runs/*/; do n=$(basename "$d"); for f in log.jsonl metrics.json loss.png; do cp "$d$f" "$t/${n}_$f" 2>/dev/null; done; done
  tar -cf "$OUT/logs.tar" -C "$t" .
  if [ -f "$R/DONE" ]; then
    cat "$R/rule.txt"
    ship=$(python3 -c "import json; print(json.load(open('$R/ship.json')).get('hand_back') or '')" 2>/dev/null)
    [ -n "$ship" ] && ship_files "$ship"
    echo DONE
  else
    checkpoint_back
  fi
  ls -la "$OUT" ;;
fetch)  # NAME [gifs]: another run's student (and the suites' GIFs)
  [ -n "${1:-}" ] && [ "$1" != gifs ] && ship_files "$1"
  [[ " $* " == *" gifs "* ]] && tar -cf "$OUT/gifs.tar" -C "$R" $(cd "$R" && ls *.gif)
  ls -la "$OUT"/* ;;
keep)  # DIR (here: a call's files_at): its ckpt_NAME.tgz.partNN joined into data/resume/NAME.tgz
  mkdir -p data/resume
  for first in "$1"/ckpt_*.tgz.part00; do
    [ -e "$first" ] || { echo "no hand-back in $1"; exit 1; }
    n=$(basename "$first" .tgz.part00); n=${n#ckpt_}
    cat "${first%00}"?? > "data/resume/$n.tgz.tmp" && mv "data/resume/$n.tgz.tmp" "data/resume/$n.tgz" || exit 1
    echo "data/resume/$n.tgz ($(du -h "data/resume/$n.tgz" | cut -f1)): carry it and run \`resume data/resume/$n.tgz\`"
  done ;;
*)
  echo "usage: $0 prep | start | unpack FILE DIR | resume FILE | wait SECONDS | fetch NAME | keep DIR"; exit 2 ;;
esac
