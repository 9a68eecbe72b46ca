#!/usr/bin/env bash
# `make gpu-wheels`: the wheels the GPU machine's image lacks (never torch), for Python 3.12 on x86-64,
# at the versions this checkout's venv runs, into gpu-wheels/ (ignored; carried to the device machine,
# where benchmarks/gpu_check.sh installs them). That image has torch, torchvision, Triton, NCCL,
# numpy, scipy, scikit-learn, pyarrow, pillow, pyyaml, tqdm, prometheus-client, psutil and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${GPU_WHEELS:-gpu-wheels}
rm -rf "$OUT" && mkdir -p "$OUT"
pinned() { "$PY" -c 'import sys; from importlib.metadata import version; print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' "$@"; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# shellcheck disable=SC2046
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT" $(pinned webdataset braceexpand boto3 botocore s3transfer jmespath \
  pydantic pydantic-core annotated-types typing-inspection hjson)
# DeepSpeed is published as a source distribution only: built here into a pure-Python wheel (its C++/CUDA
# ops compile on first use there, as they do here).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$(pinned deepspeed)"
ls -l "$OUT"
du -sh "$OUT"
