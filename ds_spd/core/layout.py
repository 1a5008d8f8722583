"""How a model's heads and MLP columns are split over tensor-parallel ranks.

The split is taken from DeepSpeed AutoTP's own shard-size logic (`get_shard_size_list`), so the
virtual-TP simulation and the real sharded engine always agree, uneven GQA splits included
(SmolLM2: 9 query / 3 KV heads on 2 ranks -> 6 + 3 query heads).
"""
from __future__ import annotations

from dataclasses import dataclass

from ds_spd.errors import LayoutError

#: DeepSpeed's default ``tensor_parallel.tp_grain_size`` (DeepSpeedTPConfig; a test keeps them equal). Kept
#: here as a number so that reading configs and plans does not import DeepSpeed.
DEFAULT_TP_GRAIN_SIZE = 64


def check_architecture(config) -> None:
    """Refuse a model family without an adapter (ds_spd.adapters), naming the supported ones."""
    from ds_spd.models.adapters import adapter_for
    adapter_for(config)


@dataclass(frozen=True)
class TPLayout:
    """Per-rank sizes of one decoder block: query heads, KV heads and MLP columns."""

    tp_size: int
    head_dim: int
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    mlp_cols: tuple[int, ...]

    @property
    def attn_cols(self) -> tuple[int, ...]:
        """Per-rank input columns of o_proj (heads x head_dim)."""
        return tuple(h * self.head_dim for h in self.q_heads)

    @classmethod
    def for_model(cls, config, tp_size: int, tp_grain_size: int = DEFAULT_TP_GRAIN_SIZE) -> "TPLayout":
        check_architecture(config)
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        if not isinstance(tp_size, int) or tp_size < 1:
            raise LayoutError(f"tp size must be a positive integer, got {tp_size!r}")
        if tp_size > n_kv:
            raise LayoutError(f"tp size {tp_size} cannot split this model: it has {n_kv} KV heads, so at most "
                              f"{n_kv} ranks can each hold whole KV heads (choose tp <= {n_kv})")
        from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list
        meta = AutoTPMeta.from_model_config(config, tp_grain_size)
        attn = get_shard_size_list(n_heads * head_dim, tp_size, meta, "self_attn.o_proj")
        kv = get_shard_size_list(n_kv * head_dim, tp_size, meta, "self_attn.k_proj")
        mlp = get_shard_size_list(config.intermediate_size, tp_size, meta, "mlp.down_proj")
        group = n_heads // n_kv
        layout = cls(tp_size, head_dim, tuple(a // head_dim for a in attn), tuple(k // head_dim for k in kv),
                     tuple(mlp))
        if any(q != k * group for q, k in zip(layout.q_heads, layout.kv_heads)) or 0 in mlp:
            raise LayoutError(f"tp size {tp_size} splits this model unevenly in a way ds_spd cannot run: "
                              f"query heads {layout.q_heads}, KV heads {layout.kv_heads}, MLP columns {mlp}")
        return layout
