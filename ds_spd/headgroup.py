"""Head-grouping (HG) initialisation for extremely sensitive blocks (spd-method.md section 4).

In an SPD block the MLP slice of rank r sees only the heads of rank r, so which heads share a rank
matters. HG picks that assignment, then permutes the block's weights so that plain TP still computes
exactly the same function (the permutation only renames heads and MLP neurons):

1. head scattering: heads on one rank should be as *different* as possible: maximise the summed pairwise
   Euclidean distance between the heads' attention-score maps inside each rank's group. Under GQA the
   unit is a KV group (a KV head with its query heads): query heads never leave their KV head.
2. MLP matching: give each head group the MLP slice whose output norm on that group's partial residual
   is largest: an N x N assignment problem (Hungarian algorithm, scipy's linear_sum_assignment).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layout import TPLayout

_EXHAUSTIVE_LIMIT = 50_000


@dataclass(frozen=True)
class HeadGrouping:
    """KV units per rank (in rank order), the original MLP slice each rank now holds, and the per-rank MLP
    widths (the layout's, which depend on DeepSpeed's tp_grain_size) the slices refer to."""

    groups: tuple[tuple[int, ...], ...]
    mlp_slices: tuple[int, ...]
    mlp_cols: tuple[int, ...] = ()

    @property
    def kv_order(self) -> list[int]:
        return [u for g in self.groups for u in g]


@torch.no_grad()
def attention_maps(layer: nn.Module, rotary: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean softmax attention map of every query head on block inputs ``x`` [B, T, d]: [H, T, T]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    b, t, _ = h.shape
    hd = attn.head_dim
    q = attn.q_proj(h).view(b, t, -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, -1, hd).transpose(1, 2)
    cos, sin = attention_kwargs(rotary, x)["position_embeddings"]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1).mean(0)


def _partitions(units: list[int], sizes: tuple[int, ...]):
    if not sizes:
        yield ()
        return
    for first in itertools.combinations(units, sizes[0]):
        rest = [u for u in units if u not in first]
        for tail in _partitions(rest, sizes[1:]):
            yield (first, *tail)


def _n_partitions(n: int, sizes: tuple[int, ...]) -> int:
    total, left = 1, n
    for s in sizes:
        total *= math.comb(left, s)
        left -= s
    return total


def scatter_heads(dist: torch.Tensor, sizes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Split units 0..K-1 into groups of ``sizes`` maximising the summed within-group pairwise distance.

    Exhaustive for small K; otherwise a greedy start improved by pairwise swaps between groups.
    """
    k = dist.shape[0]
    assert sum(sizes) == k, (sizes, k)

    def value(groups):
        return sum(dist[a, b].item() for g in groups for a, b in itertools.combinations(g, 2))

    if _n_partitions(k, sizes) <= _EXHAUSTIVE_LIMIT:
        return max(_partitions(list(range(k)), tuple(sizes)), key=value)
    # round-robin start in order of decreasing total distance, then hill-climb with swaps
    order = sorted(range(k), key=lambda u: -dist[u].sum().item())
    groups = [[] for _ in sizes]
    for u in order:
        g = max((i for i in range(len(sizes)) if len(groups[i]) < sizes[i]),
                key=lambda i: sum(dist[u, v].item() for v in groups[i]))
        groups[g].append(u)
    best, improved = value(groups), True
    while improved:  # swap two units of different groups while that increases the objective
        improved = False
        for gi, gj in itertools.combinations(range(len(groups)), 2):
            for pa, pb in itertools.product(range(len(groups[gi])), range(len(groups[gj]))):
                groups[gi][pa], groups[gj][pb] = groups[gj][pb], groups[gi][pa]
                now = value(groups)
                if now > best + 1e-12:
                    best, improved = now, True
                else:
                    groups[gi][pa], groups[gj][pb] = groups[gj][pb], groups[gi][pa]
    return tuple(tuple(sorted(g)) for g in groups)


