"""The SPD decoder block: one block math, two reducers (docs/method.md section 1).

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
        if len(self.col_sizes) == 1:   # a real TP rank: one shard, no split/stack copies on the decode path
            return F.linear(heads, self.weight).unsqueeze(0)
        parts = heads.split(self.col_sizes, dim=-1)
        weights = self.weight.split(self.col_sizes, dim=1)
        return torch.stack([F.linear(p, w) for p, w in zip(parts, weights)])

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, shards={self.col_sizes}"


def _split(t: torch.Tensor | None, sizes: tuple[int, ...], dim: int) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if t is None else list(t.split(sizes, dim=dim))


#: Norms a decoder block may hold (pre-norm: the first two; sandwich: all four); kept under their HF names.
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


class SPDDecoderLayer(nn.Module):
    """A decoder block that can drop its attention sync (``spd=True``) or not.

    Built from an HF decoder layer (plain, or already sharded by DeepSpeed AutoTP): it takes over the
    layer's norms, attention and MLP weights; ``reduce`` is the communication (see ds_spd.comm); the
    family's adapter (ds_spd.models.adapters) says how to reach its projections and which block math applies.
    """

    def __init__(self, layer: nn.Module, attn_cols: tuple[int, ...], mlp_cols: tuple[int, ...], reduce,
                 spd: bool = False, layer_idx: int | None = None, adapter=None):
        super().__init__()
        if len(attn_cols) != len(mlp_cols):
            raise ValueError(f"attention shards {attn_cols} and MLP shards {mlp_cols} differ in count")
        if adapter is None:
            from ds_spd.models.adapters import ADAPTERS
            adapter = ADAPTERS["llama"]
        self.adapter = adapter
        for name in NORMS:
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))
        self.self_attn = layer.self_attn
        if len(attn_cols) == 1:   # a real TP rank (or tp 1)
            adapter.localize_attention(self.self_attn, attn_cols[0])
        o_proj = self.self_attn.o_proj
        self.self_attn.o_proj = ShardedOutProj(o_proj.weight, o_proj.bias, attn_cols)
        self.mlp = layer.mlp
        self.mlp_cols = tuple(mlp_cols)
        assert sum(self.mlp_cols) == self.mlp.down_proj.weight.shape[1], (self.mlp_cols, self.mlp.down_proj.weight.shape)
        self.reduce = reduce
        self.spd = spd
        #: in SPD form, the MLP input also reads the other ranks' attention output one position late (set through
        #: ds_spd.core.inject.set_lag: pre-norm blocks only)
        self.lag = False
        self.layer_idx = layer_idx if layer_idx is not None else getattr(layer.self_attn, "layer_idx", None)
        if hasattr(layer, "attention_type"):   # read by some model loops to pick the layer's mask
            self.attention_type = layer.attention_type
        # Stand-in for transformers' GradientCheckpointingLayer flag checked by some model loops.
        self.gradient_checkpointing = False

    @property
    def n_shards(self) -> int:
        return len(self.mlp_cols)

    @property
    def ffn_norm(self) -> nn.Module:
        return self.adapter.ffn_norm(self)

    def mlp_partials(self, u: torch.Tensor) -> torch.Tensor:
        """Stacked MLP partial outputs; shard s reads ``u[s]`` (or ``u[0]`` when u holds one shared input)."""
        act, cols = self.adapter.act(self.mlp), self.mlp_cols
        downs = _split(self.mlp.down_proj.weight, cols, 1)
        out = []
        for s, ((gw, gb, uw, ub), dw) in enumerate(zip(self.adapter.gate_up(self.mlp, cols), downs)):
            x = u[s if u.shape[0] > 1 else 0]
            out.append(F.linear(act(F.linear(x, gw, gb)) * F.linear(x, uw, ub), dw))
        return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("SPDDecoderLayer takes the decoder layer's arguments by keyword")
        x = hidden_states
        y, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)  # [S, B, T, d]
        if self.adapter.block == "sandwich":
            return self._sandwich(x, y)
        o_bias, d_bias = self.self_attn.o_proj.bias, self.mlp.down_proj.bias
        if self.spd:
            if self.lag:
                out = self._lagged(x, y, o_bias, kwargs.get("cache"))
            else:
                out = x + self.reduce(y + self._spd_mlp(x + y, o_bias), "spd")
            bias = (0 if o_bias is None else o_bias) + (0 if d_bias is None else d_bias)
            return out + bias if torch.is_tensor(bias) else out
        h = x + self.reduce(y, "attn")
        if o_bias is not None:
            h = h + o_bias
        out = h + self.reduce(self.mlp_partials(self.ffn_norm(h).unsqueeze(0)), "mlp")
        return out if d_bias is None else out + d_bias

    def _spd_mlp(self, u: torch.Tensor, o_bias) -> torch.Tensor:
        """Each rank's MLP partial on its own input ``u`` (X + Y_r, and in a lagged block + O_r(t-1)); the o_proj
        bias enters it as it enters the original block's MLP input."""
        return self.mlp_partials(self.ffn_norm(u if o_bias is None else u + o_bias))

    def _lagged(self, x: torch.Tensor, y: torch.Tensor, o_bias, cache) -> torch.Tensor:
        """SPD with the other ranks' attention output one position late (docs/method.md, "Lagged attention"):
        Z_r = MLP_r(Norm2(X + Y_r + O_r(t-1))), O_r = sum_s Y_s - Y_r, zero before a sequence's first position.
        One token (decode): O_r(t-1) is the state the cache kept from the step before, and the one sync carries
        [Y_r + Z_r, Y_r], which gives the next step's state. Several (prefill, a full sequence): the attention
        sync gives every position's sum, then the block's own (two syncs, as TP). The state lives in the cache: one
        with ``lag_read`` / ``lag_write`` keeps it by row where a forward can start (serve's slot cache), any other
        on the cache object (``cache.spd_lag``, by block: the last position of its one batch); without a cache
        every forward starts a sequence."""
        state = _lag_read(cache, self.layer_idx)
        if y.shape[-2] == 1:
            z = self._spd_mlp(x + y if state is None else x + y + state, o_bias)
            out, y_sum = self.reduce(torch.cat([y + z, y], dim=-1), "spd").split(x.shape[-1], dim=-1)
            out, others = x + out, y_sum - y
        else:
            y_sum = self.reduce(y.clone(), "attn")   # a real rank's all-reduce sums in place; Y_r is needed after
            others = y_sum - y
            first = torch.zeros_like(others[..., :1, :]) if state is None else state
            lag = torch.cat([first, others[..., :-1, :]], dim=-2)
            z = self._spd_mlp(x + y + lag, o_bias)
            out = x + self.reduce(y + z, "spd")
        if cache is not None:
            _lag_write(cache, self.layer_idx, others)
        return out

    def _sandwich(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Norms on the attention and MLP outputs (Gemma 2/3; no biases); SPD as defined in ds_spd.models.adapters."""
        norm_a, norm_o = self.post_attention_layernorm, self.post_feedforward_layernorm
        if self.spd:
            z = self.mlp_partials(self.ffn_norm(x + norm_a(y)))        # rank-local: Na(Y_r)
            both = self.reduce(torch.cat([y, z], dim=-1), "spd")       # one sync carries [Y_r, Z_r]
            y_sum, z_sum = both.split(x.shape[-1], dim=-1)
            return x + norm_a(y_sum) + norm_o(z_sum)
        h = x + norm_a(self.reduce(y, "attn"))
        return h + norm_o(self.reduce(self.mlp_partials(self.ffn_norm(h).unsqueeze(0)), "mlp"))

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, spd={self.spd}, shards={self.n_shards}, family={self.adapter.name}"


def _lag_read(cache, layer_idx: int) -> torch.Tensor | None:
    """A lagged block's state before a forward's first new position, ``[S, B, 1, d]``: the other ranks' attention
    output there (zero before a sequence's first position; None: zero for every row)."""
    if cache is None:
        return None
    if hasattr(cache, "lag_read"):
        return cache.lag_read(layer_idx)
    return cache.__dict__.setdefault("spd_lag", {}).get(layer_idx)


def _lag_write(cache, layer_idx: int, others: torch.Tensor) -> None:
    """Keep the other ranks' attention output of a forward's new positions (``[S, B, T, d]``) for the next."""
    if hasattr(cache, "lag_write"):
        cache.lag_write(layer_idx, others)
    else:
        cache.__dict__.setdefault("spd_lag", {})[layer_idx] = others[..., -1:, :]
