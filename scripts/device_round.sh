#!/usr/bin/env bash
# One self-contained device call that trains from what an earlier call of the same lease left on the machine.
# The pack, the renderer wheel and the VAE (carried once: `setup`) stay there between calls, so a later call can
# carry a 49 MiB DiT checkpoint instead (64 MiB travel per call). Each call hands back what it made, so a machine
# lost between calls costs only what that call had not yet returned.
#
#   bash scripts/device_round.sh setup      (carry data/dit_pack.npz data/suite_inputs.pkl data/keep .whl .carry):
#                                           install the wheel there
#   bash scripts/device_round.sh train CONFIG OUT [KEY=VAL ...] [-- CONFIG OUT [KEY=VAL ...]]   train into OUT (runs
#                                           separated by '--' share the GPU, or take one each on a machine of
#                                           several); checkpoints, then logs, to $OUT
#   bash scripts/device_round.sh latents PACKS   render and VAE-encode the packs' clips (comma-separated packs)
#                                           into the latent cache data/latents, one file per clip (train with
#                                           data=ANY,PACKS latent_cache=data/latents: cached clips are read back)
#   bash scripts/device_round.sh fetch OUT [OUT ...]   hand back checkpoints an earlier call trained but could not
#                                           return (one DiT fills a call's files; a run beside it stays behind)
#   bash scripts/device_round.sh suite MODEL STEPS NAME [MODEL STEPS NAME ...]   held-out suites; JSON + gif to $OUT
#                                           (SEEDS="0 1": one suite per noise seed; VAE=path: another VAE;
#                                           CFG=2: the audio guidance scale; SHIFT=1: the sampling schedule's
#                                           shift, default the samplers' 3)
# At most 8 files come back from a call: train hands back the runs' checkpoints in order while they fit (a DiT: 4
# shards + index, the VAE: 2 + index, the tiny decoder: 1; each in a folder named after its OUT), then one logs
# tar per run while they fit; the last 70 lines of each run's output (its final metrics, train figures included)
# are printed. Each suite: 1 JSON (+ the gif of the first seed).
# Paths: the VAE is read from data/keep/vae.safetensors; a checkpoint to start from travels as data/init (carry it
# alone). Keep them under data/: paths ignored by the repo's .gitignore stay on the machine between calls, paths
# ignored only through .git/info/exclude were removed there.
# Size: the whole working tree travels (64 MiB a call, carried paths included), so before the calls move the
# tracked DiT and VAE weights (talkstream/weights/{teacher,causal,vae}*, ~120 MB) and docs/samples out of the tree
# (keep the probes and the tiny decoder: ~7 MB of tree is left); a pack of 1,700 clips x 3 s (~57 MB) then fits
# beside it, 1,850 did not.
set -uo pipefail
mode=$1; shift
if [ "$mode" != setup ] && { [ ! -f data/dit_pack.npz ] || [ ! -f /tmp/site/.ready ]; }; then
  echo "fresh machine: run 'setup' (carrying data .whl .carry) first"; exit 3
fi
source "$(dirname "$0")/device_env.sh"

hand_back() {  # the runs' checkpoints to $OUT, one folder per run (two VAEs' shards share names), while 8 files last
  for out in "$@"; do
    files=("$out"/*.safetensors*)
    if [ -f "${files[0]}" ] && [ $((n + ${#files[@]})) -le 8 ]; then
      mkdir -p "$OUT/$(basename "$out")" && cp "${files[@]}" "$OUT/$(basename "$out")"/; n=$((n + ${#files[@]}))
    else echo "$out: checkpoint not handed back (stays in $out on this machine)"; fi
  done
}

case $mode in
setup)
  device_install && echo "renderer ok"
  ls -la data data/keep
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader ;;
latents)
  python3 - "$1" <<'PY'
import sys, time
from talkstream.train.config import TrainConfig
from talkstream.train.data import load_pack
from talkstream.train.stages import LatentBank
from talkstream.train.runner import fast_kernels
from talkstream.models.checkpoint import load_checkpoint
fast_kernels()
cfg = TrainConfig.load("configs/teacher.yaml", dict(data=sys.argv[1], latent_cache="data/latents", workers=16))
vae = load_checkpoint("data/keep/vae.safetensors", device="cuda").requires_grad_(False)
t0, pack = time.perf_counter(), load_pack(cfg.data)
bank = LatentBank(cfg, vae, "cuda", slice(None), pack)
print(f"{bank.n} clips cached, {time.perf_counter() - t0:.0f} s", flush=True)
PY
  ls -la data/latents | tail -3; du -sh data/latents ;;
train)
  # several runs side by side: separate them with '--'; on a machine of several GPUs run k takes GPU k mod N
  pids=() outs=() ngpu=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$ngpu" -ge 1 ] || ngpu=1
  while [ $# -ge 2 ]; do
    config=$1 out=$2; shift 2
    stage=$(sed -n 's/^stage: *//p' "configs/$config.yaml")
    mkdir -p "$(dirname "$out")"
    sets=(--set "out=$out" --set vae=data/keep/vae.safetensors)
    while [ $# -gt 0 ] && [ "$1" != -- ]; do sets+=(--set "$1"); shift; done
    [ $# -gt 0 ] && shift
    CUDA_VISIBLE_DEVICES=$(( ${#pids[@]} % ngpu )) \
      python3 -m talkstream.cli train "$stage" --config "configs/$config.yaml" "${sets[@]}" > "$out.txt" 2>&1 &
    pids+=($!) outs+=("$out")
  done
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}"; rc=$?; out=${outs[$k]}
    echo "$out exit $rc"
    tr '\r' '\n' < "$out.txt" | grep -v "it/s\]$\|s/it\]$" | tail -70 > "$out.tail"
    cat "$out.tail"  # (ends with the stage's metrics)
    tar -cf "$out.logs.tar" "$out.tail" "$out"/log.jsonl "$out"/metrics.json "$out"/loss.png 2>/dev/null
  done
  n=0; hand_back "${outs[@]}"  # checkpoints first (in the order of the runs), then logs, while the 8 files last
  for out in "${outs[@]}"; do
    [ $n -lt 8 ] && [ -f "$out.logs.tar" ] && cp "$out.logs.tar" "$OUT/$(basename "$out")_logs.tar" && n=$((n + 1))
  done
  ls -laR "$OUT" ;;
fetch)
  n=0; hand_back "$@"; ls -laR "$OUT" ;;
suite)
  while [ $# -ge 3 ]; do
    model=$1 steps=$2 name=$3; shift 3
    mkdir -p runs
    first=1
    for seed in ${SEEDS:-0}; do
      tag=$name; [ "${SEEDS:-0}" != 0 ] && tag=${name}_s$seed
      sample=(); [ $first = 1 ] && sample=(--sample "$OUT/sample_$name.gif"); first=0
      python3 -m talkstream.cli eval suite --model "$model" --vae "${VAE:-data/keep/vae.safetensors}" --steps "$steps" \
        --audio-guidance "${CFG:-2}" ${SHIFT:+--timestep-shift "$SHIFT"} --clips 4 --noise-seed "$seed" --inputs data/suite_inputs.pkl --device cuda --out "$OUT/suite_$tag.json" \
        "${sample[@]}" > "runs/suite_$tag.txt" 2>&1
      echo "$tag exit $?"; tail -n 8 "runs/suite_$tag.txt"
    done
  done ;;
esac
