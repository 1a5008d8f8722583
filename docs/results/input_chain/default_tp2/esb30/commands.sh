# The commands that produced this directory's files (run from the repository root, in this order; resumable: a step
# whose JSON exists is not run again): the default's 30-block run and its evaluations, then each candidate on a copy
# of its work dir (docs/experiments.md, "The decision run" and "1024 x 8 for blocks 0 and 1 only"). Each step is
# scripts/benchmarks/steps.sh's: the command with --json, its last JSON line in NAME.json, its stderr in logs/NAME.log.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
out=docs/results/input_chain/default_tp2/esb30; d=docs/results/input_chain/default_tp2
plan=docs/results/readme_path/default_tp2/cumulative_scan/plan30.json; base=runs/esb30/default30
mkdir -p runs/esb30 "$out/logs"
STEP_PREFIX=""; source scripts/benchmarks/steps.sh
distill() {  # NAME ARGS...: distill on 2 ranks, the 30-block plan
  local name=$1; shift
  step "distill_$name" nice -n 10 launch/tp.sh 2 distill --model default --plan $plan "$@"
}

# the default's 30-block run; blocks 0 and 1 back in TP form on the same checkpoint
distill default30 --out $base
rest=$(seq -s, 2 29)
eval_step confirm_all $d/confirmation.txt --checkpoint $base
eval_step confirm_without01 $d/confirmation.txt --checkpoint $base --spd-blocks $rest
eval_step guard_tp $d/guard.txt --spd-blocks none
eval_step guard_all $d/guard.txt --checkpoint $base
eval_step guard_without01 $d/guard.txt --checkpoint $base --spd-blocks $rest

# --esb-segments N on every ESB block (0, 1, 16): the default's work dir copied, its fingerprint given the setting and
# the ESB blocks' files removed (with original inputs the other blocks do not depend on it: tested bitwise); block 16
# was first left in, and the run refused it as another run's, as it should
candidate() {  # NAME SEGMENTS KL_NAME
  local ck=runs/esb30/$1
  if [[ ! -d $ck.work ]]; then
    cp -r $base.work $ck.work.tmp
    rm -f $ck.work.tmp/block000.* $ck.work.tmp/block001.* $ck.work.tmp/block016.*
    python - $ck.work.tmp/ds_spd_run.json "$2" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
run["fingerprint"]["settings"]["esb_segments"] = int(sys.argv[2])
json.dump(run, open(sys.argv[1], "w"))
PY
    mv $ck.work.tmp $ck.work
  fi
  distill "$1" --esb-segments "$2" --out $ck --work-dir $ck.work
  eval_step "guard_$1" $d/guard.txt --checkpoint $ck
  eval_step "confirm_$1" $d/confirmation.txt --checkpoint $ck
  kl_step "$3" $d/guard.txt $base,$ck
}
candidate esb1024 1024 kl_guard
candidate esb512 512 kl_guard_esb512

# 1024 x 8 for blocks 0 and 1 only (composed): the default's work dir with blocks 0 and 1 from the 1024 x 8 run
# (their "segments" key dropped from the resume key: without the option the run looks them up under the main walk's
# key), then the default's distill command: every block is found finished, so it runs the lookups and the stage
ck=runs/esb30/esb1024_01
if [[ ! -d $ck.work ]]; then
  rm -rf $ck.work.tmp && cp -r $base.work $ck.work.tmp
  for i in 000 001; do
    cp runs/esb30/esb1024.work/block$i.safetensors $ck.work.tmp/
    python - runs/esb30/esb1024.work/block$i.json $ck.work.tmp/block$i.json <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
del info["client"]["segments"]
json.dump(info, open(sys.argv[2], "w"))
PY
  done
  mv $ck.work.tmp $ck.work
fi
distill esb1024_01 --out $ck --work-dir $ck.work
eval_step guard_esb1024_01 $d/guard.txt --checkpoint $ck
eval_step confirm_esb1024_01 $d/confirmation.txt --checkpoint $ck
kl_step kl_guard_esb1024_01 $d/guard.txt $base,$ck
echo done
