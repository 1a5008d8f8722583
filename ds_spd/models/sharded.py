"""Sharded loading: each TP rank reads only its own slices of the weights, straight from safetensors.

The model is built on the meta device (parameters only; buffers such as rotary frequencies are computed
for real and kept), DeepSpeed AutoTP shards the meta model (so the modules, ``mp_group`` and uneven GQA
splits are exactly AutoTP's), DeepSpeed allocates the rank's shards (``to_empty``), and then every
parameter is filled from the files with the slice AutoTP itself recorded on it (DeepSpeed's
universal-checkpoint metadata: partition dim, per-rank sizes, fused sub-parameter widths). No rank holds
the full weights at any time: each tensor is read through ``safe_open(...).get_slice`` (a memory map;
only the rank's rows or columns are touched) and the file is closed after each tensor.

The SPD checkpoint's distilled blocks are overlaid in the same pass: a parameter stored in the checkpoint
is sliced from there instead of from the base model's files.

Before anything is allocated, :func:`check_weight_files` reads the headers only: every shard file the
index names exists and is readable, every parameter the model has is stored (tied ``lm_head`` excepted)
with the shape the config implies.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ds_spd.errors import DataError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class WeightFiles:
    """Where each stored tensor lives (tensor name -> file path) and its shape, read from headers only."""

    files: dict[str, str]
    shapes: dict[str, tuple[int, ...]]

    def __contains__(self, name: str) -> bool:
        return name in self.files


def _header(path: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:   # SafetensorError, OSError
        raise DataError(f"weights file {path!r} is not a readable safetensors file: {err}") from None


def weight_files(model_dir: str) -> WeightFiles:
    """The safetensors tensors of an HF model directory: one ``model.safetensors`` or an index and its shards."""
    index = os.path.join(model_dir, INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"safetensors index {index!r} is unreadable or has no weight_map: {err}") from None
        files, shapes = {}, {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(model_dir, shard)
            if not os.path.isfile(path):
                named = sorted(k for k, v in weight_map.items() if v == shard)
                raise DataError(f"shard file {shard!r} named by {index!r} is missing "
                                f"({len(named)} tensors, e.g. {named[0]!r})")
            header = _header(path)
            for name in (k for k, v in weight_map.items() if v == shard):
                if name not in header:
                    raise DataError(f"{index!r} says {name!r} is in {shard!r}, but that file does not hold it")
                files[name], shapes[name] = path, header[name]
        return WeightFiles(files, shapes)
    single = os.path.join(model_dir, SINGLE)
    if os.path.isfile(single):
        header = _header(single)
        return WeightFiles({k: single for k in header}, header)
    raise DataError(f"model directory {model_dir!r} has no {SINGLE} or {INDEX}: sharded loading reads "
                    "safetensors weights only (load other formats with --load full)")


def model_weight_files(name: str) -> WeightFiles:
    """The safetensors files of a model (``default``, a local directory or a hub id), headers only."""
    from ds_spd.models.loading import local_model_dir
    return weight_files(local_model_dir(name))


def source_name(name: str, stored: WeightFiles, tied: bool) -> str | None:
    """The stored tensor a model parameter is read from (``lm_head.weight`` of a tied model: the embedding)."""
    if name in stored:
        return name
    if tied and name.endswith("lm_head.weight"):
        return name.replace("lm_head.weight", "model.embed_tokens.weight")
    return None


def check_weight_files(model: nn.Module, stored: WeightFiles) -> None:
    """Every parameter of the (unsharded, meta) model is stored with its shape; headers only, nothing allocated."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing, wrong = [], []
    for name, p in model.named_parameters(remove_duplicate=False):
        src = source_name(name, stored, tied)
        if src is None:
            missing.append(name)
        elif stored.shapes[src] != tuple(p.shape):
            wrong.append(f"{src}: stored {stored.shapes[src]}, the config implies {tuple(p.shape)}")
    if missing:
        raise DataError(f"the model's weights do not hold {len(missing)} parameters the config needs, "
                        f"e.g. {missing[:3]}")
    if wrong:
        raise DataError(f"stored weights do not match the model config: {wrong[:3]}")


