"""Perplexity and next-token top-1 accuracy of a causal LM on token segments.

The metric is an `evaluate` module shipped with the package (``ds_spd/metrics/next_token``) and loaded by
path, so it works offline; it keeps its state in memory, so concurrent ranks never share cache files.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .inject import model_device

METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "next_token")


def next_token_metric():
    import evaluate
    return evaluate.load(METRIC_DIR, keep_in_memory=True)


@torch.no_grad()
def evaluate_lm(model, segments: torch.Tensor, batch_size: int = 4, progress: bool = True,
                desc: str = "eval") -> dict:
    """``model`` is an HF causal LM or a DeepSpeed engine around one; every token but the first is scored."""
    metric = next_token_metric()
    device = model_device(model)
    for batch in tqdm(segments.split(batch_size), desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        target_logprobs = F.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        metric.add_batch(predictions=logits.argmax(-1).flatten().cpu().numpy(),
                         references=targets.flatten().cpu().numpy(),
                         target_logprobs=target_logprobs.double().flatten().cpu().numpy())
    result = metric.compute()
    return {**result, "segments": int(segments.shape[0]), "seq_len": int(segments.shape[1])}
