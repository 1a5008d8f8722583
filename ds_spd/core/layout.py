"""How a model's heads and MLP columns are split over tensor-parallel ranks.

Up to the KV-head count the split is DeepSpeed AutoTP's own shard-size logic (`get_shard_size_list`), so the
virtual-TP simulation and the real sharded engine always agree, uneven GQA splits included (SmolLM2: 9 query
/ 3 KV heads on 2 ranks -> 6 + 3 query heads).

Beyond it, KV heads are replicated (vLLM's rule): tp must be a multiple of the KV-head count, ``tp / kv``
consecutive ranks share one KV head (each holds a copy of its K/V projections and cache) and split that head's
query heads among them, as evenly as possible (SmolLM2 at tp 6: 2 + 1 query heads per KV head). AutoTP would
give all of attention to the first ranks there, so ds_spd shards attention itself (ds_spd.core.replicate).
"""
from __future__ import annotations

from dataclasses import dataclass

from ds_spd.errors import LayoutError

#: DeepSpeed's default ``tensor_parallel.tp_grain_size`` (DeepSpeedTPConfig; a test keeps them equal). Kept
#: here as a number so that reading configs and plans does not import DeepSpeed.
DEFAULT_TP_GRAIN_SIZE = 64


def check_architecture(config) -> None:
    """Refuse a model family without an adapter (ds_spd.models.adapters), naming the supported ones."""
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
    kv_replicas: int = 1   # ranks sharing one KV head (1: every rank holds whole KV heads of its own)

    @property
    def unit_heads(self) -> int:
        """Query heads that move together when heads are regrouped (head grouping): a whole KV group when every
        rank holds its own KV heads, one query head when ranks share a replicated KV head."""
        return 1 if self.kv_replicas > 1 else self.q_heads[0] // self.kv_heads[0]

    def q_head_range(self, rank: int) -> tuple[int, int]:
        """The query heads [start, stop) rank ``rank`` holds."""
        start = sum(self.q_heads[:rank])
        return start, start + self.q_heads[rank]

    def kv_head_range(self, rank: int) -> tuple[int, int]:
        """The KV heads [start, stop) rank ``rank`` holds (under replication, one head shared with others)."""
        if self.kv_replicas > 1:
            head = rank // self.kv_replicas
            return head, head + 1
        start = sum(self.kv_heads[:rank])
        return start, start + self.kv_heads[rank]

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
        from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list
        meta = AutoTPMeta.from_model_config(config, tp_grain_size)
        mlp = get_shard_size_list(config.intermediate_size, tp_size, meta, "mlp.down_proj")
        group = n_heads // n_kv
        if tp_size > n_kv:
            replicas = _replicas(tp_size, n_heads, n_kv)
            per_rank = [group // replicas + (i < group % replicas) for i in range(replicas)]
            layout = cls(tp_size, head_dim, tuple(per_rank * n_kv), (1,) * tp_size, tuple(mlp), replicas)
        else:
            attn = get_shard_size_list(n_heads * head_dim, tp_size, meta, "self_attn.o_proj")
            kv = get_shard_size_list(n_kv * head_dim, tp_size, meta, "self_attn.k_proj")
            layout = cls(tp_size, head_dim, tuple(a // head_dim for a in attn), tuple(k // head_dim for k in kv),
                         tuple(mlp))
        if (layout.kv_replicas == 1 and any(q != k * group for q, k in zip(layout.q_heads, layout.kv_heads))) \
                or 0 in mlp:
            raise LayoutError(f"tp size {tp_size} splits this model unevenly in a way ds_spd cannot run: "
                              f"query heads {layout.q_heads}, KV heads {layout.kv_heads}, MLP columns {mlp}")
        return layout


def _replicas(tp_size: int, n_heads: int, n_kv: int) -> int:
    """How many ranks share each KV head at ``tp_size`` > KV heads; refuses sizes replication cannot serve."""
    if tp_size % n_kv:
        multiples = ", ".join(str(n_kv * m) for m in range(2, 5))
        raise LayoutError(f"tp size {tp_size} cannot split this model: it has {n_kv} KV heads, so tp must be at most "
                          f"{n_kv} (whole KV heads per rank) or a multiple of {n_kv} (each KV head replicated on "
                          f"tp/{n_kv} ranks: {multiples}, ...)")
    replicas, group = tp_size // n_kv, n_heads // n_kv
    if replicas > group:
        raise LayoutError(f"tp size {tp_size} cannot split this model: each of its {n_kv} KV heads has {group} query "
                          f"heads, fewer than the {replicas} ranks that would share it (choose tp <= {n_heads})")
    return replicas
