"""Swap a model's decoder blocks for SPD-capable TP blocks: on a DeepSpeed AutoTP engine, or virtually.

Parallelism is a declarative plan applied to an unmodified HF model (torchtitan's shape): DeepSpeed
AutoTP shards the linears, then DeepSpeed's ``replace_module`` walks the model and our injection policy
turns each decoder layer into an :class:`~ds_spd.core.block.SPDDecoderLayer` that reuses AutoTP's shards and
the engine's TP group. The swap happens after AutoTP, so nothing is sharded twice.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from ds_spd.core.block import SPDDecoderLayer
from ds_spd.core.comm import AllReduce, CommStats, VirtualReduce
from ds_spd.models.adapters import adapter_for
from ds_spd.core.layout import DEFAULT_TP_GRAIN_SIZE, TPLayout
from ds_spd.plan import check_spd_blocks


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (``model.model.layers`` for HF causal LMs)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    base = getattr(inner, "model", inner)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(inner).__name__} has no decoder-layer list at .model.layers")
    return layers


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (an HF model or a DeepSpeed engine around one)."""
    return next(getattr(model, "module", model).parameters()).device


def spd_layers(model: nn.Module) -> list[SPDDecoderLayer]:
    layers = [layer for layer in decoder_layers(model) if isinstance(layer, SPDDecoderLayer)]
    if not layers:
        raise TypeError("model has no SPD blocks: build it with ds_spd.init_inference or ds_spd.virtualize")
    return layers


def set_spd_blocks(model: nn.Module, blocks: Iterable[int]) -> tuple[int, ...]:
    """Put exactly ``blocks`` in SPD form (the others back to two syncs); returns them sorted."""
    layers = spd_layers(model)
    chosen = check_spd_blocks(blocks, len(layers))
    for i, layer in enumerate(layers):
        layer.spd = i in chosen
    return chosen


def lag_refusal(adapter) -> str | None:
    """Why a family's blocks cannot have lagged attention, or None: it is defined for pre-norm blocks."""
    if adapter.block != "pre_norm":
        return (f"lagged attention is defined for pre-norm blocks, not the {adapter.name} family's "
                f"{adapter.block} blocks")
    return None


def set_lag(model: nn.Module, enabled: bool = True) -> None:
    """Lagged attention on every block (it acts in SPD form): each rank's MLP also reads the other ranks' attention
    output one position late (docs/method.md, "Lagged attention"). Pre-norm blocks only."""
    layers = spd_layers(model)
    refusal = enabled and lag_refusal(layers[0].adapter)
    if refusal:
        raise ValueError(refusal)
    for layer in layers:
        layer.lag = enabled


def get_spd_blocks(model: nn.Module) -> tuple[int, ...]:
    return tuple(i for i, layer in enumerate(spd_layers(model)) if layer.spd)


@contextmanager
def distilled_in(model: nn.Module, states: dict[int, dict[str, torch.Tensor]], blocks):
    """Within: ``blocks`` in SPD form, those with distilled weights in ``states`` carrying them (a distilled
    block is trained for SPD form only); after: every block back in TP form with its original weights."""
    layers = decoder_layers(model)
    swapped = [i for i in blocks if i in states]
    originals = {i: {k: v.clone() for k, v in layers[i].state_dict().items()} for i in swapped}
    try:
        for i in swapped:
            layers[i].load_state_dict(states[i])
        set_spd_blocks(model, blocks)
        yield model
    finally:
        set_spd_blocks(model, [])
        for i, state in originals.items():
            layers[i].load_state_dict(state)


class SPDInjectionPolicy:
    """DeepSpeed injection policy: which layer classes become SPD blocks, and how.

    Passed to ``deepspeed.module_inject.replace_module`` as its replace function and policy.
    """

    def __init__(self, layout_cols: tuple[tuple[int, ...], tuple[int, ...]], reduce, spd_blocks: Iterable[int],
                 adapter):
        self.attn_cols, self.mlp_cols = layout_cols
        self.reduce = reduce
        self.spd_blocks = set(spd_blocks)
        self.adapter = adapter

    def replace(self, child: nn.Module, _policy, layer_id: int = 0, prefix: str = "", state_dict=None) -> nn.Module:
        return SPDDecoderLayer(child, self.attn_cols, self.mlp_cols, self.reduce, spd=layer_id in self.spd_blocks,
                               layer_idx=layer_id, adapter=self.adapter)

    def apply(self, model: nn.Module) -> nn.Module:
        from deepspeed.module_inject.replace_module import replace_module
        replace_module(model, self.adapter.decoder_layer_class(), self.replace, self)
        return model


