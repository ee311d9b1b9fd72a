#!/usr/bin/env bash
# One self-contained device call that trains from what an earlier call on the same machine left there.
# The pack, the renderer wheel and the VAE (carried once: `setup`) stay there between calls, so a later call can
# carry a 49 MiB DiT checkpoint instead (64 MiB travel per call). Each call hands back what it made, so a machine
# lost between calls costs only what that call had not yet returned.
#
#   bash tools/device/device_round.sh setup      (carry data/keep data/suite_inputs.pkl .whl .carry, + data/dit_pack.npz to train):
#                                           install the wheel there
#   bash tools/device/device_round.sh train CONFIG OUT [KEY=VAL ...] [-- CONFIG OUT [KEY=VAL ...]]   train into OUT (runs
#                                           separated by '--' share the GPU, or take one each on a machine of
#                                           several); checkpoints, then logs, to $OUT
#   (GPU=k: the first run takes GPU k, so runs started by separate calls take separate GPUs; NPROC=n: each run is a
#   torchrun of n ranks, DDP, on GPUs k .. k+n-1: every rank draws its own batch of `batch`, gradients averaged)
#   bash tools/device/device_round.sh start CONFIG OUT ...   the same runs, detached: the call returns after START_WAIT s (60)
#                                           while they train on (keep calling within the idle release; give them
#                                           a time_budget that ends them while the machine is still held)
#   bash tools/device/device_round.sh wait SECONDS OUT [OUT ...]   wait up to SECONDS for started runs; once all have
#                                           ended, print and hand them back as train does
#   bash tools/device/device_round.sh latents PACKS   render and VAE-encode the packs' clips (comma-separated packs)
#                                           into the latent cache data/latents, one file per clip (train with
#                                           data=ANY,PACKS latent_cache=data/latents: cached clips are read back)
#   bash tools/device/device_round.sh latents_bg PACK   the same, detached (GPU=k: on GPU k), so one call carries a pack and
#                                           returns at once while it encodes: a call per pack, the next pack travelling
#                                           while the last one encodes (e.g. two GPUs)
#   bash tools/device/device_round.sh latents_wait SECONDS   wait up to SECONDS for every latents_bg to end; print them
#   bash tools/device/device_round.sh py SCRIPT [ARGS ...]   run a repo script (python3 SCRIPT ARGS) with the renderer and
#                                           the package importable (a bare `python3 experiments/X.py` there finds neither)
#   bash tools/device/device_round.sh fetch OUT [OUT ...]   hand back checkpoints an earlier call trained but could not
#                                           return (a third DiT beside two)
#   bash tools/device/device_round.sh export OUT [OUT ...]   DiT runs stopped before their end (killed, e.g. when their
#                                           budgets outlast the machine): each one's last state.pt
#                                           (every ckpt_every steps) as its checkpoint, handed back as fetch does
#   (a run's time_budget counts from the stage's start: latents, the lip reader's fit and compiling come out of it;
#   they can take ~6 minutes)
#   bash tools/device/device_round.sh vae_suite VAE NAME [VAE NAME ...]   the suite on VAE round trips of the true renders
#                                           (the mouth error any DiT in that latent space can reach at best)
#   bash tools/device/device_round.sh suite MODEL STEPS NAME [MODEL STEPS NAME ...]   held-out suites; JSON + gif to $OUT
#                                           (SEEDS="0 1": one suite per noise seed; VAE=path: another VAE;
#                                           CFG=2: the audio guidance scale; SHIFT=1: the sampling schedule's
#                                           shift, default the samplers' 3; REFINIT=0.9: start each window /
#                                           chunk from the reference noised to sigma 0.9, default: the samplers'
#                                           own, teacher 0.8, causal 0.9; START_FROM=previous: the causal model's
#                                           later chunks start from the last latent instead of the reference;
#                                           CAPTIONS=first_spoken: one caption for the whole clip (the older
#                                           prompt); default the clip's caption timeline; CLIPS=196,588,...
#                                           CLIP_SECONDS=3 INPUTS=data/suite_inputs_3s.pkl: other world clips, e.g.
#                                           training clips beside held-out ones of the same length; SAMPLE=0:
#                                           no GIF)
# At most 8 files of 16 MiB, 64 MiB together, come back from a call: train / wait / fetch hand back each shard of
# 8 MiB or more as a file (a DiT: 3, the VAE: 1; in a folder named after its OUT) while 7 files and 48 MiB last,
# and all that is smaller (the DiT's last shard, indexes, the tiny decoder, each run's logs tar) in one small.tar
# (here: `tar -xf small.tar -C DIR`): one DiT (~45 MiB of large shards) comes back a call, a second one's large
# shards stay on the machine for `fetch` in the next call (the 64 MiB total would drop a second DiT's shards);
# its logs come back at once.
# The last 70 lines of each run's output (its final metrics, train figures included) are printed. Each suite: 1 JSON (+ the gif of the first seed).
# Keep each call inside its time limit and make the next one at once: a machine left idle past its release (30 s),
# or one whose 30 minutes are up, takes what was not handed back with it (a run's checkpoint left for the next
# call is lost that way).
# Paths: the VAE is read from data/keep/vae.safetensors; a checkpoint to start from travels as data/init (carry it
# alone). Keep them under data/: paths ignored by the repo's .gitignore stay on the machine between calls, paths
# ignored only through .git/info/exclude were removed there.
# Size: the whole working tree travels (64 MiB a call, carried paths included), so before the calls move the
# tracked DiT and VAE weights (talkstream/weights/{teacher,causal,vae}*, ~120 MB) and docs/samples out of the tree
# (keep the probes and the tiny decoder: ~7 MB of tree is left); a pack of 1,700 clips x 3 s (~57 MB) then fits
# beside it, 1,850 did not.
set -uo pipefail
mode=$1; shift
if [ "$mode" != setup ] && [ ! -f /tmp/site/.ready ]; then
  echo "fresh machine: run 'setup' (carrying .whl .carry data/keep, and what the mode reads) first"; exit 3
