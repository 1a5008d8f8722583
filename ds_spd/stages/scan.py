"""Block sensitivity scan (docs/method.md section 2), with cached activations.

``method="isolated"`` (the CLI's default) converts each block alone: block i's sensitivity is the metric with
it in SPD form minus the TP model's. The paper's procedure (``method="cumulative"``): convert blocks to SPD one
at a time from the last block to the first, keeping earlier conversions; block i's sensitivity is the metric
after converting it minus the metric before (so it depends on the blocks after it: docs/method.md section 2).

Both only change blocks >= i when block i is measured, so the input of block i is that of the unmodified
model: it is computed once for every block and cached, and each measurement runs only blocks i..L-1.
That costs sum_i (L-i)/L ~ (L+1)/2 full forwards instead of the naive L+1 (``use_cache=False``).
Cache memory: L x segments x seq_len x hidden x bytes (SmolLM2, 16 x 256 tokens, fp32: 0.45 GB).

Metrics: ``ppl`` (perplexity, the paper's) and ``kl`` (mean KL divergence of the next-token distribution
from the unmodified model's; the base distribution is recomputed from the unmodified model's final hidden
states, cached like a block input). Both apply the head in chunks of tokens (ds_spd.models.head).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ds_spd.choices import SCAN_METHODS as METHODS, SCAN_METRICS as METRICS
from ds_spd.models.head import Reference, final_hidden, head_in, score_tokens
from ds_spd.core.inject import decoder_layers, distilled_in, model_device, set_spd_blocks


def all_reduce_sums(values: list[float]) -> list[float]:
    """Sum scalars over data-parallel ranks (the scan under a launcher splits its segments by rank)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@contextmanager
def suffix_of(model: nn.Module, start: int):
    """Run only blocks ``start..L-1``: the model is fed ``inputs_embeds`` = the cached input of block ``start``.

    Models with per-layer attention types (Gemma 2/3: sliding and full layers, each with its own mask and
    rotary base) look a layer's type up by its position in ``config.layer_types``, so the types are sliced with
    the layers; without that, block ``start + k`` ran with block k's mask and rotary embedding."""
    inner = model.model
    layers, config = inner.layers, inner.config
    types = getattr(config, "layer_types", None)
    inner.layers = nn.ModuleList(list(layers)[start:])
    if types is not None:
        config.layer_types = list(types)[start:]
    try:
        yield model
    finally:
        inner.layers = layers
        if types is not None:
            config.layer_types = types


def cache_bytes(model_config, n_segments: int, seq_len: int, dtype=torch.float32, metric: str = "ppl") -> int:
    blocks = model_config.num_hidden_layers + (metric == "kl")   # KL: the final hidden states too
    return blocks * n_segments * seq_len * model_config.hidden_size * dtype.itemsize


@dataclass
class BlockInputs:
    """The unmodified model's input to every block, for every calibration segment (and, for the KL metric,
    its final hidden states: the base distribution is recomputed from them by the head, chunk by chunk, instead
    of held as [N, T, vocab] log-probs)."""

    inputs: list[torch.Tensor]              # L tensors [N, T, d]
    base_hidden: torch.Tensor | None = None  # [N, T-1, d], for the KL metric

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, segments: torch.Tensor, batch_size: int, keep_base: bool = False,
                progress: bool = True) -> "BlockInputs":
        layers = decoder_layers(model)
        inputs: list[list[torch.Tensor]] = [[] for _ in layers]
        finals = []
        hooks = [layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: inputs[i].append(
                (args[0] if args else kwargs["hidden_states"]).detach().cpu()), with_kwargs=True)
            for i, layer in enumerate(layers)]
        try:
            for batch in tqdm(segments.split(batch_size), desc="caching block inputs", disable=not progress,
                              leave=False):
                hidden = final_hidden(model, input_ids=batch.to(model_device(model)))
                if keep_base:
                    finals.append(hidden[:, :-1].cpu())
        finally:
            for h in hooks:
                h.remove()
        return cls([torch.cat(x) for x in inputs], torch.cat(finals) if keep_base else None)


