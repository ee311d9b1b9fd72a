# Sourced by the device scripts (run in the repo root on the GPU machine): the renderer wheel carried in .whl
# is installed into /tmp/site by `device_install`, and these variables let Python find it and its GL libraries.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}

device_install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    python3 -c "import skia, talkstream.world" && touch /tmp/site/.ready
}
