# The command that produced lag_decode_cost.json (run from the repository root, nothing else running; the 2-core
# AMD EPYC with AVX-512): the README path's 21-block plan distilled with the lag (runs/lag21/ck: the experiment
# patch's run, its plan marked "lag": true; the implementation evaluates it bitwise as the patch did), one decode
# stream on 2 real ranks, TP / SPD / SPD with the lag on the same weights.
cd "$(dirname "$0")/../../.."
OMP_NUM_THREADS=1 .venv/bin/deepspeed --num_gpus 2 scripts/benchmarks/lag_decode_cost.py \
  --checkpoint runs/lag21/ck --out docs/results/lag_decode_cost
