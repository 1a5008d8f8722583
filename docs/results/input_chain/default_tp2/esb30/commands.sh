# The commands that produced this directory's files (run from the repository root, in this order): the default's
# 30-block run and its evaluations, then the candidate on a copy of its work dir (docs/experiments.md, "The decision run").

cd "$(dirname "$0")/../../../../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
out=docs/results/input_chain/default_tp2/esb30; ck=runs/esb30/default30; d=docs/results/input_chain/default_tp2
mkdir -p runs/esb30
json() { grep '^{' | tail -1; }
if [[ ! -s $out/distill_default30.json ]]; then
  nice -n 10 launch/tp.sh 2 distill --model default --plan docs/results/readme_path/default_tp2/plan30.json --out $ck --json \
    2> $out/logs/distill_default30.log | json > $out/distill_default30.json.part && mv $out/distill_default30.json.part $out/distill_default30.json
fi
ev() {  # NAME TEXT ARGS...
  local name=$1 text=$2; shift 2
  [[ -s $out/$name.json ]] && return
  OMP_NUM_THREADS=2 nice -n 10 python -m ds_spd eval --model default --virtual-tp 2 "$@" --text "$text" --max-samples 32 --json \
    2> $out/logs/$name.log | json > $out/$name.json.part && mv $out/$name.json.part $out/$name.json
}
rest=$(seq -s, 2 29)
ev confirm_all $d/confirmation.txt --checkpoint $ck
ev confirm_without01 $d/confirmation.txt --checkpoint $ck --spd-blocks $rest
ev guard_tp $d/guard.txt --spd-blocks none
ev guard_all $d/guard.txt --checkpoint $ck
ev guard_without01 $d/guard.txt --checkpoint $ck --spd-blocks $rest
echo done

set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
out=docs/results/input_chain/default_tp2/esb30; d=docs/results/input_chain/default_tp2
base=runs/esb30/default30; ck=runs/esb30/esb1024
json() { grep '^{' | tail -1; }
if [[ ! -d $ck.work ]]; then
  cp -r $base.work $ck.work.tmp
  rm -f $ck.work.tmp/block000.* $ck.work.tmp/block001.* $ck.work.tmp/block016.*   # the plan's ESB blocks (block 16 first left in: the run refused it as another run's, as it should)
  python - $ck.work.tmp/ds_spd_run.json <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
run["fingerprint"]["settings"]["esb_segments"] = 1024
json.dump(run, open(sys.argv[1], "w"))
PY
  mv $ck.work.tmp $ck.work
fi
if [[ ! -s $out/distill_esb1024.json ]]; then
  nice -n 10 launch/tp.sh 2 distill --model default --plan docs/results/readme_path/default_tp2/plan30.json \
    --esb-segments 1024 --out $ck --work-dir $ck.work --json 2> $out/logs/distill_esb1024.log | json > $out/distill_esb1024.json.part
  mv $out/distill_esb1024.json.part $out/distill_esb1024.json
fi
ev() {
  local name=$1 text=$2; shift 2
  [[ -s $out/$name.json ]] && return
  OMP_NUM_THREADS=2 nice -n 10 python -m ds_spd eval --model default --virtual-tp 2 "$@" --text "$text" --max-samples 32 --json \
    2> $out/logs/$name.log | json > $out/$name.json.part && mv $out/$name.json.part $out/$name.json
}
ev guard_esb1024 $d/guard.txt --checkpoint $ck
ev confirm_esb1024 $d/confirmation.txt --checkpoint $ck
[[ -s $out/kl_guard.json ]] || OMP_NUM_THREADS=2 nice -n 10 python scripts/experiments/entropy_check.py --model default \
  --text $d/guard.txt --segments 16 --checkpoints $base,$ck --out $out/kl_guard.json 2> $out/logs/kl_guard.log
echo done
# 512 x 8: the same second part with esb1024 -> esb512, 1024 -> 512 and the KL output kl_guard_esb512.json

# 1024 x 8 for blocks 0 and 1 only (composed: docs/experiments.md, "1024 x 8 for blocks 0 and 1 only"): the default's
# work dir with blocks 0 and 1 from the 1024 x 8 run (their "segments" key dropped from the resume key: without the
# option the run looks them up under the main walk's key), then the same distill command as the default's: every
# block is found finished, so it runs the walk's lookups and the stage.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
out=docs/results/input_chain/default_tp2/esb30; d=docs/results/input_chain/default_tp2
base=runs/esb30/default30; ck=runs/esb30/esb1024_01
json() { grep '^{' | tail -1; }
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
if [[ ! -s $out/distill_esb1024_01.json ]]; then
  nice -n 10 launch/tp.sh 2 distill --model default --plan docs/results/readme_path/default_tp2/plan30.json --out $ck \
    --work-dir $ck.work --json 2> $out/logs/distill_esb1024_01.log | json > $out/distill_esb1024_01.json.part
  mv $out/distill_esb1024_01.json.part $out/distill_esb1024_01.json
fi
ev() {
  local name=$1 text=$2; shift 2
  [[ -s $out/$name.json ]] && return
  OMP_NUM_THREADS=2 nice -n 10 python -m ds_spd eval --model default --virtual-tp 2 "$@" --text "$text" --max-samples 32 --json \
    2> $out/logs/$name.log | json > $out/$name.json.part && mv $out/$name.json.part $out/$name.json
}
ev guard_esb1024_01 $d/guard.txt --checkpoint $ck
ev confirm_esb1024_01 $d/confirmation.txt --checkpoint $ck
[[ -s $out/kl_guard_esb1024_01.json ]] || OMP_NUM_THREADS=2 nice -n 10 python scripts/experiments/entropy_check.py \
  --model default --text $d/guard.txt --segments 16 --checkpoints $base,$ck --out $out/kl_guard_esb1024_01.json \
  2> $out/logs/kl_guard_esb1024_01.log
echo done