@torch.no_grad()
def match_mlp(layer: nn.Module, rotary: nn.Module, x: torch.Tensor, groups, layout: TPLayout) -> tuple[int, ...]:
    """For rank r (holding head group r), the original MLP slice that maximises ||MLP_slice(Norm2(X + Y_r))||."""
    from scipy.optimize import linear_sum_assignment
    attn, mlp = layer.self_attn, layer.mlp
    hd, group = attn.head_dim, layout.q_heads[0] // layout.kv_heads[0]
    heads = _head_outputs(layer, rotary, x)  # [B, T, H*hd] before o_proj
    n = layout.tp_size
    bounds = [0, *itertools.accumulate(layout.mlp_cols)]
    cost = torch.full((n, n), -1e30, dtype=torch.float64)
    for r, units in enumerate(groups):
        cols = [c for u in units for h in range(u * group, (u + 1) * group) for c in range(h * hd, (h + 1) * hd)]
        y = heads[..., cols] @ attn.o_proj.weight[:, cols].T
        u = layer.post_attention_layernorm(x + y)
        for s in range(n):
            if layout.mlp_cols[s] != layout.mlp_cols[r]:
                continue  # a rank keeps its MLP width
            sl = slice(bounds[s], bounds[s + 1])
            gate = F.linear(u, mlp.gate_proj.weight[sl], None if mlp.gate_proj.bias is None else mlp.gate_proj.bias[sl])
            up = F.linear(u, mlp.up_proj.weight[sl], None if mlp.up_proj.bias is None else mlp.up_proj.bias[sl])
            out = F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight[:, sl])
            cost[r, s] = out.norm(dim=-1).mean().item()
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    return tuple(int(c) for _, c in sorted(zip(rows, cols)))


def _head_outputs(layer: nn.Module, rotary: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Concatenated per-head attention outputs (the o_proj input) of ``layer`` on ``x``."""
    captured = {}
    handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
    try:
        layer.self_attn(hidden_states=layer.input_layernorm(x), **attention_kwargs(rotary, x))
    finally:
        handle.remove()
    return captured["h"]


def attention_kwargs(rotary: nn.Module, x: torch.Tensor) -> dict:
    """Keyword arguments for calling a decoder layer (or its attention) directly on block inputs ``x``:
    rotary embeddings, positions and an additive causal mask [1, 1, T, T] (eager and sdpa both honour it)."""
    t = x.shape[1]
    pos = torch.arange(t, device=x.device).unsqueeze(0)
    mask = torch.full((t, t), float("-inf"), dtype=x.dtype, device=x.device).triu(1)[None, None]
    return {"position_embeddings": rotary(x, pos), "attention_mask": mask, "position_ids": pos}


def find_grouping(layer: nn.Module, rotary: nn.Module, x: torch.Tensor, layout: TPLayout) -> HeadGrouping:
    """Head scattering then MLP matching for one block on calibration block inputs ``x``."""
    maps = attention_maps(layer, rotary, x)                     # [H, T, T]
    group = layout.q_heads[0] // layout.kv_heads[0]
    units = maps.reshape(-1, group * maps.shape[-1] * maps.shape[-2]).double()  # one row per KV unit
    dist = torch.cdist(units, units)
    groups = scatter_heads(dist, layout.kv_heads)
    return HeadGrouping(groups, match_mlp(layer, rotary, x, groups, layout), layout.mlp_cols)


@torch.no_grad()
def permute_block(layer: nn.Module, grouping: HeadGrouping, layout: TPLayout) -> None:
    """Reorder heads (by KV unit) and MLP neurons (by slice) in place; plain TP computes the same function."""
    attn, mlp = layer.self_attn, layer.mlp
    held = getattr(layer, "mlp_cols", layout.mlp_cols)
    if tuple(held) != layout.mlp_cols or (grouping.mlp_cols and grouping.mlp_cols != layout.mlp_cols):
        raise ValueError(f"head grouping for MLP slices {grouping.mlp_cols or layout.mlp_cols} applied to a block "
                         f"whose ranks hold {tuple(held)} columns: build both from one TPLayout")
    hd, group = attn.head_dim, layout.q_heads[0] // layout.kv_heads[0]
    kv_rows = torch.cat([torch.arange(u * hd, (u + 1) * hd) for u in grouping.kv_order])
    q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for u in grouping.kv_order
                        for h in range(u * group, (u + 1) * group)])
    bounds = [0, *itertools.accumulate(layout.mlp_cols)]
    neurons = torch.cat([torch.arange(bounds[s], bounds[s + 1]) for s in grouping.mlp_slices])

    def rows(linear, idx):
        linear.weight.data = linear.weight.data[idx].contiguous()
        if linear.bias is not None:
            linear.bias.data = linear.bias.data[idx].contiguous()

    rows(attn.q_proj, q_rows)
    rows(attn.k_proj, kv_rows)
    rows(attn.v_proj, kv_rows)
    attn.o_proj.weight.data = attn.o_proj.weight.data[:, q_rows].contiguous()
    rows(mlp.gate_proj, neurons)
    rows(mlp.up_proj, neurons)
    mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, neurons].contiguous()
