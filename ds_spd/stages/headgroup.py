"""Head-grouping (HG) initialisation for extremely sensitive blocks (docs/method.md section 4).

In an SPD block the MLP slice of rank r sees only the heads of rank r, so which heads share a rank
matters. HG picks that assignment, then permutes the block's weights so that plain TP still computes
exactly the same function (the permutation only renames heads and MLP neurons):

1. head scattering: heads on one rank should be as *different* as possible: maximise the summed pairwise
   Euclidean distance between the heads' attention-score maps inside each rank's group. Under GQA the
   unit is a KV group (a KV head with its query heads): query heads never leave their KV head. Where ranks
   share a replicated KV head (tp above the KV-head count), the unit is one query head, scattered among the
   ranks that hold its KV head; K/V are never split or moved.
2. MLP matching: give each head group the MLP slice whose output norm on that group's partial residual
   is largest: an N x N assignment problem (Hungarian algorithm, scipy's linear_sum_assignment). Or, beyond
   the paper (``mlp_matching="neuron"``, docs/method.md section 6), each neuron to the rank where its SPD
   activation stays closest to its TP one: it also acts where every rank holds one KV head.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ds_spd.core.layout import TPLayout

_EXHAUSTIVE_LIMIT = 50_000


@dataclass(frozen=True)
class HeadGrouping:
    """KV units per rank (in rank order), the original MLP slice each rank now holds, and the per-rank MLP
    widths (the layout's, which depend on DeepSpeed's tp_grain_size) the slices refer to."""

    groups: tuple[tuple[int, ...], ...]
    mlp_slices: tuple[int, ...]
    mlp_cols: tuple[int, ...] = ()
    mlp_neurons: tuple[int, ...] = ()   # neuron matching: the original neuron at each position (else by slice)

    @property
    def mlp_permutation(self) -> list[int]:
        """What the plan records: the neuron order (neuron matching) or the slice each rank holds."""
        return list(self.mlp_neurons or self.mlp_slices)

    def to_json(self) -> list:
        return [list(map(list, self.groups)), list(self.mlp_slices), list(self.mlp_cols), list(self.mlp_neurons)]

    @classmethod
    def from_json(cls, v: list) -> "HeadGrouping":
        return cls(tuple(map(tuple, v[0])), tuple(v[1]), tuple(v[2]), tuple(v[3]) if len(v) > 3 else ())

    @property
    def kv_order(self) -> list[int]:
        return [u for g in self.groups for u in g]


def _adapter(layer: nn.Module):
    from ds_spd.models.adapters import adapter_for
    return getattr(layer, "adapter", None) or adapter_for(layer.self_attn.config)


@torch.no_grad()
def attention_maps(layer: nn.Module, rotary: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean softmax attention map of every query head on block inputs ``x`` [B, T, d]: [H, T, T]."""
    adapter, attn = _adapter(layer), layer.self_attn
    q, k = adapter.qk(attn, layer.input_layernorm(x))
    kwargs = attention_kwargs(rotary, x, layer)
    cos, sin = kwargs["position_embeddings"]
    q, k = adapter.apply_rotary(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    cap = getattr(attn.config, "attn_logit_softcapping", None)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    return (scores + kwargs["attention_mask"][0]).softmax(-1).mean(0)


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
    """For rank r (holding head group r), the original MLP slice that maximises the norm of the slice's output
    on rank r's SPD MLP input (pre-norm: Norm2(X + Y_r); sandwich: Nf(X + Na(Y_r)))."""
    from scipy.optimize import linear_sum_assignment
    adapter, attn, mlp = _adapter(layer), layer.self_attn, layer.mlp
    hd, group = attn.head_dim, layout.unit_heads
    heads = _head_outputs(layer, rotary, x)  # [B, T, H*hd] before o_proj
    n = layout.tp_size
    slices = adapter.gate_up(mlp, layout.mlp_cols)
    downs = mlp.down_proj.weight.split(layout.mlp_cols, dim=1)
    act = adapter.act(mlp)
    cost = torch.full((n, n), -1e30, dtype=torch.float64)
    for r, units in enumerate(groups):
        cols = [c for u in units for h in range(u * group, (u + 1) * group) for c in range(h * hd, (h + 1) * hd)]
        y = heads[..., cols] @ attn.o_proj.weight[:, cols].T
        if adapter.block == "sandwich":
            y = layer.post_attention_layernorm(y)
        u = adapter.ffn_norm(layer)(x + y)
        for s, ((gw, gb, uw, ub), dw) in enumerate(zip(slices, downs)):
            if layout.mlp_cols[s] != layout.mlp_cols[r]:
                continue  # a rank keeps its MLP width
            out = F.linear(act(F.linear(u, gw, gb)) * F.linear(u, uw, ub), dw)
            cost[r, s] = out.norm(dim=-1).mean().item()
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    return tuple(int(c) for _, c in sorted(zip(rows, cols)))


@torch.no_grad()
def match_neurons(layer: nn.Module, rotary: nn.Module, x: torch.Tensor, groups, layout: TPLayout) -> tuple[int, ...]:
    """Neuron-level MLP matching: every MLP neuron goes to the rank on which its SPD contribution stays
    closest to its TP one. Neuron j's error on rank r is ``||W_down[:, j]||^2 * mean_t (a_j(u_r) - a_j(u))^2``
    (a_j: its gated activation; u: the TP block's MLP input, u_r: rank r's SPD MLP input), and neurons are
    assigned under the ranks' widths to minimise the summed error (a transportation problem: at tp 2 exact by a
    sort on the cost difference; above, exact by the Hungarian algorithm on neuron x slot, greedy by regret beyond
    4096 neurons). Unlike slice matching it
    acts where every rank holds one KV head (head scattering is then the identity). Returns the original
    neuron at each position of the new order."""
    adapter, attn, mlp = _adapter(layer), layer.self_attn, layer.mlp
    hd, group = attn.head_dim, layout.unit_heads
    heads = _head_outputs(layer, rotary, x)
    (gw, gb, uw, ub), = adapter.gate_up(mlp, (sum(layout.mlp_cols),))
    act, down = adapter.act(mlp), mlp.down_proj.weight

    def acts(y: torch.Tensor) -> torch.Tensor:
        if adapter.block == "sandwich":
            y = layer.post_attention_layernorm(y)
        u = adapter.ffn_norm(layer)(x + y)
        return act(F.linear(u, gw, gb)) * F.linear(u, uw, ub)    # [B, T, I]
    full = acts(heads @ attn.o_proj.weight.T)
    weight = down.double().pow(2).sum(0)                         # ||W_down[:, j]||^2
    cost = torch.empty(full.shape[-1], len(groups), dtype=torch.float64)
    for r, units in enumerate(groups):
        cols = [c for u in units for h in range(u * group, (u + 1) * group) for c in range(h * hd, (h + 1) * hd)]
        err = (acts(heads[..., cols] @ attn.o_proj.weight[:, cols].T) - full).double().pow(2).mean((0, 1))
        cost[:, r] = weight * err
    return _assign(cost, layout.mlp_cols)


def _assign(cost: torch.Tensor, widths: tuple[int, ...]) -> tuple[int, ...]:
    """Items (rows) to bins (columns) with ``widths[r]`` items each, minimising the summed cost; the items
    of bin 0, then bin 1, ... (each bin's in ascending order)."""
    n = cost.shape[0]
    bin_of = [r for r, w in enumerate(widths) for _ in range(w)]
    if len(widths) == 2:   # tp 2, exact: bin 0 takes the items that gain most by it (a sort, not O(n^3))
        first = set((cost[:, 0] - cost[:, 1]).argsort(stable=True)[:widths[0]].tolist())
        chosen = {i: 0 if i in first else 1 for i in range(n)}
    elif n <= 4096:
        from scipy.optimize import linear_sum_assignment
        rows, slots = linear_sum_assignment(cost[:, bin_of].numpy())
        chosen = {int(i): bin_of[s] for i, s in zip(rows, slots)}
    else:   # greedy by regret: the items that lose most by not getting their best bin go first
        best2 = cost.topk(min(2, cost.shape[1]), dim=1, largest=False).values
        regret = best2[:, -1] - best2[:, 0]
        left, chosen = list(widths), {}
        for i in regret.argsort(descending=True).tolist():
            r = min((r for r in range(len(widths)) if left[r]), key=lambda r: cost[i, r].item())
            chosen[i], left[r] = r, left[r] - 1
    return tuple(i for r in range(len(widths)) for i in range(n) if chosen[i] == r)


def _head_outputs(layer: nn.Module, rotary: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Concatenated per-head attention outputs (the o_proj input) of ``layer`` on ``x``."""
    captured = {}
    handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
    try:
        layer.self_attn(hidden_states=layer.input_layernorm(x), **attention_kwargs(rotary, x, layer))
    finally:
        handle.remove()
    return captured["h"]


def attention_kwargs(rotary: nn.Module, x: torch.Tensor, layer: nn.Module | None = None) -> dict:
    """Keyword arguments for calling a decoder layer (or its attention) directly on block inputs ``x``:
    rotary embeddings, positions and an additive causal mask [1, 1, T, T] (eager and sdpa both honour it).
    With ``layer``: that layer's rotary variant and, for a sliding-window layer, its window (Gemma 2/3)."""
    from ds_spd.models.adapters import ModelAdapter, layer_type
    t = x.shape[1]
    pos = torch.arange(t, device=x.device).unsqueeze(0)
    kind, window = None, None
    if layer is not None:
        config = layer.self_attn.config
        kind = layer_type(config, layer.self_attn.layer_idx)
        window = getattr(config, "sliding_window", None) if kind == "sliding_attention" else None
    return {"position_embeddings": ModelAdapter.position_embeddings(rotary, x, pos, kind),
            "attention_mask": ModelAdapter.causal_mask(t, x.dtype, x.device, window), "position_ids": pos}


def find_grouping(layer: nn.Module, rotary: nn.Module, x: torch.Tensor, layout: TPLayout,
                  mlp_matching: str = "slice") -> HeadGrouping:
    """Head scattering then MLP matching (by slice, the paper's; or by neuron) on calibration block inputs ``x``."""
    maps = attention_maps(layer, rotary, x)                     # [H, T, T]
    units = maps.reshape(-1, layout.unit_heads * maps.shape[-1] * maps.shape[-2]).double()  # one row per unit
    dist = torch.cdist(units, units)
    if layout.kv_replicas > 1:   # each KV head's query heads, scattered among the ranks sharing that head
        rep, groups = layout.kv_replicas, []
        for first in range(0, layout.tp_size, rep):
            heads = list(range(layout.q_head_range(first)[0], layout.q_head_range(first + rep - 1)[1]))
            local = scatter_heads(dist[heads][:, heads], layout.q_heads[first:first + rep])
            groups += [tuple(heads[u] for u in g) for g in local]
        groups = tuple(groups)
    else:
        groups = scatter_heads(dist, layout.kv_heads)
    if mlp_matching == "neuron":
        return HeadGrouping(groups, tuple(range(layout.tp_size)), layout.mlp_cols,
                            match_neurons(layer, rotary, x, groups, layout))
    return HeadGrouping(groups, match_mlp(layer, rotary, x, groups, layout), layout.mlp_cols)


@torch.no_grad()
def permute_block(layer: nn.Module, grouping: HeadGrouping, layout: TPLayout) -> None:
    """Reorder heads (by KV unit) and MLP neurons (by slice) in place; plain TP computes the same function."""
    held = getattr(layer, "mlp_cols", layout.mlp_cols)
    if tuple(held) != layout.mlp_cols or (grouping.mlp_cols and grouping.mlp_cols != layout.mlp_cols):
        raise ValueError(f"head grouping for MLP slices {grouping.mlp_cols or layout.mlp_cols} applied to a block "
                         f"whose ranks hold {tuple(held)} columns: build both from one TPLayout")
    hd, group = layer.self_attn.head_dim, layout.unit_heads
    if layout.kv_replicas > 1:   # units are query heads; the shared KV heads stay where they are
        kv_rows = torch.arange(sum(layout.kv_heads) // layout.kv_replicas * hd)
    else:
        kv_rows = torch.cat([torch.arange(u * hd, (u + 1) * hd) for u in grouping.kv_order])
    q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for u in grouping.kv_order
                        for h in range(u * group, (u + 1) * group)])
    if grouping.mlp_neurons:
        neurons = torch.tensor(grouping.mlp_neurons)
    else:
        bounds = [0, *itertools.accumulate(layout.mlp_cols)]
        neurons = torch.cat([torch.arange(bounds[s], bounds[s + 1]) for s in grouping.mlp_slices])
    _adapter(layer).permute(layer, q_rows, kv_rows, neurons)
