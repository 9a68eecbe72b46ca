#!/usr/bin/env bash
# SLURM: a multi-node `sagan prepare`, one task per node, each with its node's cores as --workers:
#   sbatch launch/slurm_prepare.sh --source imagefolder:/data/imagenet/train --out s3://bucket/imagenet-128 \
#       --image-size 128 --format jpeg --synsets /data/imagenet/LOC_synset_mapping.txt
# Arguments are those of `sagan prepare`. The ranks split the shards; rank 0 commits the manifest.
# Re-submitting the same command after a failure keeps the shards already committed.
#SBATCH --job-name=sagan-prepare
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
srun --kill-on-bad-exit=1 ${SRUN_MPI:+--mpi="$SRUN_MPI"} sagan prepare --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
