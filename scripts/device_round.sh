#!/usr/bin/env bash
# One self-contained device call that trains from what an earlier call of the same lease left on the machine.
# The pack, the renderer wheel and the VAE (carried once: `setup`) stay there between calls, so a later call can
# carry a 49 MiB DiT checkpoint instead (64 MiB travel per call). Each call hands back what it made, so a machine
# lost between calls costs only what that call had not yet returned.
#
#   bash scripts/device_round.sh setup      (carry data/dit_pack.npz data/suite_inputs.pkl data/keep .whl .carry):
#                                           install the wheel there
#   bash scripts/device_round.sh train CONFIG OUT [KEY=VAL ...] [-- CONFIG OUT [KEY=VAL ...]]   train into OUT (runs
#                                           separated by '--' share the GPU); the first's checkpoint + all logs to $OUT
#   bash scripts/device_round.sh suite MODEL STEPS NAME [MODEL STEPS NAME ...]   held-out suites; JSON + gif to $OUT
# At most 8 files come back from a call: train returns 5 + one logs tar per run (4 shards, index), each suite 2.
# Paths: the VAE is read from data/keep/vae.safetensors; a checkpoint to start from travels as data/init (carry it
# alone). Keep them under data/: paths ignored by the repo's .gitignore stay on the machine between calls, paths
# ignored only through .git/info/exclude were removed there.
set -uo pipefail
mode=$1; shift
if [ "$mode" != setup ] && { [ ! -f data/dit_pack.npz ] || [ ! -f /tmp/site/.ready ]; }; then
  echo "fresh machine: run 'setup' (carrying data .whl .carry) first"; exit 3
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
case $mode in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -c "import skia, talkstream.world; print('renderer ok')" && touch /tmp/site/.ready
  ls -la data data/keep
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader ;;
train)
  # several runs side by side on the one GPU: separate them with '--'; the first run's checkpoint comes back,
  # the others' stay in their OUT folders (the logs of all come back)
  pids=() outs=()
  while [ $# -ge 2 ]; do
    config=$1 out=$2; shift 2
    stage=$(sed -n 's/^stage: *//p' "configs/$config.yaml")
    mkdir -p "$(dirname "$out")"
    sets=(--set "out=$out" --set vae=data/keep/vae.safetensors)
    while [ $# -gt 0 ] && [ "$1" != -- ]; do sets+=(--set "$1"); shift; done
    [ $# -gt 0 ] && shift
    python3 -m talkstream.cli train "$stage" --config "configs/$config.yaml" "${sets[@]}" > "$out.txt" 2>&1 &
    pids+=($!) outs+=("$out")
  done
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}"; rc=$?; out=${outs[$k]}
    echo "$out exit $rc"
    tr '\r' '\n' < "$out.txt" | grep -v "it/s\]$\|s/it\]$" | tail -30 > "$out.tail"
    cat "$out.tail"
    tar -cf "$OUT/$(basename "$out")_logs.tar" "$out.tail" "$out"/log.jsonl "$out"/metrics.json "$out"/loss.png 2>/dev/null
  done
  cp "${outs[0]}"/*.safetensors* "$OUT"/ && ls -la "$OUT" ;;
suite)
  while [ $# -ge 3 ]; do
    model=$1 steps=$2 name=$3; shift 3
    mkdir -p runs
    python3 -m talkstream.cli eval suite --model "$model" --vae data/keep/vae.safetensors --steps "$steps" --clips 4 \
      --inputs data/suite_inputs.pkl --device cuda --out "$OUT/suite_$name.json" --sample "$OUT/sample_$name.gif" \
      > "runs/suite_$name.txt" 2>&1
    echo "$name exit $?"; tail -n 8 "runs/suite_$name.txt"
  done ;;
esac
