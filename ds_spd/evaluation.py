"""Perplexity and next-token top-1 accuracy of a causal LM on token segments."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate_lm(model, segments: torch.Tensor, batch_size: int = 4, progress: bool = True,
                desc: str = "eval") -> dict:
    """``model`` is an HF causal LM or a DeepSpeed engine around one; every token but the first is scored."""
    nll, correct, count = 0.0, 0, 0
    device = next((getattr(model, "module", model)).parameters()).device
    batches = segments.split(batch_size)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
    return {"perplexity": math.exp(nll / count), "accuracy": correct / count, "tokens": count,
            "segments": int(segments.shape[0]), "seq_len": int(segments.shape[1])}
