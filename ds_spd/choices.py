"""The value lists users choose from, defined once (config validation, CLI choices and the code that acts
on them read these). Importing this module imports nothing heavy, so ``ds-spd --help`` stays fast."""

DTYPES = ("float32", "bfloat16", "float16")
COMM_PATHS = ("auto", "gloo")             # DeepSpeed's inference all-reduce (shm / NCCL), or torch.distributed
SCAN_METHODS = ("isolated", "cumulative")  # each block alone (default: ranks better), or the paper's cumulative
SCAN_HEAD_DTYPES = ("auto", "bfloat16", "float32")  # the scan's head matmul; auto: bf16 where it is faster here
KL_STAGE_DTYPES = SCAN_HEAD_DTYPES   # the KL stage's training passes through the blocks (autocast): the same choice
# the blocks the end-to-end KL stage trains: the distilled (SB/ESB) ones, or every block in the form the plan runs it in
KL_STAGE_BLOCKS = ("distilled", "all")
SCAN_RANKINGS = ("zero-shot", "distilled")  # each block's cost as it is, or alone with its weights distilled once
SCAN_METRICS = ("ppl", "kl")
# distillation block inputs / targets: the original model's (paper), the zero-shot SPD prefix's (inputs and
# targets both move), or the chain as it will run with the original model's outputs as targets (asymmetric)
INPUT_SOURCES = ("original", "prefix", "chain")
LOAD_MODES = ("sharded", "full")         # real TP: each rank reads its slices, or every rank loads the full model
DISTILL_TRAINERS = ("layerwise", "joint")  # one block resident at a time, or every trained block in one engine
MLP_MATCHINGS = ("slice", "neuron")          # head grouping's MLP step: whole AutoTP slices (paper), or each neuron
HEAD_GROUPINGS = ("all", "esb")            # which trained blocks get head grouping first: every one, or ESB (paper)
LR_SCHEDULES = ("constant", "cosine")      # distillation learning rate: flat, or linear warm-up then cosine decay to 0