fi
case $mode in latents|latents_bg|train|start)  # the suites need only data/keep and data/suite_inputs.pkl
  [ -f data/dit_pack.npz ] || { echo "no training pack here: carry data/dit_pack.npz (setup) first"; exit 3; } ;;
esac
source "$(dirname "$0")/device_env.sh"

hand_back() {  # OUT...: the runs' checkpoints and logs to $OUT within a call's limits (8 files, 64 MiB together):
  # each shard of 8 MiB or more as a file (a folder per run: two VAEs' shards share names) while 7 files and 48 MiB
  # last, everything smaller (last shards, indexes, tiny decoders, logs tars) in one small.tar
  local out n=0 bytes=0 small=/tmp/hand_back
  rm -rf "$small"; mkdir -p "$small"
  for out in "$@"; do
    local name big=() rest=() size=0
    name=$(basename "$out")
    mapfile -t big < <(find "$out" -maxdepth 1 -name '*.safetensors*' -size +8M 2>/dev/null)
    mapfile -t rest < <(find "$out" -maxdepth 1 -name '*.safetensors*' ! -size +8M 2>/dev/null)
    [ ${#big[@]} -eq 0 ] || size=$(stat -c %s "${big[@]}" | awk '{s += $1} END {print s}')
    if [ $((${#big[@]} + ${#rest[@]})) -eq 0 ]; then echo "$out: no checkpoint"
    elif [ $((n + ${#big[@]})) -le 7 ] && [ $((bytes + size)) -le $((48 * 1024 * 1024)) ]; then
      mkdir -p "$OUT/$name" "$small/$name"
      [ ${#big[@]} -eq 0 ] || cp "${big[@]}" "$OUT/$name"/
      [ ${#rest[@]} -eq 0 ] || cp "${rest[@]}" "$small/$name"/
      n=$((n + ${#big[@]})) bytes=$((bytes + size))
    else echo "$out: checkpoint not handed back (stays in $out on this machine; fetch it in the next call)"; fi
    [ -f "$out.logs.tar" ] && cp "$out.logs.tar" "$small/${name}_logs.tar"
  done
  local tarname=small.tar i=2  # a second hand-back in one call must not overwrite the first one's
  while [ -e "$OUT/$tarname" ]; do tarname=small_$i.tar; i=$((i + 1)); done
  tar -cf "$OUT/$tarname" -C "$small" . && echo "$tarname: $(du -h "$OUT/$tarname" | cut -f1) (tar -xf $tarname)"
}

progress() {  # the last lines of a run's output, progress bars cut to their latest state
  tr '\r' '\n' < "$1.txt" 2>/dev/null | grep -v "^\s*$" | tail -n "${2:-3}"
}

finish() {  # SECONDS OUT...: wait for the runs' exit codes, then print their ends and hand back checkpoints + logs
  local deadline=$((SECONDS + $1)) out; shift
  for out in "$@"; do
    while [ ! -f "$out.rc" ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
  done
  for out in "$@"; do
    if [ ! -f "$out.rc" ]; then echo "== $out still training"; progress "$out"; fi
  done
  for out in "$@"; do [ -f "$out.rc" ] || return 0; done
  for out in "$@"; do
    echo "$out exit $(cat "$out.rc")"
    tr '\r' '\n' < "$out.txt" | grep -v "it/s\]$\|s/it\]$" | tail -70 > "$out.tail"
    cat "$out.tail"  # (ends with the stage's metrics)
    tar -cf "$out.logs.tar" "$out.tail" "$out"/log.jsonl "$out"/metrics.json "$out"/loss.png 2>/dev/null
  done
  hand_back "$@"  # checkpoints in the order of the runs while the 8 files last, logs in small.tar
  ls -laR "$OUT"
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
latents_bg)
  mkdir -p runs; name=runs/latents_$(basename "$1" .npz); rm -f "$name.rc"
  CUDA_VISIBLE_DEVICES=${GPU:-0} setsid bash -c 'bash "$0" latents "$1" > "$2.txt" 2>&1; echo $? > "$2.rc"' \
    "$0" "$1" "$name" < /dev/null &
  sleep 3; echo "$name started on GPU ${GPU:-0}"; tail -n 2 "$name.txt" ;;
latents_wait)
  deadline=$((SECONDS + $1))
  while ls runs/latents_*.txt > /dev/null 2>&1; do
    left=0; for t in runs/latents_*.txt; do [ -f "${t%.txt}.rc" ] || left=1; done
    [ $left = 0 ] || [ $SECONDS -ge $deadline ] && break; sleep 5
  done
  for t in runs/latents_*.txt; do echo "== $t exit $(cat "${t%.txt}.rc" 2>/dev/null || echo running)"; progress "${t%.txt}" 2; done ;;
train|start)
  # several runs side by side: separate them with '--'; on a machine of several GPUs run k takes GPU k mod N.
  # Each run is its own process session (setsid), so `start` can return while it trains on: the machine keeps it
  # running between calls (make the next call within the idle release), and `wait` finishes it.
  outs=() ngpu=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$ngpu" -ge 1 ] || ngpu=1
  nproc=${NPROC:-1} launch=(python3)  # NPROC=n: each run is a torchrun of n ranks (DDP) on n GPUs of its own
  [ "$nproc" -gt 1 ] && launch=(python3 -m torch.distributed.run --standalone "--nproc_per_node=$nproc")
  while [ $# -ge 2 ]; do
    config=$1 out=$2; shift 2
    stage=$(sed -n 's/^stage: *//p' "configs/$config.yaml")
    mkdir -p "$(dirname "$out")"; rm -f "$out.rc"
    sets=(--set "out=$out" --set vae=data/keep/vae.safetensors)
    while [ $# -gt 0 ] && [ "$1" != -- ]; do sets+=(--set "$1"); shift; done
    [ $# -gt 0 ] && shift
    first=$(( (${GPU:-0} + ${#outs[@]} * nproc) % ngpu ))
    if [ $((first + nproc)) -gt "$ngpu" ]; then echo "$out: $nproc GPUs from GPU $first: this machine has $ngpu"; exit 2; fi
    LAUNCH="${launch[*]}" CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + nproc - 1))) setsid bash -c \
      '$LAUNCH -m talkstream.cli train "$0" "${@:2}" > "$1.txt" 2>&1; echo $? > "$1.rc"' \
      "$stage" "$out" --config "configs/$config.yaml" "${sets[@]}" < /dev/null &
    outs+=("$out")
  done
  if [ "$mode" = start ]; then sleep "${START_WAIT:-60}"; for out in "${outs[@]}"; do echo "== $out"; progress "$out"; done; exit 0; fi
  finish 100000 "${outs[@]}" ;;
wait)  # wait SECONDS OUT...: wait for runs `start` began; when all have ended, hand them back as train does
  finish "$@" ;;
fetch)
  hand_back "$@"; ls -laR "$OUT" ;;
export)  # runs stopped before they exported (killed, or out of time): their last state.pt as checkpoints, handed back
  for out in "$@"; do python3 -m talkstream.cli train export --run "$out"; done
  hand_back "$@"; ls -laR "$OUT" ;;
py)
  python3 "$@" ;;
vae_suite)
  while [ $# -ge 2 ]; do
    mkdir -p runs
    python3 experiments/vae_roundtrip_suite.py --vae "$1" --clips 4 --inputs data/suite_inputs.pkl --device cuda \
      --out "$OUT/suite_vae_roundtrip_$2.json" > "runs/vae_suite_$2.txt" 2>&1
    echo "$2 exit $?"; tail -n 16 "runs/vae_suite_$2.txt"; shift 2
  done ;;
suite)
  while [ $# -ge 3 ]; do
    model=$1 steps=$2 name=$3; shift 3
    mkdir -p runs
    first=1
    for seed in ${SEEDS:-0}; do
      tag=$name; [ "${SEEDS:-0}" != 0 ] && tag=${name}_s$seed
      sample=(); [ $first = 1 ] && [ "${SAMPLE:-1}" = 1 ] && sample=(--sample "$OUT/sample_$tag.gif"); first=0
      python3 -m talkstream.cli eval suite --model "$model" --vae "${VAE:-data/keep/vae.safetensors}" --steps "$steps" \
        --audio-guidance "${CFG:-2}" ${SHIFT:+--timestep-shift "$SHIFT"} ${REFINIT:+--reference-init "$REFINIT"} ${START_FROM:+--start-from "$START_FROM"} ${CAPTIONS:+--captions "$CAPTIONS"} --clips 4 ${CLIPS:+--seeds ${CLIPS//,/ } --seconds "${CLIP_SECONDS:-8}"} --noise-seed "$seed" --inputs "${INPUTS:-data/suite_inputs.pkl}" --device cuda --out "$OUT/suite_$tag.json" \
        "${sample[@]}" > "runs/suite_$tag.txt" 2>&1
      echo "$tag exit $?"; tail -n 8 "runs/suite_$tag.txt"
    done
  done ;;
esac
