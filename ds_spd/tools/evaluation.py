"""Perplexity and next-token top-1 accuracy of a causal LM on token segments.

The metric is an `evaluate` module shipped with the package (``ds_spd/metrics/next_token``) and loaded by
path, so it works offline; it keeps its state in memory, so concurrent ranks never share cache files.
"""
from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from ds_spd.core.inject import model_device

METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "next_token")


def next_token_metric():
    import evaluate
    return evaluate.load(METRIC_DIR, keep_in_memory=True)


@torch.no_grad()
def evaluate_lm(model, segments: torch.Tensor, batch_size: int = 4, progress: bool = True,
                desc: str = "eval") -> dict:
    """``model`` is an HF causal LM or a DeepSpeed engine around one; every token but the first is scored
    (the head applied in chunks of tokens: ds_spd.models.head)."""
    from ds_spd.models.head import final_hidden, score_tokens
    metric = next_token_metric()
    device = model_device(model)
    for batch in tqdm(segments.split(batch_size), desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        targets = batch[:, 1:]
        scores = score_tokens(model, final_hidden(model, input_ids=batch)[:, :-1], targets)
        metric.add_batch(predictions=scores.top1.flatten().numpy(), references=targets.flatten().cpu().numpy(),
                         target_logprobs=scores.logprobs.double().flatten().numpy())
    result = metric.compute(tokens_per_segment=int(segments.shape[1]) - 1)
    return {**result, "segments": int(segments.shape[0]), "seq_len": int(segments.shape[1])}


def paired_ratio_ci(a: dict, b: dict, resamples: int = 1000, seed: int = 0) -> dict:
    """Perplexity ratio b / a of two evaluations on the *same* segments (their ``segment_nll``), with a 95%
    paired bootstrap interval: both are resampled with the same segment draws, so the interval reflects the
    difference between the models, not the spread of the text. ``improved`` / ``worse`` only where it holds."""
    import numpy as np
    na, nb = np.asarray(a["segment_nll"]), np.asarray(b["segment_nll"])
    if na.shape != nb.shape or a["tokens"] != b["tokens"]:
        raise ValueError("a paired comparison needs the same segments in both evaluations")
    idx = np.random.default_rng(seed).integers(0, na.size, size=(resamples, na.size))
    ratios = np.exp((nb[idx].sum(1) - na[idx].sum(1)) / a["tokens"])
    lo, hi = (float(v) for v in np.percentile(ratios, [2.5, 97.5]))
    ratio = float(np.exp((nb.sum() - na.sum()) / a["tokens"]))
    return {"ratio": ratio, "ci95": [lo, hi], "verdict": "lower" if hi < 1 else "higher" if lo > 1 else "no difference"}


def percent(r: dict, digits: int = 1) -> str:
    """A paired ratio as the reports write it: ``+4.0% [+2.3, +5.5]`` (the change over the reference in percent,
    with its interval)."""
    lo, hi = (100 * (v - 1) for v in r["ci95"])
    return f"{100 * (r['ratio'] - 1):+.{digits}f}% [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def evaluate_run(runner, progress: bool = True) -> dict:
    """The ``eval`` stage: perplexity and top-1 accuracy of a runner on its ``spd.data`` text."""
    from ds_spd.data import segments_for
    d = runner.config.data
    segments = segments_for(d, runner.tokenizer)
    runner.stats.reset()
    result = evaluate_lm(runner.model, segments, d.batch_size, progress=progress)
    return {**result, "data": d.source()}


@torch.no_grad()
def generate_texts(runner, prompts: list[str], max_new_tokens: int, chat: bool = False) -> list[dict]:
    """The ``generate`` stage: greedy decoding with KV cache, per prompt its text, token ids and speed."""
    import time
    tok, outputs = runner.tokenizer, []
    for prompt in prompts:
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt").input_ids
        ids = ids.to(runner.device)
        runner.stats.reset()
        start = time.perf_counter()
        out = runner.hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tok.pad_token_id or tok.eos_token_id)
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1]:].tolist()
        outputs.append({"prompt": prompt, "completion": tok.decode(new, skip_special_tokens=True),
                        "new_tokens": len(new), "ms_per_token": 1e3 * seconds / max(len(new), 1), "token_ids": new,
                        "allreduce_per_forward": runner.stats.summary()["allreduce_per_forward"]})
    return outputs
