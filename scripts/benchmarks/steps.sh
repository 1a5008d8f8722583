# Sourced by the resumable benchmark and experiment scripts (readme_path.sh, input_source_chain.sh, esb_screen.sh,
# leave_one_out.sh, and the commands.sh beside experiment results, which use the helpers below).
# step NAME COMMAND...: run COMMAND --json unless $out/${STEP_PREFIX}NAME.json exists (STEP_PREFIX: "step_" unless
# set); keep its last JSON line there, its stderr in $out/logs/NAME.log; a failed step shows the log's end and exits
step() {
  local name=$1; shift
  local file=$out/${STEP_PREFIX-step_}$name.json
  [[ -s "$file" ]] && { echo "== $name: done before"; return; }
  echo "== $name: $*"; local start=$SECONDS
  "$@" --json 2> "$out/logs/$name.log" | grep '^{' | tail -1 > "$file.part" \
    || { echo "step '$name' failed; the end of $out/logs/$name.log:" >&2; tail -25 "$out/logs/$name.log" >&2; exit 1; }
  mv "$file.part" "$file"; echo "   $((SECONDS - start)) s"
}
# eval_step NAME TEXT ARGS...: `ds-spd eval` of $MODEL (default: default) in virtual tp 2 on TEXT's first 32 windows of
# 256 tokens ($EVAL_WINDOWS of them if set; ARGS: --checkpoint, --spd-blocks), two threads, niced: the experiments'
# evaluations
eval_step() {
  local name=$1 text=$2; shift 2
  OMP_NUM_THREADS=2 step "$name" nice -n 10 python -m ds_spd eval --model "${MODEL:-default}" --virtual-tp 2 "$@" \
    --text "$text" --max-samples "${EVAL_WINDOWS:-32}"
}
# kl_step NAME TEXT CHECKPOINTS: each checkpoint's KL to TP on TEXT's first 16 windows, paired against the first
# (scripts/experiments/entropy_check.py), two threads, niced
kl_step() {
  OMP_NUM_THREADS=2 step "$1" nice -n 10 python scripts/experiments/entropy_check.py --model "${MODEL:-default}" \
    --text "$2" --segments 16 --checkpoints "$3"
}
# spd_blocks_of PLAN: the plan's blocks in SPD form, as --spd-blocks takes them
spd_blocks_of() {
  python -c "import json, sys; print(','.join(str(b['index']) for b in json.load(open(sys.argv[1]))['blocks']
    if b['class'] != 'TP'))" "$1"
}
# in_context_set SUMMARY N: the blocks left in SPD form when the N that add most to the all-block model (the
# summary.json of leave_one_out.sh) go back to TP form
in_context_set() {
  python -c "import json, sys; s = json.load(open(sys.argv[1]))['block_adds']
top = sorted(s, key=lambda k: -s[k]['ratio'])[:int(sys.argv[2])]
print(','.join(k for k in sorted(s, key=int) if k not in top))" "$1" "$2"
}
