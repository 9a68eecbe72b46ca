#!/usr/bin/env bash
# Several machines, elastic: run the same command on every node. The job starts once MIN nodes have
# joined and admits up to MAX; when a node leaves or joins, torchrun restarts every worker and the run
# resumes from its newest checkpoint on the new world size.
#   NNODES=2:4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.example.org:29400 RDZV_ID=sagan-run1 \
#     launch/torchrun_multi_node.sh configs/sagan_imagenet128.yaml
# RDZV_ENDPOINT is host:port of any one node (its c10d store); RDZV_ID names the job (the same on all
# nodes). Arguments are those of `sagan train`. Needs torchrun and sagan on PATH.
# In a Kubeflow PyTorchJob with an elasticPolicy the training-operator sets torchrun's own variables
# (PET_NNODES, PET_RDZV_ENDPOINT, PET_RDZV_ID, PET_NPROC_PER_NODE, PET_MAX_RESTARTS); they stand in for the
# ones above, so the same script is the pods' entry point (k8s/base/pytorchjob.yaml).
set -euo pipefail
NNODES=${NNODES:-${PET_NNODES:-}}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:-}}
RDZV_ID=${RDZV_ID:-${PET_RDZV_ID:-}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-}}
MAX_RESTARTS=${MAX_RESTARTS:-${PET_MAX_RESTARTS:-3}}
: "${NNODES:?set NNODES, e.g. 2 or 2:4 (MIN:MAX)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to host:port of one node, e.g. node0:29400}"
: "${RDZV_ID:?set RDZV_ID to a name for this job, the same on every node}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
# Restarted workers must not share the agent's rendezvous store: with it they meet the previous round's
# addresses and gloo/NCCL fail to connect (pytorch/pytorch#135712, still so in torch 2.13).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec torchrun \
  --nnodes="$NNODES" \
  --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$RDZV_ENDPOINT" \
  --rdzv_id="$RDZV_ID" \
  --max_restarts="$MAX_RESTARTS" \
  --no-python sagan train "$@"
