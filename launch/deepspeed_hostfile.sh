#!/usr/bin/env bash
# DeepSpeed's launcher over the machines of a hostfile, one line per machine: "<host> slots=<processes>".
#   HOSTFILE=hostfile launch/deepspeed_hostfile.sh configs/default.yaml trainer.zero_stage=2 trainer.precision=bf16
# Run it on the first host; it reaches the others with pdsh over password-less ssh (DS_LAUNCHER=pdsh, the
# default) or through MPI (DS_LAUNCHER=mpich or openmpi). trainer.backend=deepspeed is added after your
# arguments. Needs deepspeed and sagan on PATH on every host.
# One machine through MPICH, no ssh: printf 'localhost slots=2\n' > hostfile;
#   HOSTFILE=hostfile DS_LAUNCHER=mpich MASTER_ADDR=127.0.0.1 launch/deepspeed_hostfile.sh configs/smoke.yaml
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE to a file of lines \"<host> slots=<processes>\"}"
launcher=${DS_LAUNCHER:-pdsh}
args=(--hostfile "$HOSTFILE" --launcher "$launcher" --force_multi)
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${MASTER_PORT:-}" ]] && args+=(--master_port "$MASTER_PORT")
[[ "$launcher" != pdsh ]] && args+=(--no_ssh_check)
exec deepspeed "${args[@]}" "$(command -v sagan)" train "$@" trainer.backend=deepspeed
