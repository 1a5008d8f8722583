#!/usr/bin/env bash
# Tensor-parallel ds_spd on N ranks with the deepspeed launcher (CPU ranks here, GPUs where present).
#   launch/tp.sh 2 eval --config configs/spd_smollm2_tp2.json --json
#   launch/tp.sh 2 generate --prompt "Tensor parallelism is"
# Extra launcher flags go in DS_LAUNCH_ARGS (e.g. "--hostfile hosts --master_addr node0" for several nodes).
# Works without the venv on PATH (it uses the repo's .venv, or DS_SPD_PYTHON).
set -euo pipefail
n=${1:?usage: launch/tp.sh N COMMAND [ARGS...]}; shift
# shellcheck source=launch/_env.sh
source "$(dirname "$0")/_env.sh"
# One OpenMP thread per rank (set in _env.sh): with more, DeepSpeed's CPU shared-memory all-reduce slowed ~1000x here.
# shellcheck disable=SC2086
exec "$py" -m deepspeed.launcher.runner --num_gpus "$n" ${DS_LAUNCH_ARGS:-} --module ds_spd "$@"