def meta_model(model_config, dtype: torch.dtype) -> nn.Module:
    """The model with parameters on the meta device and buffers computed for real (they are small)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    return model.eval()


def _rank_slices(meta: dict | tuple | None, tp_rank: int) -> tuple[int, list[tuple[int, int]]]:
    """(dim, [(start, stop), ...]) of the stored tensor that this rank holds; dim -1: the whole tensor. ``meta``:
    AutoTP's record, or the slices ds_spd cut itself (ds_spd.core.replicate)."""
    if isinstance(meta, tuple):
        return meta
    if not meta or meta.get("replicated") or meta.get("partition_dim") is None:
        return -1, []
    dim = meta["partition_dim"]
    widths = meta.get("sub_param_shard_widths")
    if widths:   # fused (q; k; v) or (gate; up): the rank's part of every sub-parameter, in order
        ranges, base = [], 0
        for w in widths:
            start = base + sum(w[:tp_rank])
            ranges.append((start, start + w[tp_rank]))
            base += sum(w)
        return dim, ranges
    sizes = meta["partition_sizes"]
    start = sum(sizes[:tp_rank])
    return dim, [(start, start + sizes[tp_rank])]


def _read(path: str, name: str, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:   # closed (unmapped) after each tensor: only this slice stays resident
        sl = f.get_slice(name)
        if dim < 0:
            return sl[:]
        index = (slice(None),) * dim
        return torch.cat([sl[index + (slice(a, b),)] for a, b in ranges], dim=dim)


@contextmanager
def materialising(model: nn.Module) -> Iterator[dict[str, dict | None]]:
    """Around ``deepspeed.init_inference`` of a meta model: yields {parameter name: AutoTP's layout record},
    captured when DeepSpeed materialises the sharded meta model (``to_empty`` makes new parameter objects,
    which drop the records); buffers computed at construction (rotary frequencies, embedding scales) are
    put back afterwards, since ``to_empty`` leaves them uninitialised."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    layouts: dict[str, dict | None] = {}
    original = model.to_empty

    def to_empty(*args, **kwargs):
        layouts.update({n: getattr(p, DS_AUTOTP_UC_META, None)
                        for n, p in model.named_parameters(remove_duplicate=False)})
        return original(*args, **kwargs)
    model.to_empty = to_empty
    try:
        yield layouts
    finally:
        del model.to_empty
    if not layouts:
        raise RuntimeError("DeepSpeed did not materialise the meta model with to_empty: this DeepSpeed version "
                           "loads meta models differently; use --load full")
    for name, buf in model.named_buffers():
        if name in saved:
            buf.data = saved[name].to(buf.device, buf.dtype if buf.is_floating_point() else saved[name].dtype)


def checkpoint_overlay(info) -> WeightFiles:
    """The distilled tensors of an SPD checkpoint (ds_spd.checkpoint.CheckpointInfo) this run loads: those of
    its ``weight_blocks`` (blocks left in TP form keep their original weights)."""
    from ds_spd.checkpoint import WEIGHTS, block_of
    path = os.path.join(info.path, WEIGHTS)
    chosen = set(info.weight_blocks)
    shapes = {k: v for k, v in _header(path).items() if block_of(k) in chosen}
    return WeightFiles({k: path for k in shapes}, shapes)


def fill_from_files(module: nn.Module, stored: WeightFiles, tp_rank: int, layouts: dict[str, dict | tuple | None],
                    overlay: WeightFiles | None = None, progress: bool = False) -> int:
    """Fill every parameter of an AutoTP-sharded, materialised model with this rank's slices (``layouts``:
    from :func:`materialising`); returns the bytes read. ``overlay`` (distilled SPD checkpoint tensors)
    replaces the base weights it holds."""
    from tqdm.auto import tqdm
    tied = bool(getattr(module.config, "tie_word_embeddings", False))
    params = list(module.named_parameters(remove_duplicate=False))
    done, nbytes = set(), 0
    with torch.no_grad():
        for name, p in tqdm(params, desc="loading shards", disable=not progress, leave=False):
            if id(p) in done:
                continue
            done.add(id(p))
            from_overlay = overlay is not None and name in overlay
            files = overlay if from_overlay else stored
            src = name if from_overlay else source_name(name, stored, tied)
            dim, ranges = _rank_slices(layouts.get(name), tp_rank)
            t = _read(files.files[src], src, dim, ranges)
            if tuple(t.shape) != tuple(p.shape):
                raise RuntimeError(f"{name}: read {tuple(t.shape)} for a rank shard of {tuple(p.shape)}")
            p.data.copy_(t.to(p.dtype))
            nbytes += t.numel() * t.element_size()
    return nbytes
