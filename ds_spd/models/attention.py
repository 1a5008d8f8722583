"""One-query attention on the KV heads, also inside ``torch.compile``.

For a decode step (one query per row) HF's SDPA attention folds a KV head's query group into the query-length
axis (``pack_gqa``) so that keys and values are read once, not copied per query head (``repeat_kv``) -- but only
outside ``torch.compile``; a compiled step copies every layer's cached keys and values per group, which made the
compiled serving step slower than the eager one at long contexts (scripts/experiments/decode_shapes.py). This
attention implementation packs under the compiler too and is HF's SDPA attention otherwise; a model uses it
through :func:`use_packed_decode_attention` (a registered ``attn_implementation``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "ds_spd_sdpa"


def packed_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """HF's attention-function signature: ``[B, H, 1, D]`` queries over ``[B, KV, S, D]`` keys with the groups
    packed (a mask ``[B, 1, 1, S]`` broadcasts over them); any other call goes to HF's SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or kwargs.get("softcap") is not None or dropout or \
            kwargs.get("position_bias") is not None or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, _, d = query.shape
    out = F.scaled_dot_product_attention(query.reshape(b, h // groups, groups, d), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_packed_decode_attention(model: torch.nn.Module) -> None:
    """Register the implementation and switch ``model``'s attention to it (its masks stay SDPA's): every config the
    model's modules hold (a TP rank's attention may hold a localized copy, ds_spd.models.adapters)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, packed_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        config._attn_implementation = NAME
