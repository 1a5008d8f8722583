#!/usr/bin/env bash
# The same under torchrun (gloo on CPU, NCCL on CUDA); ds_spd sets what DeepSpeed's CPU path needs.
#   launch/torchrun_tp.sh 2 eval --json
# Works without the venv on PATH (it uses the repo's .venv, or DS_SPD_PYTHON).
set -euo pipefail
n=${1:?usage: launch/torchrun_tp.sh N COMMAND [ARGS...]}; shift
# shellcheck source=launch/_env.sh
source "$(dirname "$0")/_env.sh"
exec "$py" -m torch.distributed.run --nproc_per_node "$n" -m ds_spd "$@"
