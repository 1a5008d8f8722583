# The commands that produced this directory's files (run from the repository root; resumable): the README path's
# 21-block plan distilled with today's defaults and the lagged attention output, against the README path's 21-block
# model (runs/kl_scan21/ck: the same model to the last digit of its KL) on the
# out-of-domain validation text, which decides, and the confirmation text (docs/experiments.md, "The other ranks'
# attention output one position late").
bash "$(dirname "$0")/../../../../../scripts/experiments/lagged_attention/validate.sh" 21 runs/kl_scan21/ck
