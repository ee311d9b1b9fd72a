# Sourced on the GPU machine after `serve_load_gpu.sh install`: the carried server packages (/tmp/site), the renderer's
# GL libraries (.carry/lib) and espeak-ng with its own libraries and data (/tmp/espeak; its libraries only for it).
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
export PATH=/tmp/espeak/wrap:$PATH ESPEAK_DATA_PATH=/tmp/espeak  # (the wrapper gives espeak-ng its own libraries)
