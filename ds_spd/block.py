"""The SPD decoder block: one block math, two reducers (spd-method.md section 1).

Standard TP block (two syncs)                 SPD block (one sync)
    Y_r = Attn_r(Norm1(X)) @ Wo_r                 Y_r = Attn_r(Norm1(X)) @ Wo_r
    H   = X + AllReduce(Y_r)                      Z_r = MLP_r(Norm2(X + Y_r))
    out = H + AllReduce(MLP_r(Norm2(H)))          out = X + AllReduce(Y_r + Z_r)

Every tensor indexed by r is held stacked as ``[S, ..., d]``: S = 1 on a real TP rank (its own shard,
reduced by an all-reduce), S = N in virtual TP (all shards in one process, reduced by a sum). Biases of
o_proj and down_proj are added once, after the reduce. Choice the paper leaves open: the o_proj bias
also enters each rank's MLP input (X + Y_r + b_o), as it does in the original block's MLP input.

The block keeps the HF module tree and parameter names (``self_attn.q_proj.weight``, ``mlp.up_proj.weight``,
...), so HF/DeepSpeed state dicts and our safetensors checkpoints line up one to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShardedOutProj(nn.Module):
    """o_proj without its all-reduce: one partial output per local shard of heads, stacked ``[S, ..., d]``."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, col_sizes: tuple[int, ...]):
        super().__init__()
        assert sum(col_sizes) == weight.shape[1], (col_sizes, tuple(weight.shape))
        self.weight, self.bias, self.col_sizes = weight, bias, tuple(col_sizes)

    def forward(self, heads: torch.Tensor) -> torch.Tensor:
        parts = heads.split(self.col_sizes, dim=-1)
        weights = self.weight.split(self.col_sizes, dim=1)
        return torch.stack([F.linear(p, w) for p, w in zip(parts, weights)])

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, shards={self.col_sizes}"


def _split(t: torch.Tensor | None, sizes: tuple[int, ...], dim: int) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if t is None else list(t.split(sizes, dim=dim))


class SPDDecoderLayer(nn.Module):
    """A LLaMA-shaped decoder block that can drop its attention sync (``spd=True``) or not.

    Built from an HF decoder layer (plain, or already sharded by DeepSpeed AutoTP): it takes over the
    layer's norms, attention and MLP weights; ``reduce`` is the communication (see ds_spd.comm).
    """

    def __init__(self, layer: nn.Module, attn_cols: tuple[int, ...], mlp_cols: tuple[int, ...], reduce,
                 spd: bool = False, layer_idx: int | None = None):
        super().__init__()
        if len(attn_cols) != len(mlp_cols):
            raise ValueError(f"attention shards {attn_cols} and MLP shards {mlp_cols} differ in count")
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.self_attn = layer.self_attn
        o_proj = self.self_attn.o_proj
        self.self_attn.o_proj = ShardedOutProj(o_proj.weight, o_proj.bias, attn_cols)
        self.mlp = layer.mlp
        self.mlp_cols = tuple(mlp_cols)
        assert sum(self.mlp_cols) == self.mlp.down_proj.weight.shape[1], (self.mlp_cols, self.mlp.down_proj.weight.shape)
        self.reduce = reduce
        self.spd = spd
        self.layer_idx = layer_idx if layer_idx is not None else getattr(layer.self_attn, "layer_idx", None)
        # Stand-in for transformers' GradientCheckpointingLayer flag checked by some model loops.
        self.gradient_checkpointing = False

    @property
    def n_shards(self) -> int:
        return len(self.mlp_cols)

    def mlp_partials(self, u: torch.Tensor) -> torch.Tensor:
        """Stacked MLP partial outputs; shard s reads ``u[s]`` (or ``u[0]`` when u holds one shared input)."""
        mlp, cols = self.mlp, self.mlp_cols
        gates = zip(_split(mlp.gate_proj.weight, cols, 0), _split(mlp.gate_proj.bias, cols, 0))
        ups = zip(_split(mlp.up_proj.weight, cols, 0), _split(mlp.up_proj.bias, cols, 0))
        downs = _split(mlp.down_proj.weight, cols, 1)
        out = []
        for s, ((gw, gb), (uw, ub), dw) in enumerate(zip(gates, ups, downs)):
            x = u[s if u.shape[0] > 1 else 0]
            out.append(F.linear(mlp.act_fn(F.linear(x, gw, gb)) * F.linear(x, uw, ub), dw))
        return torch.stack(out)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("SPDDecoderLayer takes the decoder layer's arguments by keyword")
        x = hidden_states
        y, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)  # [S, B, T, d]
        o_bias, d_bias = self.self_attn.o_proj.bias, self.mlp.down_proj.bias
        if self.spd:
            u = x + y if o_bias is None else x + y + o_bias
            z = self.mlp_partials(self.post_attention_layernorm(u))
            out = x + self.reduce(y + z, "spd")
            bias = (0 if o_bias is None else o_bias) + (0 if d_bias is None else d_bias)
            return out + bias if torch.is_tensor(bias) else out
        h = x + self.reduce(y, "attn")
        if o_bias is not None:
            h = h + o_bias
        out = h + self.reduce(self.mlp_partials(self.post_attention_layernorm(h).unsqueeze(0)), "mlp")
        return out if d_bias is None else out + d_bias

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, spd={self.spd}, shards={self.n_shards}"
