#!/usr/bin/env bash
# One node of a multi-host tensor-parallel ds_spd run (torchrun's static rendezvous). Run it on every host:
#   launch/node.sh NNODES NODE_RANK MASTER_ADDR NPROC_PER_NODE COMMAND [ARGS...]
#   host0$ launch/node.sh 2 0 10.0.0.1 1 eval --tp 2 --config configs/spd_smollm2_tp2.json --json
#   host1$ launch/node.sh 2 1 10.0.0.1 1 eval --tp 2 --config configs/spd_smollm2_tp2.json --json
# MASTER_PORT (default 29500) must be free on MASTER_ADDR. Across hosts every all-reduce goes over gloo on CPU
# (ds_spd switches DeepSpeed's single-host shared-memory kernel off) and NCCL on CUDA.
# Works without the venv on PATH (it uses the repo's .venv, or DS_SPD_PYTHON).
set -euo pipefail
usage="usage: launch/node.sh NNODES NODE_RANK MASTER_ADDR NPROC_PER_NODE COMMAND [ARGS...]"
nnodes=${1:?$usage}; node_rank=${2:?$usage}; master=${3:?$usage}; nproc=${4:?$usage}; shift 4
# shellcheck source=launch/_env.sh
source "$(dirname "$0")/_env.sh"
exec "$py" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
  --master_addr "$master" --master_port "${MASTER_PORT:-29500}" -m ds_spd "$@"