def virtualize(model: nn.Module, tp_size: int, spd_blocks: Iterable[int] = (), *,
               tp_grain_size: int = DEFAULT_TP_GRAIN_SIZE) -> nn.Module:
    """Virtual TP in one process: every block holds all ``tp_size`` shards and reduces by summing.

    Modifies ``model`` in place (its weights are shared, not copied) and returns it; ``model.spd_stats``
    counts the virtual all-reduces.
    """
    adapter = adapter_for(model.config)
    layout = TPLayout.for_model(model.config, tp_size, tp_grain_size)
    blocks = check_spd_blocks(spd_blocks, model.config.num_hidden_layers)
    stats = CommStats(timed=False)
    SPDInjectionPolicy((layout.attn_cols, layout.mlp_cols), VirtualReduce(stats), blocks, adapter).apply(model)
    _attach(model, model, stats, layout)
    return model


def autotp(model: nn.Module, tp_size: int, tp_grain_size: int, dtype: torch.dtype, **ds_kwargs):
    """DeepSpeed AutoTP on ``model`` (``deepspeed.init_inference``, no kernel injection): the linears sharded
    over the TP group; the decoder blocks are still HF's until :func:`inject_spd`."""
    import deepspeed
    return deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size, "tp_grain_size": tp_grain_size},
                                    dtype=dtype, replace_with_kernel_inject=False, **ds_kwargs)


def tp_rank_of(engine) -> int:
    """This rank's index in the engine's TP group (0 without one)."""
    return torch.distributed.get_rank(engine.mp_group) if engine.mp_group is not None else 0


def inject_spd(engine, layout: TPLayout, spd_blocks: Iterable[int], adapter, comm: str):
    """Turn an AutoTP engine's decoder blocks into SPD-capable ones (this rank's columns, the engine's TP group,
    all-reduces on the ``comm`` path and counted), and route AutoTP's other collectives the same way; the engine
    gains ``spd_stats``, ``spd_layout`` and ``set_spd_blocks``."""
    tp_size = len(layout.attn_cols)
    tp_rank = tp_rank_of(engine) if tp_size > 1 else 0
    stats = CommStats()
    local = ((layout.attn_cols[tp_rank],), (layout.mlp_cols[tp_rank],))
    reduce = AllReduce(engine.mp_group, stats, comm) if tp_size > 1 else VirtualReduce(stats)
    SPDInjectionPolicy(local, reduce, spd_blocks, adapter).apply(engine.module)
    _attach(engine.module, engine, stats, layout)
    _route_other_allreduces(engine.module, reduce)
    return engine


def _attach(model: nn.Module, owner, stats: CommStats, layout: TPLayout) -> None:
    """Expose the accounting and SPD controls on the model (and engine), counting forwards."""
    owner.spd_stats = stats
    owner.spd_layout = layout
    owner.set_spd_blocks = lambda blocks: set_spd_blocks(model, blocks)
    owner.get_spd_blocks = lambda: get_spd_blocks(model)
    if owner is not model:
        model.spd_stats, model.spd_layout = stats, layout
    def count_forward(*_) -> None:   # not inside a compiled step: a changing int would be a guard (a recompile)
        if not torch.compiler.is_compiling():
            stats.forwards += 1
    decoder_layers(model)[0].register_forward_pre_hook(count_forward)


class RoutedRowParallel(nn.Module):
    """A row-parallel linear AutoTP placed outside the decoder blocks (the lm_head), computing what AutoTP's
    module computes but with its all-reduce made by ds_spd's reducer: timed and on the run's path like the
    blocks' (AutoTP's own module always takes DeepSpeed's inference all-reduce, untimed)."""

    def __init__(self, inner: nn.Module, reduce, kind: str):
        super().__init__()
        self.inner, self.reduce, self.kind = inner, reduce, kind

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from deepspeed.module_inject.layers import LmHeadLinearAllreduce
        if isinstance(self.inner, LmHeadLinearAllreduce):   # it holds columns of the full input: cut its share
            sizes, r = self.inner._partition_sizes, self.inner.tp_index
            x = x[..., sum(sizes[:r]):sum(sizes[:r + 1])]
        # rows flattened first: under dynamic shapes a matmul of [B, 1, K] became a batched product that read the
        # whole head once per row (8 rows: 0.5 GB a step on SmolLM2), where one matrix product reads it once
        rows = x.flatten(0, -2)   # (a rank's share may hold no columns at all)
        out = self.reduce(torch.mm(rows, self.inner.weight.t()).unflatten(0, x.shape[:-1])[None], self.kind)
        return out if self.inner.bias is None else out + self.inner.bias


def _route_other_allreduces(model: nn.Module, reduce) -> None:
    """Route the collectives AutoTP left outside the decoder blocks (a row-parallel lm_head) through ``reduce``."""
    from deepspeed.module_inject.layers import LinearAllreduce
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearAllreduce) and ".layers." not in f".{name}.":
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, RoutedRowParallel(module, reduce, child))
