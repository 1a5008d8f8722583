"""The one reader of safetensors weights: where each tensor lives and its shape (headers only), and the tensor or a
rank's slices of it, read on demand.

A model's files (one ``model.safetensors`` or an index and its shards) and an SPD checkpoint's distilled tensors
(ds_spd.checkpoint) are both :class:`WeightFiles`; :meth:`WeightFiles.overlaid` lays a checkpoint over the base
weights, so whoever reads a tensor (sharded loading, the layer-wise trainer and streamed scan, a full model's
checkpoint load, the learning-rate probe) gets the distilled one where there is one, through the same call.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

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

    def read(self, name: str, dim: int = -1, ranges: list[tuple[int, int]] = ()) -> torch.Tensor:
        """Tensor ``name``, or along ``dim`` the concatenation of its ``ranges`` (a rank's slices): only those
        are read (a memory map, closed after each tensor, so only this slice stays resident)."""
        from safetensors import safe_open
        with safe_open(self.files[name], "pt") as f:
            sl = f.get_slice(name)
            if dim < 0:
                return sl[:]
            index = (slice(None),) * dim
            return torch.cat([sl[index + (slice(a, b),)] for a, b in ranges], dim=dim)

    def overlaid(self, overlay: WeightFiles | None) -> WeightFiles:
        """These weights with ``overlay``'s tensors (an SPD checkpoint's) in place of the ones it holds."""
        if overlay is None:
            return self
        return WeightFiles({**self.files, **overlay.files}, {**self.shapes, **overlay.shapes})

    def subset(self, keep) -> WeightFiles:
        """The tensors whose names ``keep(name)`` accepts."""
        names = [k for k in self.files if keep(k)]
        return WeightFiles({k: self.files[k] for k in names}, {k: self.shapes[k] for k in names})


def header(path: str, error: type[Exception] = DataError) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one safetensors file; an unreadable file is ``error`` naming it."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:   # SafetensorError, OSError
        raise error(f"weights file {path!r} is not a readable safetensors file: {err}") from None


def single_file(path: str, error: type[Exception] = DataError) -> WeightFiles:
    shapes = header(path, error)
    return WeightFiles({k: path for k in shapes}, shapes)


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
            shard_header = header(path)
            for name in (k for k, v in weight_map.items() if v == shard):
                if name not in shard_header:
                    raise DataError(f"{index!r} says {name!r} is in {shard!r}, but that file does not hold it")
                files[name], shapes[name] = path, shard_header[name]
        return WeightFiles(files, shapes)
    single = os.path.join(model_dir, SINGLE)
    if os.path.isfile(single):
        return single_file(single)
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
