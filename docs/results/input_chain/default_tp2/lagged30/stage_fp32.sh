# A diagnostic after the 30-block run (docs/experiments.md, "Where the 30-block loss comes from"): the same lagged
# blocks (runs/lag30/ck.work, the patch's run), the end-to-end stage alone again in fp32, then the out-of-domain text.
# The copied work dir predates distill.lag: its fingerprint is given "lag": false (what the patch's run had) by hand.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
d=docs/results/input_chain/default_tp2; out=$d/lagged30
mkdir -p runs/lag30_fp32 && cp -r runs/lag30/ck.work runs/lag30_fp32/ck.work
python3 -c "import json, sys; p = sys.argv[1]; r = json.load(open(p)); r['fingerprint']['settings']['lag'] = False
json.dump(r, open(p, 'w'), indent=1)" runs/lag30_fp32/ck.work/ds_spd_run.json
export PYTHONPATH="$PWD/scripts/experiments/lagged_attention" DS_SPD_LAG=1 OMP_NUM_THREADS=1
launch/tp.sh 2 distill --model default --plan docs/results/readme_path/default_tp2/plan30.json \
  --out runs/lag30_fp32/ck --kl-dtype float32 2> >(tr '\r' '\n' | grep 'distill: end-to-end' > "$out/logs/stage_fp32.log")
OMP_NUM_THREADS=2 .venv/bin/python -m ds_spd eval --model default --virtual-tp 2 --checkpoint runs/lag30_fp32/ck \
  --text "$d/second_half.txt" --max-samples 32 --json | tail -1 > "$out/second_half_lag_stage_fp32.json"
