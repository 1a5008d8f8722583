#!/usr/bin/env bash
# Tensor-parallel ds_spd on N ranks with the deepspeed launcher (CPU ranks here, GPUs where present).
#   launch/tp.sh 2 eval --config configs/spd_smollm2_tp2.json --json
#   launch/tp.sh 2 generate --prompt "Tensor parallelism is"
# Extra launcher flags go in DS_LAUNCH_ARGS (e.g. "--hostfile hosts --master_addr node0" for several nodes).
# Works without the venv on PATH (it uses the repo's .venv, or DS_SPD_PYTHON).
# A supervisor (ds_spd.launch) stays in front of the deepspeed runner: a free master port unless
# DS_LAUNCH_ARGS names one; SIGTERM / Ctrl-C to this process reach every rank once (a server drains);
# the exit status is the launch's (0 after a clean stop).
set -euo pipefail
n=${1:?usage: launch/tp.sh N COMMAND [ARGS...]}; shift
# shellcheck source=launch/_env.sh
source "$(dirname "$0")/_env.sh"
# One OpenMP thread per rank (set in _env.sh): with more, DeepSpeed's CPU shared-memory all-reduce slowed ~1000x here.
exec "$py" -m ds_spd.launch "$n" "$@"
