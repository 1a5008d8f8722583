"""The SPD checkpoint: a directory loadable on top of the base model, never pickle.

    plan.json                the plan (SPD blocks, classes, head permutations) it was trained for
    spd_blocks.safetensors   the distilled (SB / ESB) blocks' weights, under their HF names (model.layers.N....),
                             and those of the blocks the end-to-end stage tuned beside them (its metadata's
                             ``tuned_blocks``: ``distill.kl_blocks`` all), each in the form the plan runs it in
    config.json              the base model's HF config
    provenance.json          what produced it: the run fingerprint, settings, losses, versions

Built beside its target and swapped in atomically (ds_spd.outputs.publish_dir): at every instant the path
holds the old or the new complete checkpoint. An existing directory that is not an SPD checkpoint is never
replaced. :func:`open_checkpoint` checks a checkpoint without reading its weights (plan, safetensors
header, tensors present against the plan's classes), so a bad one fails before a model is loaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ds_spd.errors import PlanError
from ds_spd.models.weights import WeightFiles, single_file
from ds_spd.outputs import check_output_dir, clean_stale, publish_dir, write_json
from ds_spd.plan import Plan, load_plan

WEIGHTS = "spd_blocks.safetensors"
FILES = ("plan.json", WEIGHTS, "config.json", "provenance.json")
FORMAT = "ds_spd.checkpoint/1"


def is_checkpoint(path: str) -> bool:
    """A directory ds_spd wrote as an SPD checkpoint (its plan and weights file are there)."""
    return os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(os.path.join(path, "plan.json"))


def check_checkpoint_target(path: str) -> str:
    """Before training: ``path`` is new, an empty directory, or an SPD checkpoint (replaced atomically)."""
    return check_output_dir(path, "checkpoint output", is_ours=is_checkpoint)


def save_checkpoint(path: str, plan: Plan, block_states: dict[int, dict[str, torch.Tensor]], model_config,
                    provenance: dict, tuned: list[int] = ()) -> str:
    """``tuned``: the blocks of ``block_states`` beyond the plan's distilled ones (tuned by the end-to-end stage in
    the form the plan runs them in), recorded in the weights file's metadata."""
    from safetensors.torch import save_file
    path = path.rstrip(os.sep)
    check_checkpoint_target(path)  # checked before the work too; the target may have changed since
    clean_stale(path, FILES)
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp)
    tensors = {f"model.layers.{i}.{name}": t.detach().to("cpu", torch.float32).contiguous()
               for i, state in block_states.items() for name, t in state.items()}
    metadata = {"format": FORMAT, **({"tuned_blocks": json.dumps(sorted(tuned))} if tuned else {})}
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata=metadata)
    plan.save(os.path.join(tmp, "plan.json"))
    model_config.to_json_file(os.path.join(tmp, "config.json"))
    write_json(os.path.join(tmp, "provenance.json"), provenance, "provenance/1")
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)  # an empty directory the user made for it
    return publish_dir(tmp, path)


