#!/usr/bin/env bash
# SLURM: submit with `sbatch launch/slurm_sbatch.sh configs/sagan_imagenet128.yaml [key=value ...]`.
# One task per GPU; srun starts them and `sagan train` takes rank, local rank and world size from SLURM
# (through MPI when srun provides it, e.g. SRUN_MPI=pmix). Edit the #SBATCH lines for your cluster.
#SBATCH --job-name=sagan
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
# Rank 0 runs on the first node; the port is derived from the job id so jobs sharing a node differ.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
srun --kill-on-bad-exit=1 ${SRUN_MPI:+--mpi="$SRUN_MPI"} sagan train "$@"
