#!/usr/bin/env bash
# The same under torchrun (gloo on CPU, NCCL on CUDA); ds_spd sets what DeepSpeed's CPU path needs.
#   launch/torchrun_tp.sh 2 eval --json
set -euo pipefail
n=${1:?usage: launch/torchrun_tp.sh N COMMAND [ARGS...]}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
exec torchrun --nproc_per_node "$n" -m ds_spd "$@"