def read_provenance(path: str) -> dict:
    try:
        with open(os.path.join(path, "provenance.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def checkpoint_files(path: str, blocks=None) -> WeightFiles:
    """The distilled tensors of the checkpoint at ``path`` (those of ``blocks`` only, if given), headers read."""
    stored = single_file(os.path.join(path, WEIGHTS), PlanError)
    if blocks is None:
        return stored
    chosen = set(blocks)
    return stored.subset(lambda name: block_of(name) in chosen)


def block_of(name: str) -> int:
    parts = name.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        raise ValueError(name)
    return int(parts[2])


def tuned_blocks(path: str) -> list[int]:
    """The blocks whose weights the checkpoint at ``path`` stores beyond its plan's distilled ones (its weights
    file's metadata; an unreadable list is a PlanError naming the file)."""
    from safetensors import safe_open
    file = os.path.join(path, WEIGHTS)
    try:
        with safe_open(file, "pt") as f:
            listed = (f.metadata() or {}).get("tuned_blocks")
        blocks = json.loads(listed) if listed else []
        if not all(isinstance(b, int) for b in blocks):
            raise ValueError(listed)
    except Exception as err:   # SafetensorError, OSError, a damaged list
        raise PlanError(f"SPD checkpoint file {file!r}: unreadable tuned_blocks metadata ({err})") from None
    return sorted(blocks)


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    plan: Plan
    spd_blocks: tuple[int, ...]       # the blocks this run puts in SPD form (the plan's, or a subset)
    weight_blocks: tuple[int, ...]    # the blocks whose stored weights are loaded: each where this run puts it in
    #                                   the form it was trained in (SPD for the plan's SPD blocks, TP for the others)


def open_checkpoint(path: str, model_config, tp_size: int, tp_grain_size: int | None = None,
                    spd_blocks=None) -> CheckpointInfo:
    """Check a checkpoint against the model, tp size and grain, and its tensors against its plan, without
    reading weights. ``spd_blocks`` picks a subset of the checkpoint's SPD blocks (others are refused)."""
    if not os.path.isdir(path):
        raise PlanError(f"SPD checkpoint {path!r} not found")
    if not is_checkpoint(path):
        raise PlanError(f"{path!r} is not an SPD checkpoint (no {WEIGHTS} and plan.json)")
    plan = load_plan(os.path.join(path, "plan.json"))
    try:
        plan.check_compatible(model_config, tp_size, tp_grain_size)
    except PlanError as err:
        raise PlanError(f"SPD checkpoint {path!r}: {err}") from None
    names = list(checkpoint_files(path).files)
    stray = [n for n in names if not _is_block_name(n)]
    if stray:
        raise PlanError(f"SPD checkpoint {path!r} holds tensors outside the decoder blocks: {stray[:3]}")
    stored = sorted({block_of(n) for n in names})
    tuned = tuned_blocks(path)
    if stored != sorted(set(plan.trained_blocks) | set(tuned)):
        raise PlanError(f"SPD checkpoint {path!r} does not match its plan: weights stored for blocks {stored}, "
                        f"the plan's distilled (SB/ESB) blocks are {sorted(plan.trained_blocks)}"
                        + (f" and the end-to-end stage tuned blocks {tuned}" if tuned else ""))
    per_block = {b: sorted(n.split(".", 3)[3] for n in names if block_of(n) == b) for b in stored}
    if len({tuple(v) for v in per_block.values()}) > 1:
        raise PlanError(f"SPD checkpoint {path!r}: blocks store different tensors: "
                        f"{ {b: len(v) for b, v in per_block.items()} }")
    available = plan.spd_blocks
    chosen = tuple(sorted(set(available if spd_blocks is None else spd_blocks)))
    outside = [b for b in chosen if b not in available]
    if outside:
        raise PlanError(f"blocks {outside} are not SPD blocks of checkpoint {path!r} (its SPD blocks: {available}); "
                        "with --checkpoint, --spd-blocks picks a subset of them")
    loaded = [b for b in stored if (b in chosen) == (b in available)]   # each in the form it was trained in
    return CheckpointInfo(path, plan, chosen, tuple(loaded))


def _is_block_name(name: str) -> bool:
    try:
        block_of(name)
        return True
    except ValueError:
        return False


def apply_checkpoint(model: nn.Module, info: CheckpointInfo) -> list[int]:
    """Load the stored weights of ``info.weight_blocks`` into ``model`` before TP sharding, so AutoTP shards
    them. A block's weights are trained for one form (a distilled block for SPD form), so a block this run puts
    in the other form keeps its original weights. Returns the blocks whose weights were replaced."""
    stored = checkpoint_files(info.path, info.weight_blocks)
    own = model.state_dict()
    unknown = [k for k in stored.files if k not in own]
    if unknown:
        raise PlanError(f"SPD checkpoint {info.path!r} has weights the model lacks: {unknown[:3]}")
    wrong = [f"{k} has shape {shape}, the model's is {tuple(own[k].shape)}" for k, shape in stored.shapes.items()
             if tuple(own[k].shape) != shape]
    if wrong:
        raise PlanError(f"SPD checkpoint {info.path!r}: {wrong[0]}")
    try:
        with torch.no_grad():
            for k in stored.files:
                own[k].copy_(stored.read(k).to(own[k].dtype))
    except Exception as err:   # SafetensorError, OSError: a file damaged past its header
        raise PlanError(f"SPD checkpoint file {os.path.join(info.path, WEIGHTS)!r} could not be read: {err}") from None
    return sorted(info.weight_blocks)


def read_block_states(path: str) -> dict[int, dict[str, torch.Tensor]]:
    """A checkpoint's weights for SPD form (its plan's SPD blocks) by block index (names inside the block), on
    the CPU: what a measurement that puts blocks in SPD form (ds_spd.core.inject.distilled_in) loads."""
    stored = checkpoint_files(path, load_plan(os.path.join(path, "plan.json")).spd_blocks)
    states: dict[int, dict[str, torch.Tensor]] = {}
    for name in stored.files:
        states.setdefault(block_of(name), {})[name.split(".", 3)[3]] = stored.read(name)
    return states
