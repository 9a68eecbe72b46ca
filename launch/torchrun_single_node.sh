#!/usr/bin/env bash
# One machine, N processes (one per GPU by default; on a CPU-only machine say how many):
#   NPROC_PER_NODE=2 launch/torchrun_single_node.sh configs/default.yaml trainer.max_steps=100
# Elastic: a worker that fails restarts every worker from the last checkpoint, MAX_RESTARTS times
# (default 3; 0: the first failure ends the job).
# Arguments are those of `sagan train`. Needs torchrun and sagan on PATH (activate the venv).
set -euo pipefail
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
exec torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" --max-restarts="${MAX_RESTARTS:-3}" \
  --no-python sagan train "$@"
