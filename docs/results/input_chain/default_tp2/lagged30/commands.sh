# The commands that produced this directory's files (run from the repository root; resumable): the README path's
# 30-block plan distilled with today's defaults and the lagged attention output, against the README path's 30-block
# model (runs/readme30/checkpoint30: its blocks bitwise, the same perplexity to the last digit) on the
# out-of-domain validation text, which decides, and the confirmation text (docs/experiments.md, "The other ranks'
# attention output one position late").
bash "$(dirname "$0")/../../../../../scripts/experiments/lagged_attention/validate.sh" 30 runs/readme30/checkpoint30
