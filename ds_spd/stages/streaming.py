"""Streaming a model through its blocks: one block resident at a time, activations within a budget.

:class:`BlockSource` materialises a model's blocks one at a time (the full block, every virtual-TP shard)
from the safetensors files, on a skeleton built on the meta device; :class:`ActivationStore` holds the
activations at one block boundary for every calibration segment, in RAM while the rank's
:class:`ActivationBudget` allows, else in a file read and written per segment (plain positioned I/O, not a
memory map: a mapping's touched pages count toward the rank's resident set until unmapped). Layer-wise
distillation (ds_spd.stages.distill.layerwise) and the streamed scan (ds_spd.stages.scan) walk models this way.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ds_spd.core.block import SPDDecoderLayer
from ds_spd.core.comm import CommStats, VirtualReduce
from ds_spd.stages.headgroup import attention_kwargs


# ---------------------------------------------------------------- activations, in RAM or spilled to a file

def default_budget_bytes() -> int:
    """A quarter of the memory available now, shared by the ranks on this host."""
    return available_bytes() // 4


def available_bytes() -> int:
    """The memory available now (MemAvailable; 8 GiB if unknown), shared by the ranks on this host."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return (avail or 8 * 2**30) // local


class ActivationBudget:
    """Bytes of activations a rank may keep in RAM; what does not fit is spilled to files."""

    def __init__(self, total_bytes: int):
        self.total, self.left = int(total_bytes), int(total_bytes)
        self.spilled_bytes = 0

    def take(self, nbytes: int) -> bool:
        if nbytes <= self.left:
            self.left -= nbytes
            return True
        self.spilled_bytes += nbytes
        return False


class ActivationStore:
    """Activations ``[N, T, d]`` of one block boundary: a tensor in RAM, or a file read per segment."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, budget: ActivationBudget,
                 directory: str | None, name: str):
        self.shape, self.dtype = tuple(shape), dtype
        self.segment_bytes = shape[1] * shape[2] * dtype.itemsize
        self.nbytes = shape[0] * self.segment_bytes
        self.budget = budget
        self.in_ram = budget.take(self.nbytes) or directory is None
        self.path = None
        if self.in_ram:
            self.tensor = torch.empty(shape, dtype=dtype)
        else:
            os.makedirs(directory, exist_ok=True)
            self.path = os.path.join(directory, f"{name}.{os.getpid()}.act")
            with open(self.path, "wb") as f:
                f.truncate(self.nbytes)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.in_ram:
            return self.tensor[start:stop]
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), (stop - start) * self.segment_bytes, start * self.segment_bytes)
        return torch.frombuffer(bytearray(data), dtype=self.dtype).view(stop - start, *self.shape[1:])

    def write(self, start: int, values: torch.Tensor) -> None:
        values = values.detach().to("cpu", self.dtype).contiguous()
        if self.in_ram:
            self.tensor[start:start + values.shape[0]] = values
            return
        with open(self.path, "r+b") as f:
            os.pwrite(f.fileno(), values.view(torch.uint8).numpy().tobytes(), start * self.segment_bytes)

    def close(self) -> None:
        if self.in_ram:
            self.tensor = None
            self.budget.left += self.nbytes
        elif self.path and os.path.exists(self.path):
            os.remove(self.path)   # ds_spd's own spill file


# ---------------------------------------------------------------- the model, one block at a time

class ActivationStores:
    """New stores of one shape, sharing a budget and a spill directory (removed when empty and ours)."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, budget: ActivationBudget,
                 directory: str | None):
        self.shape, self.dtype, self.budget, self.directory = shape, dtype, budget, directory
        self._count = 0

    def new(self) -> ActivationStore:
        self._count += 1
        return ActivationStore(self.shape, self.dtype, self.budget, self.directory, f"act{self._count}")

    def remove_directory(self) -> None:
        """Remove the spill directory once its stores are closed (only if empty: never anything else)."""
        if self.directory and os.path.isdir(self.directory):
            try:
                os.rmdir(self.directory)
            except OSError:
                pass


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class _Capture(nn.Module):
    """Stands in for block 0: stops the model's forward and hands over block 0's input."""

    def forward(self, hidden_states, *args, **kwargs):
        raise _Captured(hidden_states)


