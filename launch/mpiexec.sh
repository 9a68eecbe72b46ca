#!/usr/bin/env bash
# MPI's launcher, no torchrun: ranks, world size and the rendezvous address come from MPI.
#   NPROCS=2 launch/mpiexec.sh configs/smoke.yaml
#   NPROCS=16 HOSTS=node0:8,node1:8 launch/mpiexec.sh configs/sagan_imagenet128.yaml
# HOSTS is MPICH/Hydra's -hosts list (host:processes,...); MPIEXEC_ARGS adds anything else, e.g. -bind-to core.
# Arguments are those of `sagan train`. Needs mpiexec (the mpich wheel's, in the venv) and sagan on PATH.
set -euo pipefail
: "${NPROCS:?set NPROCS to the total number of processes}"
args=(-n "$NPROCS")
[[ -n "${HOSTS:-}" ]] && args+=(-hosts "$HOSTS")
# shellcheck disable=SC2206  # MPIEXEC_ARGS is a list of words on purpose
[[ -n "${MPIEXEC_ARGS:-}" ]] && args+=($MPIEXEC_ARGS)
exec mpiexec "${args[@]}" sagan train "$@"
