#!/usr/bin/env bash
# Many held-out suites at once on a machine of several GPUs (after `device_round.sh setup`), detached so that one
# device call starts them and later calls collect them:
#
#   bash tools/device/device_suites.sh start PLAN      (again with another PLAN: both run) each line of PLAN: [VAR=VALUE ...] MODEL STEPS NAME (the variables
#                                                 of `device_round.sh suite`: SEEDS, REFINIT, CAPTIONS, CLIPS, ...);
#                                                 every line at once in its own process, line i on GPU
#                                                 i mod (the GPU count); lines whose log exists are skipped;
#                                                 each with SUITE_THREADS (4) CPU threads (36 suites without
#                                                 a limit took 192 threads each: load 865, 6x slower)
#   bash tools/device/device_suites.sh wait SECONDS    until every started plan has ended (or SECONDS): then the JSONs,
#                                                 GIFs and logs of all to $OUT as suites.tar
# 32 suites take ~80 s on 4 H200s; collect them with tools/device/collect_suites.py.
set -uo pipefail
mode=$1; shift
root=${SUITES_ROOT:-/tmp/suites}
cmd=(${SUITE_CMD:-bash tools/device/device_round.sh suite})  # (tests: a stub)
case $mode in
start)
  plan=$1 n=$(nvidia-smi -L | wc -l) work=$root/$(basename "$1")
  mkdir -p "$work" "$root/out" runs
  g=0 started=0
  while read -r line; do  # every line at once, in its own process (32 suites: 80 s on 4 H200s)
    [[ -z $line || $line == \#* ]] && continue
    read -ra words <<< "$line"; vars=(); args=(); seed=0
    for w in "${words[@]}"; do
      if [[ ${#args[@]} -eq 0 && $w == *=* ]]; then vars+=("$w"); [[ $w == SEEDS=* ]] && seed=${w#SEEDS=}
      else args+=("$w"); fi
    done
    tag=${args[-1]}; [ "$seed" != 0 ] && tag=${tag}_s$seed
    [ -f "runs/suite_$tag.txt" ] && continue  # already started (a plan started again resumes it)
    # setsid: the suite outlives the call that starts it
    setsid env OUT="$root/out" CUDA_VISIBLE_DEVICES=$((g % n)) OMP_NUM_THREADS=${SUITE_THREADS:-4} "${vars[@]}" \
      "${cmd[@]}" "${args[@]}" > "$work/$tag.log" 2>&1 < /dev/null &
    echo "$tag" >> "$work/tags"; g=$((g + 1)) started=$((started + 1))
  done < "$plan"
  sleep "${START_WAIT:-5}"; echo "started $started suites on $n GPUs" ;;
wait)
  deadline=$((SECONDS + $1))
  while [ $SECONDS -lt $deadline ]; do
    left=0; for t in $(cat "$root"/*/tags); do [ -f "$root/out/suite_$t.json" ] || left=1; done
    [ $left = 0 ] && break; sleep 5
  done
  echo "$(ls "$root"/out/*.json 2>/dev/null | wc -l) of $(cat "$root"/*/tags | wc -l) suites written"
  [ $left = 0 ] || pgrep -fc "[t]alkstream.cli eval suite"
  [ $left = 0 ] || { echo "still running"; exit 0; }
  cp runs/suite_*.txt "$root/out/" 2>/dev/null
  tar -cf "$OUT/suites.tar" -C "$root/out" . && ls -la "$OUT" ;;
esac
