"""The SPD checkpoint: a directory loadable on top of the base model, never pickle.

    plan.json                the plan (SPD blocks, classes, head permutations) it was trained for
    spd_blocks.safetensors   the changed blocks' weights, under their HF names (model.layers.N....)
    config.json              the base model's HF config
    provenance.json          what produced it: settings, losses, versions

Written into a temporary directory and renamed into place, so an interrupted save leaves nothing half-done.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import PlanError
from .plan import Plan, load_plan

WEIGHTS = "spd_blocks.safetensors"


def save_checkpoint(path: str, plan: Plan, block_states: dict[int, dict[str, torch.Tensor]], model_config,
                    provenance: dict) -> str:
    tmp = f"{path.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {f"model.layers.{i}.{name}": t.detach().to("cpu", torch.float32).contiguous()
               for i, state in block_states.items() for name, t in state.items()}
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "ds_spd.checkpoint/1"})
    plan.save(os.path.join(tmp, "plan.json"))
    model_config.to_json_file(os.path.join(tmp, "config.json"))
    with open(os.path.join(tmp, "provenance.json"), "w") as f:
        json.dump(provenance, f, indent=2, default=str)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_checkpoint_plan(path: str, model_config, tp_size: int) -> Plan:
    """The checkpoint's plan, after checking that it was made for this model and tp size."""
    if not os.path.isfile(os.path.join(path, WEIGHTS)):
        raise PlanError(f"{path!r} is not an SPD checkpoint (no {WEIGHTS})")
    plan = load_plan(os.path.join(path, "plan.json"))
    try:
        return plan.check_compatible(model_config, tp_size)
    except PlanError as err:
        raise PlanError(f"SPD checkpoint {path!r}: {err}") from None


def apply_checkpoint(model: nn.Module, path: str, tp_size: int, spd_blocks=None) -> list[int]:
    """Load the distilled weights of the checkpoint's blocks that are in SPD form (``spd_blocks``, default:
    the checkpoint plan's) into ``model``, before TP sharding, so AutoTP shards the distilled weights.

    A distilled block is trained for SPD form only, so blocks left in TP form keep their original weights.
    Returns the blocks whose weights were replaced.
    """
    plan = load_checkpoint_plan(path, model.config, tp_size)
    chosen = set(plan.spd_blocks if spd_blocks is None else spd_blocks)
    tensors = {k: t for k, t in load_file(os.path.join(path, WEIGHTS)).items() if int(k.split(".")[2]) in chosen}
    own = model.state_dict()
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise PlanError(f"SPD checkpoint has weights the model lacks: {unknown[:3]}")
    bad = [k for k, t in tensors.items() if own[k].shape != t.shape]
    if bad:
        raise PlanError(f"SPD checkpoint weight shapes differ from the model's: {bad[:3]}")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t.to(own[k].dtype))
    return sorted({int(k.split(".")[2]) for k in tensors})
