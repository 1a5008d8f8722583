#!/usr/bin/env bash
# Distillation inputs and loss, chosen on validation: the original model's inputs (paper) against the chain as it
# will run (each block trained on the outputs of the trained SPD blocks before it, against the original model's
# outputs), a loss after the next original block (windowN: --loss-window N, original inputs), the calibration
# volume (segNepE: N segments, held-out ones included, for E epochs; original inputs), calibration text the
# model wrote itself (self: scripts/experiments/self_generated_text.py, instead of the shipped corpora), a third
# shipped corpus in the mixture (addC, e.g. adddocstrings; adddocstrings-code adds two), another learning rate
# (lrX), more epochs (epE), the end-to-end KL stage after the blocks (klE: E epochs; kllrX: its rate; klsegN: its
# segments; klcorpC(-D): its corpora, pydoc and Shakespeare with C (and D); klbf16 / klfp32: its dtype; klall: it
# tunes every block, the TP-form ones too; klextralrX: at rate X); knobs
# joined by "+" combine (lr1e-3+ep16, adddocstrings+kl2+kllr1e-4: the KL stage reuses adddocstrings' trained blocks,
# its work dir; SmolLM2's recipe has the stage since its runs here: kl0 is the blocks alone). The
# README path's plans (its default scan, reused from docs/results/readme_path/MODEL_tp2/), 2-rank distill with every
# other default, each checkpoint evaluated on three validation texts (pydoc and Shakespeare validation splits; the
# second half of the pinned packages' descriptions, out of the calibration domain: the README path's test reads
# the first 32 x 256 tokens, inside the first half). The unseen test text is not read here.
#   nice bash scripts/experiments/input_source_chain.sh default 21,30 chain,original,window1
#   nice bash scripts/experiments/input_source_chain.sh gemma3-270m 9,13 chain,original
#   nice bash scripts/experiments/input_source_chain.sh default 21 seg128ep4,seg256ep2
#   nice bash scripts/experiments/input_source_chain.sh default 21 lr1e-3+ep16
#   nice bash scripts/experiments/input_source_chain.sh default 21 adddocstrings+kl2+kllr1e-4
#   nice bash scripts/experiments/input_source_chain.sh default 21 adddocstrings runs/dr/scanned.json distilledkl
# Resumable: a step whose JSON exists is not run again; checkpoints are kept under runs/chain/ (for the test).
{   # parsed whole before it runs: editing the file meanwhile does not change a running experiment
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
model=${1:?usage: input_source_chain.sh MODEL COUNTS SOURCES [SCANNED TAG]}; counts=${2:?COUNTS}
sources=${3:-chain,original}
path=docs/results/readme_path/${model}_tp2; out=docs/results/input_chain/${model}_tp2; ck=runs/chain/${model}_tp2
# SCANNED TAG: choose the blocks from another scanned plan (e.g. a distilled ranking); variants become SOURCE@TAG
scanned=${4:-$path/scanned.json}; ranking=${5:-}
[[ -z ${4:-} || -n $ranking ]] || { echo "SCANNED needs a TAG" >&2; exit 2; }
mkdir -p "$out/logs" "$ck"
STEP_PREFIX=""
source scripts/benchmarks/steps.sh
python -c "import sys; sys.path.insert(0, 'scripts/experiments'); import recovery_recipes as r; r.unseen_text('$path')" >/dev/null
[[ -s "$out/second_half.txt" ]] || python -c "t = open('$path/readmes_pinned.txt').read(); \
i = t.index('\n\n', len(t) // 2); open('$out/second_half.txt', 'w').write(t[i + 2:])"
evals() {  # NAME ARGS...: the three validation texts
  local name=$1; shift
  OMP_NUM_THREADS=2 step "val_pydoc_$name" python -m ds_spd eval --model "$model" --virtual-tp 2 "$@" \
    --dataset pydoc --split validation --max-samples 35
  OMP_NUM_THREADS=2 step "val_shakespeare_$name" python -m ds_spd eval --model "$model" --virtual-tp 2 "$@" \
    --dataset shakespeare --split validation --max-samples 32
  OMP_NUM_THREADS=2 step "val_ood_$name" python -m ds_spd eval --model "$model" --virtual-tp 2 "$@" \
    --text "$out/second_half.txt" --max-samples 32
  # a fourth text where it exists: the confirmation text (the first half's text after the README path's test
  # windows), read by no run before the rule that uses it was written (docs/experiments.md)
  [[ ! -s "$out/confirmation.txt" ]] || OMP_NUM_THREADS=2 step "val_confirm_$name" python -m ds_spd eval \
    --model "$model" --virtual-tp 2 "$@" --text "$out/confirmation.txt" --max-samples 32
}
evals tp --spd-blocks none
for n in ${counts//,/ }; do
  plan=$path/plan$n.json
  if [[ -n $ranking ]]; then plan=$out/plan${n}_$ranking.json; fi
  [[ -s $plan ]] || python -m ds_spd plan --plan "$scanned" --spd-count "$n" --out "$plan" > /dev/null
  for src in ${sources//,/ }; do
    [[ -z $ranking ]] || src=$src@$ranking
    how=(); blocks=()   # blocks: the knobs the trained blocks depend on (the KL stage's do not: shared work dir)
    knobs=${src%@*}
    for part in ${knobs//+/ }; do   # knobs joined by "+" combine: lr1e-3+ep16
      [[ $part == kl* ]] || blocks+=("$part")
      case $part in
        klseg*) how+=(--kl-segments "${part#klseg}");;  # klsegN: the end-to-end stage reads N segments
        klcorp*) c=${part#klcorp}; how+=(--kl-corpora "pydoc+shakespeare+${c//-/+}");;  # klcorpC(-D): its corpora
        kllr*) how+=(--kl-lr "${part#kllr}");;  # kllrX: the end-to-end stage's rate
        klbf16) how+=(--kl-dtype bfloat16);;  # the end-to-end stage's training passes in bf16 (autocast)
        klfp32) how+=(--kl-dtype float32);;
        klextralr*) how+=(--kl-extra-lr "${part#klextralr}");;  # klextralrX: the rate of those other blocks
        klall) how+=(--kl-blocks all);;  # the stage tunes every block (the TP-form ones too), not only the distilled
        kl*) how+=(--kl-epochs "${part#kl}");;  # klE: E epochs of the end-to-end KL stage after the blocks
        window*) how+=(--loss-window "${part#window}");;
        seg*) v=${part#seg}; how+=(--segments "${v%%ep*}" --epochs "${v#*ep}");;  # segNepE: N segments, E epochs
        ep*) how+=(--epochs "${part#ep}");;   # epE: E epochs
        lr*) how+=(--lr "${part#lr}");;  # lrX: another learning rate
        add*) c=${part#add}; how+=(--dataset "pydoc+shakespeare+${c//-/+}");;  # addC(-D): corpora C (and D) added
        self) gen=runs/chain/self_generated_$model.txt   # text the model wrote itself instead of the corpora
          [[ -s $gen ]] || python scripts/experiments/self_generated_text.py --model "$model" --out "$gen"
          how+=(--text "$gen");;
        *) how+=(--input-source "$part");;
      esac
    done
    b2b=$(IFS=+; echo "${blocks[*]}")
    step "distill${n}_$src" launch/tp.sh 2 distill --model "$model" --plan "$plan" "${how[@]}" \
      --out "$ck/ck${n}_$src" --work-dir "$ck/ck${n}_${b2b:-original}${ranking:+@$ranking}.work"
    evals "${n}_$src" --checkpoint "$ck/ck${n}_$src"
  done
done
echo "== done: $model $counts $sources"
exit
}
