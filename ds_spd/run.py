"""One resolved run: every check that needs no weights, made once, handed to every stage.

:func:`resolve_run` turns a validated config into a frozen :class:`RunSpec`: the HF config (read once), the
family's adapter, the TP layout, the SPD blocks (from the list, the plan or the checkpoint, validated
once), the checked checkpoint, and the ranks. Bad input (data files, model path, architecture, tp size,
plan or checkpoint) fails here, before ranks load weights or communicate. Scan, distill and bench take the
spec; ds_spd.build builds the model a command runs on from it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ds_spd.models.adapters import ModelAdapter, adapter_for
from ds_spd.checkpoint import CheckpointInfo, open_checkpoint
from ds_spd.config import SPDConfig
from ds_spd.errors import LaunchError
from ds_spd.core.layout import TPLayout
from ds_spd.plan import check_spd_blocks, load_plan
from ds_spd.ranks import world_size


@dataclass(frozen=True)
class RunSpec:
    config: SPDConfig
    model_config: Any
    adapter: ModelAdapter
    layout: TPLayout
    spd_blocks: tuple[int, ...]
    checkpoint: CheckpointInfo | None
    virtual: bool          # one process holds every shard (virtual TP) or one rank one shard (real TP)
    world: int             # ranks started (data-parallel ranks of a virtual run, TP ranks of a real one)
    weights: Any = None    # stages that read weights from files: ds_spd.models.weights.WeightFiles
    lag: bool = False      # SPD blocks with lagged attention (a checkpoint's plan says so; distill --lag)

    @property
    def tp_size(self) -> int:
        return self.config.tp_size

    @property
    def mode(self) -> str:
        return "virtual" if self.virtual else "tp"

    @property
    def loading(self) -> str:
        """How ds_spd.build builds the model: ``virtual`` (one process, every shard), ``full`` (each rank loads the
        model, AutoTP shards it) or ``sharded`` (each rank reads its own slices into an AutoTP-sharded meta
        model), decided here by the mode and ``read_weights``."""
        return "virtual" if self.virtual else "sharded" if self.weights is not None else "full"


def resolve_run(cfg: SPDConfig, *, virtual_tp: int | None = None, data_parallel: bool = False,
                data_section: str | None = None, model_config=None, read_weights: bool | None = None) -> RunSpec:
    """Resolve and check a run once. ``virtual_tp``: one process simulates that tp size (``data_parallel``
    lets every rank of a launcher do so on its share of the data); ``data_section``: the data config the
    command reads (checked before the model); ``model_config``: an HF config already in hand (Python API);
    ``read_weights``: the stage reads the weights from the safetensors files (their headers are checked
    here; default: a real-TP run with sharded loading whose model is not in hand)."""
    world = world_size()
    if read_weights is None:   # with model_config given (Python API) the caller has the model
        read_weights = virtual_tp is None and cfg.load == "sharded" and model_config is None
    if virtual_tp is not None:
        if world > 1 and not data_parallel:
            raise LaunchError(f"--virtual-tp runs in one process, but {world} ranks were started: "
                              "drop --virtual-tp under a launcher, or run without the launcher")
        cfg = cfg.updated(tp_size=virtual_tp)
    if data_section is not None:
        from ds_spd.data import check_data_source
        d = getattr(cfg, data_section)
        check_data_source(d.text, d.dataset, d.split)
    if model_config is None:
        from ds_spd.models.loading import load_model_config
        model_config = load_model_config(cfg.model)
    adapter = adapter_for(model_config)
    layout = TPLayout.for_model(model_config, cfg.tp_size, cfg.tp_grain_size)
    if virtual_tp is None and world != cfg.tp_size:
        hint = (f"launch with `deepspeed --num_gpus {cfg.tp_size} --module ds_spd ...`, or use virtual TP "
                f"(--virtual-tp {cfg.tp_size})" if world == 1 else f"set tp to {world} or start {cfg.tp_size} ranks")
        raise LaunchError(f"tp size {cfg.tp_size} needs {cfg.tp_size} ranks, {world} started: {hint}")
    checkpoint = None
    if cfg.checkpoint is not None:
        checkpoint = open_checkpoint(cfg.checkpoint, model_config, cfg.tp_size, cfg.tp_grain_size, cfg.spd_blocks)
        blocks = checkpoint.spd_blocks
    elif cfg.plan is not None:
        blocks = load_plan(cfg.plan).check_compatible(model_config, cfg.tp_size, cfg.tp_grain_size).spd_blocks
    else:
        blocks = cfg.spd_blocks or ()
    blocks = check_spd_blocks(blocks, model_config.num_hidden_layers)
    weights = None
    if read_weights:
        from ds_spd.models.weights import model_weight_files
        weights = model_weight_files(cfg.model)   # headers only: missing shards fail here
    return RunSpec(cfg, model_config, adapter, layout, blocks, checkpoint, virtual_tp is not None, world, weights,
                   lag=checkpoint is not None and checkpoint.plan.lag)


def init_data_parallel() -> tuple[int, int]:
    """(rank, world) of a data-parallel run of virtual-TP work (scan, distill) under a launcher."""
    import torch.distributed as dist

    from ds_spd.core.comm import backend
    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend())
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@dataclass
class Runner:
    """What a command needs: something to call like an HF causal LM, its tokenizer and accounting."""

    model: object          # HF model (virtual TP) or DeepSpeed InferenceEngine (real TP)
    hf_model: torch.nn.Module
    tokenizer: object
    spec: RunSpec
    load_seconds: float = 0.0   # building the model or engine, weights included

    @property
    def config(self) -> SPDConfig:
        return self.spec.config

    @property
    def spd_blocks(self) -> tuple[int, ...]:
        return self.spec.spd_blocks

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def stats(self):
        return self.model.spd_stats

    @property
    def device(self) -> torch.device:
        from ds_spd.core.inject import model_device
        return model_device(self.hf_model)
