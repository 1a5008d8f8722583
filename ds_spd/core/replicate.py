"""Attention sharded by ds_spd itself where DeepSpeed AutoTP cannot: tp above the KV-head count.

AutoTP splits q/k/v by whole KV heads; with fewer KV heads than ranks its shard sizes give all of attention
to the first ranks and empty shards to the rest, without an error. So before AutoTP runs, each rank's
attention projections are cut here to the rank's part of the layout (ds_spd.core.layout): its query heads'
rows of q and columns of o, and the rows of the one KV head it shares with ``kv_replicas - 1`` neighbours
(vLLM's replication: every replica holds a copy of that head's K/V projections, norms and cache). The cut
projections are :class:`RankLinear`, not ``nn.Linear``, so AutoTP leaves them as they are and shards only
the MLP and the head. The HF attention's derived counts follow the local heads.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ds_spd.core.layout import TPLayout

#: (dim, [(start, stop), ...]): the parts of a stored tensor one rank holds, concatenated along ``dim``
#: (dim -1: the whole tensor). What the sharded loader reads for a parameter cut here.
Slices = tuple[int, list[tuple[int, int]]]


class RankLinear(nn.Module):
    """One rank's part of a projection (rows of q/k/v, columns of o). Deliberately not an ``nn.Linear``:
    AutoTP shards every ``nn.Linear`` it finds again."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, rank part"


def _take(t: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim=dim).clone()


def attention_slices(adapter, layout: TPLayout, rank: int) -> dict[str, Slices]:
    """{projection name: slices of its weight} for ``rank``: rows (dim 0) of q, k, v (or the fused qkv), columns
    (dim 1) of o."""
    hd = layout.head_dim
    (q0, q1), (k0, k1) = layout.q_head_range(rank), layout.kv_head_range(rank)
    q_rows, kv_rows = (q0 * hd, q1 * hd), (k0 * hd, k1 * hd)
    out = {"o_proj": (1, [q_rows])}
    if adapter.qkv == "fused":
        n_q, n_kv = sum(layout.q_heads) * hd, (sum(layout.kv_heads) // layout.kv_replicas) * hd
        out["qkv_proj"] = (0, [q_rows, (n_q + kv_rows[0], n_q + kv_rows[1]),
                               (n_q + n_kv + kv_rows[0], n_q + n_kv + kv_rows[1])])
    else:
        out.update(q_proj=(0, [q_rows]), k_proj=(0, [kv_rows]), v_proj=(0, [kv_rows]))
    return out


def shard_attention(layers: nn.ModuleList, layout: TPLayout, rank: int, adapter,
                    prefix: str = "model.layers") -> dict[str, Slices]:
    """Cut every decoder block's attention to ``rank``'s part (in place; weights may be on the meta device) and
    return {parameter name (under ``prefix``): slices of the stored tensor} for the sharded loader."""
    slices = attention_slices(adapter, layout, rank)
    q_local = layout.q_heads[rank]
    kv_local = layout.kv_head_range(rank)[1] - layout.kv_head_range(rank)[0]
    record: dict[str, Slices] = {}
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        for name, (dim, ranges) in slices.items():
            lin = getattr(attn, name)
            # o_proj's bias stays whole (added once, after the reduce); q/k/v biases follow their rows
            bias = None if lin.bias is None else (lin.bias if dim == 1 else _take(lin.bias, 0, ranges))
            setattr(attn, name, RankLinear(_take(lin.weight, dim, ranges), bias))
            record[f"{prefix}.{i}.self_attn.{name}.weight"] = (dim, ranges)
            if lin.bias is not None:
                record[f"{prefix}.{i}.self_attn.{name}.bias"] = (-1, []) if dim == 1 else (0, ranges)
        attn.num_key_value_groups = q_local // kv_local      # HF's repeat_kv: local query heads per local KV head
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = kv_local
        if adapter.qkv == "fused":                            # Phi-3 cuts its fused output by the config's counts
            attn.config = copy.copy(attn.config)
            attn.config.num_attention_heads, attn.config.num_key_value_heads = q_local, kv_local
    return record
