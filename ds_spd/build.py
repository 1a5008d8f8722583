"""Building a resolved run's model, one step a line (gpt-fast's ``_load_model`` shape). The mode was decided once,
by ds_spd.run.resolve_run (``RunSpec.loading``):

    virtual   load the HF model -> distilled blocks in -> device -> virtualize (every shard in this process)
    full      load the HF model -> distilled blocks in -> attention cut* -> AutoTP -> SPD blocks injected
    sharded   empty model on meta -> attention cut* -> AutoTP shards the meta model -> each rank reads its own
              slices (base weights, checkpoint overlay) -> SPD blocks injected

(* where KV heads are replicated: ds_spd.core.replicate). ds_spd.core holds the TP math, the injection policy and
communication and reads no weights; this module is where weight files and checkpoints meet them.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ds_spd.run import Runner, RunSpec, init_data_parallel, resolve_run


def build_runner(spec: RunSpec, data_parallel: bool = False) -> Runner:
    """The model a command runs on: virtual TP in this process, or a DeepSpeed AutoTP + SPD engine."""
    from ds_spd.models.loading import load_model, load_tokenizer
    if data_parallel:
        init_data_parallel()
    start = time.perf_counter()
    if spec.loading == "sharded":
        from ds_spd.models.sharded import meta_model
        engine = build_engine(meta_model(spec.model_config, spec.config.torch_dtype), spec)
        model, tok = engine.module, load_tokenizer(spec.config.model)
    else:
        model, tok = load_model(spec.config.model, spec.config.torch_dtype, config=spec.model_config)
        engine = build_virtual(model, spec) if spec.virtual else build_engine(model, spec)
        model = model if spec.virtual else engine.module
    return Runner(engine, model, tok, spec, time.perf_counter() - start)


def build_virtual(model: nn.Module, spec: RunSpec) -> nn.Module:
    """Virtual TP of a resolved run: checkpoint weights, device, then ds_spd.core.inject.virtualize."""
    from deepspeed.accelerator import get_accelerator

    from ds_spd.core.inject import set_lag, virtualize
    load_distilled(model, spec)
    model.to(get_accelerator().current_device_name())
    model = virtualize(model, spec.tp_size, spec.spd_blocks, tp_grain_size=spec.config.tp_grain_size)
    set_lag(model, spec.lag)
    return model


def build_engine(model: nn.Module, spec: RunSpec, **ds_kwargs):
    """AutoTP + SPD engine of a resolved run from a loaded model (``full``) or one on the meta device
    (``sharded``: filled from the weight files after AutoTP, each rank its own slices)."""
    from ds_spd.core.comm import init_comm
    from ds_spd.core.inject import autotp, decoder_layers, inject_spd, model_device, set_lag, tp_rank_of
    from ds_spd.models import sharded
    cfg, layout = spec.config, spec.layout
    init_comm()
    on_meta = model_device(model).type == "meta"
    if on_meta:
        from ds_spd.checkpoint import checkpoint_files
        from ds_spd.models.weights import model_weight_files
        weights = spec.weights or model_weight_files(cfg.model)
        sharded.check_weight_files(model, weights)   # headers only, before anything is allocated
        if spec.checkpoint is not None:              # the distilled blocks' tensors in place of the base ones
            weights = weights.overlaid(checkpoint_files(spec.checkpoint.path, spec.checkpoint.weight_blocks))
    else:
        load_distilled(model, spec)                    # before AutoTP shards the weights
    own_slices = {}
    if layout.kv_replicas > 1:   # KV heads replicated: ds_spd cuts attention, AutoTP never sees that split
        from ds_spd.core.replicate import shard_attention
        # DeepSpeed's TP group is ranks 0..tp-1 (and the run starts exactly tp ranks: ds_spd.run)
        own_slices = shard_attention(decoder_layers(model), layout, torch.distributed.get_rank(), spec.adapter)
    with sharded.materialising(model) if on_meta else contextlib.nullcontext() as layouts:
        engine = autotp(model, cfg.tp_size, cfg.tp_grain_size, cfg.torch_dtype, **ds_kwargs)
    if on_meta:
        tp_rank = tp_rank_of(engine) if cfg.tp_size > 1 else 0
        sharded.fill_from_files(engine.module, weights, tp_rank, {**layouts, **own_slices}, progress=tp_rank == 0)
    engine = inject_spd(engine, layout, spec.spd_blocks, spec.adapter, cfg.comm)
    set_lag(engine.module, spec.lag)
    return engine


def load_distilled(model: nn.Module, spec: RunSpec) -> None:
    """The run's distilled checkpoint blocks, loaded into a full model before any sharding."""
    if spec.checkpoint is not None:
        from ds_spd.checkpoint import apply_checkpoint
        apply_checkpoint(model, spec.checkpoint)


def init_inference(model: nn.Module, config=None, *, tp_size: int | None = None,
                   spd_blocks=None, checkpoint: str | None = None, comm: str | None = None, dtype=None, **ds_kwargs):
    """``deepspeed.init_inference`` with AutoTP, then SPD blocks injected; returns the InferenceEngine.

    ``config`` is a resolved :class:`~ds_spd.run.RunSpec`, or anything :func:`~ds_spd.config.resolve_spd_config`
    takes (an SPDConfig, the ``"spd"`` dict, a DeepSpeed config dict or JSON path with an ``"spd"`` section), which
    keyword arguments override and which is resolved against ``model.config`` here. The engine gains
    ``spd_stats`` (all-reduce accounting), ``spd_layout`` and ``set_spd_blocks``.
    """
    if isinstance(config, RunSpec):
        spec = config
    else:
        from ds_spd.config import resolve_spd_config
        cfg = resolve_spd_config(config, tp_size=tp_size, spd_blocks=spd_blocks, checkpoint=checkpoint, comm=comm,
                                 dtype=None if dtype is None else str(dtype).replace("torch.", ""))
        spec = resolve_run(cfg, model_config=model.config)
    return build_engine(model, spec, **ds_kwargs)
