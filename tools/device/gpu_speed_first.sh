#!/usr/bin/env bash
# Speed figures that need a GPU to themselves, run by the distillation pipeline before its training
# (`BENCH="bash tools/device/gpu_speed_first.sh" distill_pipeline.sh start`): the LiveTalk layout's stream with the
# deferred commit (TTFF), the conversation's avatar stage (reply audio -> first frame; CONV: its inputs, made here by
# `benchmarks/conversation_avatar.py --make-inputs`), batched against separate sessions at 256 and 512 (serve's
# capacity), the compiled ladder when LADDER is set.
# Results land in runs/distill/ (handed back by `distill_pipeline.sh wait`), named after the GPU.
R=${R:-runs/distill}
g=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | grep -q H200 && echo h200 || echo h100)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 150 python3 benchmarks/livetalk_speed.py --device cuda --compile yes --ttff-repeats 4 \
  --out "$R/livetalk_speed_512_deferred_commit_$g.json"
echo "livetalk_speed exit $?"
# the embedded avatar's shards stay out of a slim tree: the pipeline's unpacked copies stand in (copied only now:
# the causal model's call may still be on its way while the LiveTalk layout, which needs no weights, runs)
for d in data/init data/keep; do cp -n "$d"/*.safetensors* talkstream/weights/ 2>/dev/null; done
CONV=${CONV:-data/carry_init/conv_inputs.npz}
[ -f "$CONV" ] && timeout 60 python3 benchmarks/conversation_avatar.py --inputs "$CONV" --device cuda --speed quality \
  --trials 3 --out "$R/conversation_avatar_256_quality_$g.json"
echo "conversation_avatar exit $?"
# (the GPU machine has no MiniLM package: the calibration's caption comes embedded, serve_gpu.py embed)
timeout 100 python3 tools/device/serve_gpu.py batch "${CAPTIONS:-data/carry_init/captions.pt}" \
  "$R/serve_batch_$g.json"
echo "serve_load exit $?"
[ -n "${LADDER:-}" ] && timeout "$LADDER" python3 benchmarks/gpu_stream_speedups.py --compile \
  --out "$R/stream_gpu_speedups_wan1.3b_compiled_$g.json"  # (LADDER=SECONDS: the compiled ladder too)
