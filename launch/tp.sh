#!/usr/bin/env bash
# Tensor-parallel ds_spd on N ranks with the deepspeed launcher (CPU ranks here, GPUs where present).
#   launch/tp.sh 2 eval --config configs/spd_smollm2_tp2.json --json
#   launch/tp.sh 2 generate --prompt "Tensor parallelism is"
# Extra launcher flags go in DS_LAUNCH_ARGS (e.g. "--hostfile hosts --master_addr node0" for several nodes).
set -euo pipefail
n=${1:?usage: launch/tp.sh N COMMAND [ARGS...]}; shift
# One OpenMP thread per rank: with more, DeepSpeed's CPU shared-memory all-reduce slowed ~1000x here.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# shellcheck disable=SC2086
exec deepspeed --num_gpus "$n" ${DS_LAUNCH_ARGS:-} --module ds_spd "$@"
