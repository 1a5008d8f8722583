# The commands that produced this directory (run from the repository root): the README path's 21-block plan distilled
# with the defaults of that day (SmolLM2's recipe), then each SPD block's share on the confirmation text.
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
launch/tp.sh 2 distill --model default --plan docs/results/readme_path/default_tp2/cumulative_scan/plan21.json \
  --out runs/loo21/ck --json \
  2> docs/results/input_chain/default_tp2/leave_one_out21/logs/distill21.log | grep '^{' | tail -1 \
  > docs/results/input_chain/default_tp2/leave_one_out21/distill21.json
bash scripts/experiments/leave_one_out.sh runs/loo21/ck docs/results/input_chain/default_tp2/confirmation.txt \
  docs/results/input_chain/default_tp2/leave_one_out21
