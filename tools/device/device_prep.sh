#!/usr/bin/env bash
# Everything a device round carries that git does not hold, made here from nothing (a fresh checkout after
# `make install`): the renderer's wheel for the GPU machine's Python (.whl), the GL / X libraries it links that
# the machine's image lacks (.carry/lib), the training packs (espeak-ng speech, Whisper and MiniLM features: only
# here) and the suite's inputs, and the shipped VAE / causal model / teacher where device_round.sh reads them
# (data/keep, data/init, data/t0). A fresh checkout has none of these: this script re-makes them all.
#
#   bash tools/device/device_prep.sh [PACK ...]     PACK: a b c d e f (default: a b c d); 1.5-4.5 min each on 2 cores (a-d: 14 min)
set -euo pipefail
cd "$(dirname "$0")/../.."
packs=${*:-a b c d}

# skia-python for the GPU machines' python3 (3.12, manylinux); its other needs are in their image
mkdir -p .whl
ver=$(python3 -c "import importlib.metadata as m; print(m.version('skia-python'))")
ls .whl/skia_python-"$ver"-cp312-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "skia-python==$ver"

# the system libraries skia links (EGL / GL through glvnd, X11's client chain): copied from this machine
so=$(python3 -c "import skia; print(skia.__file__)")
mkdir -p .carry/lib
for lib in libEGL.so.1 libGL.so.1 libGLdispatch.so.0 libGLX.so.0 libX11.so.6 libxcb.so.1 libXau.so.6 libXdmcp.so.6 \
           libbsd.so.0 libmd.so.0 libexpat.so.1; do
  path=$(ldd "$so" | awk -v l="$lib" '$1 == l {print $3}')
  [ -n "$path" ] && cp -L "$path" .carry/lib/"$lib"
done

# packs (fixed names and seeds: a pack made again holds the same clips) and the suite's inputs
declare -A clips=([a]=600 [b]=1500 [c]=1700 [d]=1700 [e]=1700 [f]=1700) seeds=([a]=0 [b]=600 [c]=2100 [d]=3800 [e]=5500 [f]=7200)
mkdir -p data
for p in $packs; do
  f=data/dit_pack_$p.npz; [ "$p" = a ] && f=data/dit_pack.npz
  [ -f "$f" ] || python3 -m talkstream.cli train pack --out "$f" --clips "${clips[$p]}" --seconds 3 --seed "${seeds[$p]}"
done
[ -f data/suite_inputs.pkl ] || python3 -m talkstream.cli eval suite --save-inputs data/suite_inputs.pkl --clips 4

# the shipped weights where the device scripts read them: the VAE (data/keep), the causal model (data/init) and the
# teacher (data/t0), each carried alone to start a run from it
mkdir -p data/keep data/init data/t0
cp talkstream/weights/vae* data/keep/
cp talkstream/weights/causal* data/init/
cp talkstream/weights/teacher* data/t0/
du -sh .whl .carry data/* | sort -h