@torch.no_grad()
def score(model: nn.Module, segments: torch.Tensor, batch_size: int, metric: str = "ppl",
          cache: BlockInputs | None = None, start: int | None = None) -> float:
    """The metric on ``segments``; with ``start``, only blocks ``start..`` run, from the cached block input."""
    nll = kl = count = 0.0
    device = model_device(model)
    for b0 in range(0, segments.shape[0], batch_size):
        ids = segments[b0:b0 + batch_size].to(device)
        if start is not None:
            with suffix_of(model, start):
                hidden = final_hidden(model, inputs_embeds=cache.inputs[start][b0:b0 + batch_size].to(device))
        else:
            hidden = final_hidden(model, input_ids=ids)
        targets = ids[:, 1:]
        base = cache.base_hidden[b0:b0 + batch_size].to(device) if metric == "kl" else None
        scores = score_tokens(model, hidden[:, :-1], targets, base)
        nll -= scores.logprobs.double().sum().item()
        kl += scores.kl_sum or 0.0
        count += targets.numel()
    nll, kl, count = all_reduce_sums([nll, kl, count])
    return math.exp(nll / count) if metric == "ppl" else kl / count


@dataclass
class ScanResult:
    method: str
    metric: str
    baseline: float
    sensitivity: list[float]                 # per block index
    order: list[int]                         # order of conversion
    after: list[float]                       # metric after each conversion, in that order
    seconds: float
    forwards_equivalent: float               # full-model forwards the scan cost (naive: L + 1)
    extra: dict = field(default_factory=dict)


def scan(model: nn.Module, segments: torch.Tensor, batch_size: int = 4, method: str = "cumulative",
         metric: str = "ppl", use_cache: bool = True, progress: bool = True,
         head_dtype: torch.dtype | None = None) -> ScanResult:
    """Sensitivity of every block of a virtualized model (``ds_spd.virtualize``) on ``segments``; ``head_dtype``:
    the head's matmul dtype while scoring (ds_spd.models.head.head_in)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    n_layers = len(decoder_layers(model))
    start_time = time.perf_counter()
    set_spd_blocks(model, [])
    cache = None
    if use_cache or metric == "kl":
        cache = BlockInputs.capture(model, segments, batch_size, keep_base=metric == "kl", progress=progress)
    with head_in(model, head_dtype):
        baseline = score(model, segments, batch_size, metric, cache, 0 if use_cache else None)
        order = list(range(n_layers - 1, -1, -1))
        sensitivity, after = [0.0] * n_layers, []
        previous, cost = baseline, 2.0 if use_cache else 1.0
        for i in tqdm(order, desc=f"scan ({method}, {metric})", disable=not progress):
            set_spd_blocks(model, range(i, n_layers) if method == "cumulative" else [i])
            value = score(model, segments, batch_size, metric, cache, i if use_cache else None)
            cost += (n_layers - i) / n_layers if use_cache else 1.0
            reference = previous if method == "cumulative" else baseline
            sensitivity[i] = value - reference
            after.append(value)
            previous = value
    set_spd_blocks(model, [])
    return ScanResult(method, metric, baseline, sensitivity, order, after, time.perf_counter() - start_time,
                      cost)


@torch.no_grad()
def scan_distilled(model: nn.Module, states: dict[int, dict[str, torch.Tensor]], segments: torch.Tensor,
                   batch_size: int = 4, metric: str = "ppl", progress: bool = True,
                   head_dtype: torch.dtype | None = None) -> ScanResult:
    """Sensitivity of each block *after* distillation: the metric with block ``i`` alone in SPD form with its
    distilled weights ``states[i]`` (blocks without weights: zero-shot), minus the TP model's. Block inputs
    are cached from the original model, so block i's distilled weights act only in block i (isolated scan)."""
    layers = decoder_layers(model)
    start_time = time.perf_counter()
    set_spd_blocks(model, [])
    cache = BlockInputs.capture(model, segments, batch_size, keep_base=metric == "kl", progress=progress)
    n_layers = len(layers)
    sensitivity, after = [0.0] * n_layers, []
    order = list(range(n_layers - 1, -1, -1))
    with head_in(model, head_dtype):
        baseline = score(model, segments, batch_size, metric, cache, 0)
        for i in tqdm(order, desc=f"scan (distilled, {metric})", disable=not progress):
            with distilled_in(model, states, [i]):
                value = score(model, segments, batch_size, metric, cache, i)
            sensitivity[i] = value - baseline
            after.append(value)
    cost = 2.0 + sum((n_layers - i) / n_layers for i in order)
    return ScanResult("isolated-distilled", metric, baseline, sensitivity, order, after,
                      time.perf_counter() - start_time, cost, {"distilled_blocks": sorted(states)})


