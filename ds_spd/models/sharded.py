"""Sharded loading: each TP rank reads only its own slices of the weights, straight from safetensors.

The model is built on the meta device (parameters only; buffers such as rotary frequencies are computed
for real and kept), DeepSpeed AutoTP shards the meta model (so the modules, ``mp_group`` and uneven GQA
splits are exactly AutoTP's), DeepSpeed allocates the rank's shards (``to_empty``), and then every
parameter is filled from the files with the slice AutoTP itself recorded on it (DeepSpeed's
universal-checkpoint metadata: partition dim, per-rank sizes, fused sub-parameter widths). No rank holds
the full weights at any time: each tensor is read through ds_spd.models.weights (a memory map; only the
rank's rows or columns are touched; the file is closed after each tensor).

The SPD checkpoint's distilled blocks are overlaid in the same pass (``WeightFiles.overlaid``): a parameter
stored in the checkpoint is sliced from there instead of from the base model's files.

Before anything is allocated, :func:`check_weight_files` reads the headers only: every shard file the
index names exists and is readable, every parameter the model has is stored (tied ``lm_head`` excepted)
with the shape the config implies.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ds_spd.errors import DataError
from ds_spd.models.weights import WeightFiles, source_name

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


def fill_from_files(module: nn.Module, stored: WeightFiles, tp_rank: int, layouts: dict[str, dict | tuple | None],
                    progress: bool = False) -> int:
    """Fill every parameter of an AutoTP-sharded, materialised model with this rank's slices (``layouts``:
    from :func:`materialising`); returns the bytes read. ``stored``: the base weights, with an SPD checkpoint's
    distilled tensors overlaid (:meth:`WeightFiles.overlaid`)."""
    from tqdm.auto import tqdm
    tied = bool(getattr(module.config, "tie_word_embeddings", False))
    params = list(module.named_parameters(remove_duplicate=False))
    done, nbytes = set(), 0
    with torch.no_grad():
        for name, p in tqdm(params, desc="loading shards", disable=not progress, leave=False):
            if id(p) in done:
                continue
            done.add(id(p))
            t = stored.read(source_name(name, stored, tied), *_rank_slices(layouts.get(name), tp_rank))
            if tuple(t.shape) != tuple(p.shape):
                raise RuntimeError(f"{name}: read {tuple(t.shape)} for a rank shard of {tuple(p.shape)}")
            p.data.copy_(t.to(p.dtype))
            nbytes += t.numel() * t.element_size()
    return nbytes
