# Sourced by the resumable benchmark and experiment scripts (readme_path.sh, input_source_chain.sh, esb_screen.sh,
# leave_one_out.sh).
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