def scan_streamed(source, segments: torch.Tensor, batch_size: int = 4, method: str = "cumulative",
                  metric: str = "ppl", budget_bytes: int | None = None, spill_dir: str | None = None,
                  last: int | None = None, progress: bool = True, head_dtype: torch.dtype | None = None
                  ) -> ScanResult:
    """The same scan in one pass over the weights, one block resident at a time (``source``: a
    ds_spd.stages.streaming.BlockSource), for models that do not fit a rank.

    Every measurement k (block k converted, and for the cumulative scan every block after it) is a stream
    of activations: at block j each stream k < j passes through block j in its form (SPD for the cumulative
    scan, TP for the isolated one), a new stream j starts from the unmodified model's input of block j
    through block j in SPD form, and the unmodified stream passes in TP form. At the end the model's head
    scores every stream. Each block is read once; the activations (one stream per scanned block plus the
    unmodified one) live in RAM within ``budget_bytes``, the rest in files under ``spill_dir``. ``last``:
    scan only the last N blocks (the cumulative scan's first N steps); the others get no sensitivity."""
    from ds_spd.stages.streaming import ActivationBudget, ActivationStores, default_budget_bytes, run_block
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    start_time = time.perf_counter()
    n_layers = source.config.num_hidden_layers
    scanned = list(range(n_layers - min(last or n_layers, n_layers), n_layers))
    budget = ActivationBudget(default_budget_bytes() if budget_bytes is None else budget_bytes)
    stores = ActivationStores((*segments.shape, source.config.hidden_size), source.dtype, budget, spill_dir)
    unmodified = stores.new()
    source.first_inputs(segments, batch_size, unmodified)
    streams = {}
    for j in tqdm(range(n_layers), desc=f"scan ({method}, {metric}), streamed", disable=not progress):
        block = source.block(j)
        block.spd = method == "cumulative"
        for stream in streams.values():
            run_block(block, source.rotary, stream, stream, batch_size)
        if j in scanned:
            block.spd = True
            streams[j] = stores.new()
            run_block(block, source.rotary, unmodified, streams[j], batch_size)
        block.spd = False
        run_block(block, source.rotary, unmodified, unmodified, batch_size)
        del block
    nll = {k: 0.0 for k in [None, *streams]}
    kl = {k: 0.0 for k in streams}
    count = 0.0
    starts = range(0, segments.shape[0], batch_size)
    bar = tqdm(total=len(starts) * (len(streams) + 1), desc=f"scan: scoring {len(streams) + 1} streams with the head",
               unit="batch", disable=not progress)
    with source.head() as model, head_in(model, head_dtype) as head, bar:   # no blocks: final norm and head
        for b0 in starts:
            targets = segments[b0:b0 + batch_size, 1:]
            base = final_hidden(head, inputs_embeds=unmodified.read(b0, b0 + targets.shape[0]))[:, :-1]
            nll[None] -= score_tokens(head, base, targets).logprobs.double().sum().item()
            bar.update()
            reference = Reference(head, base) if metric == "kl" else None   # the head on it once a batch
            for k, stream in streams.items():
                hidden = final_hidden(head, inputs_embeds=stream.read(b0, b0 + targets.shape[0]))[:, :-1]
                scores = score_tokens(head, hidden, targets, reference)
                nll[k] -= scores.logprobs.double().sum().item()
                kl[k] += scores.kl_sum or 0.0
                bar.update()
            count += targets.numel()
    for store in [unmodified, *streams.values()]:
        store.close()
    stores.remove_directory()
    keys = [None, *streams]
    sums = all_reduce_sums([nll[k] for k in keys] + [kl[k] for k in streams] + [count])
    count = sums[-1]
    value = {k: math.exp(v / count) for k, v in zip(keys, sums)} if metric == "ppl" else \
        {None: 0.0, **{k: v / count for k, v in zip(streams, sums[len(keys):-1])}}
    order = sorted(streams, reverse=True)
    sensitivity: list = [None] * n_layers
    previous = value[None]
    for i in order:
        sensitivity[i] = value[i] - (previous if method == "cumulative" else value[None])
        previous = value[i]
    blocks_run = n_layers + sum(n_layers - k for k in streams)
    return ScanResult(method, metric, value[None], sensitivity, order, [value[i] for i in order],
                      time.perf_counter() - start_time, blocks_run / n_layers,
                      {"streamed": True, "scanned_blocks": scanned, "spilled_bytes": budget.spilled_bytes})