class BlockSource:
    """A model's blocks materialised one at a time (the full block: every virtual-TP shard) from
    ``tensor(name)``, on a skeleton built on the meta device (rotary frequencies computed for real)."""

    def __init__(self, model_config, dtype: torch.dtype, tp_size: int, tp_grain_size: int,
                 tensor: Callable[[str], torch.Tensor], lag: bool = False):
        from ds_spd.core.layout import TPLayout
        from ds_spd.models.adapters import adapter_for
        from ds_spd.models.sharded import meta_model
        self.config, self.dtype, self.tensor, self.lag = model_config, dtype, tensor, lag
        self.adapter = adapter_for(model_config)
        self.layout = TPLayout.for_model(model_config, tp_size, tp_grain_size)
        self.skeleton = meta_model(model_config, dtype)
        self.rotary = self.skeleton.model.rotary_emb

    @classmethod
    def from_files(cls, model_config, weights, dtype: torch.dtype, tp_size: int, tp_grain_size: int,
                   lag: bool = False) -> "BlockSource":
        """Blocks read from safetensors files (ds_spd.models.weights.WeightFiles); ``lag``: their SPD form has
        lagged attention (ds_spd.core.block)."""
        from ds_spd.models.sharded import check_weight_files
        from ds_spd.models.weights import source_name
        tied = bool(getattr(model_config, "tie_word_embeddings", False))
        source = cls(model_config, dtype, tp_size, tp_grain_size,
                     lambda name: weights.read(source_name(name, weights, tied)), lag)
        check_weight_files(source.skeleton, weights)   # headers only: every tensor a block needs is stored
        return source

    @classmethod
    def from_model(cls, model: nn.Module, tp_size: int, tp_grain_size: int, lag: bool = False) -> "BlockSource":
        """Blocks of a model already in memory (tests, small models)."""
        state = model.state_dict()
        return cls(model.config, next(model.parameters()).dtype, tp_size, tp_grain_size, lambda name: state[name], lag)

    def _materialise(self, module: nn.Module, prefix: str) -> nn.Module:
        """A real copy of a skeleton module: parameters read, buffers (computed at construction) kept."""
        buffers = dict(module.named_buffers())
        real = copy.deepcopy(module).to_empty(device="cpu")
        with torch.no_grad():
            for name, p in real.named_parameters():
                p.copy_(self.tensor(prefix + name).to(p.dtype))
            for name, b in real.named_buffers():
                b.copy_(buffers[name])
        return real

    @torch.no_grad()
    def first_inputs(self, segments: torch.Tensor, batch_size: int, out: ActivationStore, shared: bool = False) -> None:
        """Block 0's inputs for every segment, by the model's own forward (embedding scale etc. included).
        ``shared``: every data-parallel rank needs all of them (see :func:`computed_batches`)."""
        inner = self.skeleton.model
        embed, layers = inner.embed_tokens, inner.layers
        inner.embed_tokens = self._materialise(embed, "model.embed_tokens.")
        inner.layers = nn.ModuleList([_Capture()])

        def embed_batch(b0: int, b1: int) -> torch.Tensor:
            try:
                self.skeleton(input_ids=segments[b0:b1], use_cache=False)
            except _Captured as c:
                return c.hidden
            raise RuntimeError("the model's forward did not reach its first block")
        try:
            for b0, values in computed_batches(segments.shape[0], batch_size, embed_batch, out, shared):
                out.write(b0, values)
        finally:
            inner.embed_tokens, inner.layers = embed, layers

    @contextmanager
    def head(self) -> Iterator[nn.Module]:
        """The model with no blocks (final norm, lm_head, soft-capping), its weights read for the duration: fed
        the last block's outputs as ``inputs_embeds`` (ds_spd.models.head scores them)."""
        inner = self.skeleton.model
        norm, lm_head, layers = inner.norm, self.skeleton.lm_head, inner.layers
        inner.norm, inner.layers = self._materialise(norm, "model.norm."), nn.ModuleList()
        self.skeleton.lm_head = self._materialise(lm_head, "lm_head.")
        try:
            yield self.skeleton
        finally:
            inner.norm, inner.layers, self.skeleton.lm_head = norm, layers, lm_head

    def block(self, i: int) -> SPDDecoderLayer:
        """Block ``i`` in TP form (virtual TP, every shard), its weights read now."""
        layer = self._materialise(self.skeleton.model.layers[i], f"model.layers.{i}.").eval()
        reduce = VirtualReduce(CommStats(timed=False))
        block = SPDDecoderLayer(layer, self.layout.attn_cols, self.layout.mlp_cols, reduce,
                                spd=False, layer_idx=i, adapter=self.adapter)
        block.lag = self.lag   # acts in SPD form only: the students and chain blocks copied from it carry it
        return block


@torch.no_grad()
def run_block(block: SPDDecoderLayer, rotary: nn.Module, inputs: ActivationStore, out: ActivationStore,
               batch_size: int, shared: bool = False) -> None:
    """``out`` = ``block`` applied to ``inputs``, batch by batch (``shared``: see :func:`computed_batches`)."""
    def apply(b0: int, b1: int) -> torch.Tensor:
        x = inputs.read(b0, b1)
        return block(x, **attention_kwargs(rotary, x, block))
    for b0, values in computed_batches(len(inputs), batch_size, apply, out, shared):
        out.write(b0, values)


def computed_batches(n: int, batch_size: int, compute: Callable[[int, int], torch.Tensor], like: ActivationStore,
                     shared: bool):
    """(start, values) of every batch of ``n`` segments. With ``shared`` under a data-parallel launcher, where
    every rank needs every segment's activations (distillation samples all of them), batch k is computed by
    rank k mod world only and broadcast as raw bytes, so the work is split and every rank holds the very same
    values; otherwise this rank computes every batch."""
    import torch.distributed as dist
    world = dist.get_world_size() if shared and dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    for k, b0 in enumerate(range(0, n, batch_size)):
        b1 = min(b0 + batch_size, n)
        if world == 1:
            yield b0, compute(b0, b1)
            continue
        owner = k % world
        values = (compute(b0, b1).detach().to("cpu", like.dtype).contiguous() if rank == owner else
                  torch.empty((b1 - b0, *like.shape[1:]), dtype=like.dtype))
        dist.broadcast(values.view(torch.uint8), src=owner)
        yield b0, values
