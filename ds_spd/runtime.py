"""Build the model a command runs on: real TP under a launcher, or virtual TP in one process.

All checks that need no weights (config keys, architecture, tp size, plan) run first, so bad input
fails before ranks load weights or start communicating.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import SPDConfig
from .errors import LaunchError
from .inject import init_inference, model_device, virtualize
from .layout import TPLayout
from .models import load_model, load_model_config


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Runner:
    """What a command needs: something to call like an HF causal LM, its tokenizer and accounting."""

    model: object          # HF model (virtual TP) or DeepSpeed InferenceEngine (real TP)
    hf_model: torch.nn.Module
    tokenizer: object
    config: SPDConfig
    spd_blocks: tuple[int, ...]
    mode: str              # "tp" or "virtual"

    @property
    def stats(self):
        return self.model.spd_stats

    @property
    def device(self) -> torch.device:
        return model_device(self.hf_model)


def preflight(cfg: SPDConfig, virtual_tp: int | None = None, data_parallel: bool = False,
              data_section: str | None = None) -> tuple[object, tuple[int, ...]]:
    """Every check that needs no weights (``data_section``: the data config the command reads, checked too);
    returns (HF config, SPD blocks)."""
    if virtual_tp is not None and world_size() > 1 and not data_parallel:
        raise LaunchError(f"--virtual-tp runs in one process, but {world_size()} ranks were started: "
                           "drop --virtual-tp under a launcher, or run without the launcher")
    if data_section is not None:
        from .data import check_data_source
        d = getattr(cfg, data_section)
        check_data_source(d.text, d.dataset, d.split)
    model_config = load_model_config(cfg.model)
    TPLayout.for_model(model_config, cfg.tp_size, cfg.tp_grain_size)
    if virtual_tp is None and world_size() != cfg.tp_size:
        hint = (f"launch with `deepspeed --num_gpus {cfg.tp_size} --module ds_spd ...`, or add --virtual-tp {cfg.tp_size}"
                if world_size() == 1 else f"set tp to {world_size()} or start {cfg.tp_size} ranks")
        raise LaunchError(f"tp size {cfg.tp_size} needs {cfg.tp_size} ranks, {world_size()} started: {hint}")
    return model_config, cfg.resolved_spd_blocks(model_config)


def init_data_parallel() -> tuple[int, int]:
    """(rank, world) of a data-parallel run of virtual-TP work (scan) under a launcher; gloo on CPU."""
    import torch.distributed as dist
    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def build_runner(cfg: SPDConfig, virtual_tp: int | None = None, data_parallel: bool = False,
                 data_section: str | None = None) -> Runner:
    """Real TP (``virtual_tp=None``, under a launcher) or virtual TP; ``data_parallel`` lets virtual-TP
    work run on every rank of a launcher, each on its share of the data."""
    if virtual_tp is not None:
        cfg = cfg.model_copy(update={"tp_size": virtual_tp})
    _, blocks = preflight(cfg, virtual_tp, data_parallel, data_section)
    if data_parallel:
        init_data_parallel()
    model, tok = load_model(cfg.model, cfg.torch_dtype)
    if virtual_tp is not None:
        from deepspeed.accelerator import get_accelerator
        if cfg.checkpoint:
            from .checkpoint import apply_checkpoint
            apply_checkpoint(model, cfg.checkpoint_info(model.config))
        model.to(get_accelerator().current_device_name())
        virtualize(model, cfg.tp_size, blocks, tp_grain_size=cfg.tp_grain_size)
        return Runner(model, model, tok, cfg, blocks, "virtual")
    engine = init_inference(model, cfg)
    return Runner(engine, engine.module, tok, cfg, blocks, "tp")
