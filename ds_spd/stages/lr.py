"""The distillation learning rate a model needs, from the scale of its weights.

Adam moves every weight by about ``lr`` per step whatever the weight's size, so the same ``lr`` is a larger
*relative* step on a model with smaller weights. Chosen on validation perplexity (docs/experiments.md, "Higher
learning rates"): on SmolLM2-135M (linear weights' RMS 0.19-0.20) 1e-3 among 1e-4 ... 2e-3; on Gemma 3 270M (RMS
0.033-0.036) 2e-4 among 5e-5, 1e-4, 2e-4. Both are ``RELATIVE_STEP * RMS`` rounded to one significant digit,
so that is the default for any model: the RMS of the trained blocks' matrices, read from the safetensors
files (a few blocks, spread over the trained ones; per-block RMS varies by a few percent in both models).
"""
from __future__ import annotations

import re
from typing import Sequence


RELATIVE_STEP = 5e-3     # lr / weight RMS: 1e-3 on SmolLM2 (RMS 0.19-0.20), 2e-4 on Gemma 3 270M (0.033-0.036)
KL_STAGE_DIVISOR = 20    # the end-to-end KL stage's lr: the blocks' lr / 20 (1e-5 on Gemma 3; SmolLM2's recipe: 1e-4)
FALLBACK_LR = 3e-4       # models without safetensors weights (read only by the joint trainer's full load)
SAMPLED_BLOCKS = 4
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def weight_rms(weights, blocks: Sequence[int]) -> float:
    """RMS over the 2-D weights (projections; norms and biases are 1-D) of up to SAMPLED_BLOCKS of ``blocks``,
    spread evenly; ``weights``: ds_spd.models.weights.WeightFiles (headers), tensors read one at a time."""
    blocks = sorted(blocks)
    n = min(SAMPLED_BLOCKS, len(blocks))
    picked = {blocks[round(k * (len(blocks) - 1) / max(n - 1, 1))] for k in range(n)}
    names = [name for name, shape in weights.shapes.items() if len(shape) == 2 and name.endswith("weight")
             and (m := _LAYER.search(name)) and int(m.group(1)) in picked]
    if not names:
        raise ValueError(f"no 2-D weights of blocks {sorted(picked)} in the model's safetensors files")
    squares, count = 0.0, 0
    for name in names:
        t = weights.read(name).float()
        squares += float(t.pow(2).sum())
        count += t.numel()
    return (squares / count) ** 0.5


def scaled_lr(rms: float) -> float:
    """``RELATIVE_STEP * rms`` to one significant digit (1e-3, 2e-4, ...)."""
    return float(f"{RELATIVE_STEP * rms:.0e}")


def kl_stage_lr(lr: float) -> float:
    """The end-to-end KL stage's default lr: the blocks' ``lr`` / KL_STAGE_DIVISOR, one significant digit. The
    stage moves the same weights, further along, on a whole-model loss: 5e-5 on SmolLM2 (chosen among 1e-5, 5e-5,
    2e-4) and 1e-5 on Gemma 3 270M, where 5e-5 raised the held-out KL at 5 and 9 blocks (so the stage kept the
    blocks' weights) and 1e-5 lowered it (docs/experiments.md): the same rate relative to the weights' scale.
    SmolLM2's recipe sets 1e-4 (lr / 10), chosen with its stage on 256 segments, where that gave the lower mean
    (its stage now reads 512 segments for one epoch: the same steps)."""
    return float(f"{lr / KL_STAGE_DIVISOR:.0e}")


def default_lr(weights, blocks: Sequence[int]) -> tuple[float, str]:
    """The lr for distilling ``blocks`` and how it was chosen (one line for the log and the provenance);
    ``weights`` None (no safetensors files): FALLBACK_LR."""
    if weights is None or not blocks:
        return FALLBACK_LR, f"lr {FALLBACK_LR:g} (no safetensors weights to scale it to)"
    rms = weight_rms(weights, blocks)
    lr = scaled_lr(rms)
    return lr, f"lr {lr:g} = {RELATIVE_STEP:g} x the trained blocks' weight RMS {rms:.4f} (--lr sets it)"
