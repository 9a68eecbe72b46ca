#!/usr/bin/env bash
# The device check, on a machine with one NVIDIA GPU (Python 3.12, torch with CUDA, no network), from a
# checkout with gpu-wheels/ beside it (`make gpu-wheels` on a machine that has the network):
#   bash benchmarks/gpu_check.sh            # versions, pytest -m cuda, the 128x128 step table
# It installs the wheels the image lacks into a folder of its own (--no-deps: on the image's torch),
# puts this checkout on PYTHONPATH and runs `python -m benchmarks gpu`. Results land in $OUT (the device
# tool's folder) or runs/gpu-check/: gpu.json, and the log of the whole check.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS:-gpu-wheels}
SITE=${SITE:-/tmp/sagan-site}
RESULTS=${OUT:-runs/gpu-check}
mkdir -p "$RESULTS"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || exit 2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch-extensions}
python3 -m benchmarks gpu --results "$RESULTS" --no-doc "$@" 2>&1 | tee "$RESULTS/gpu-check.log"
exit "${PIPESTATUS[0]}"
