"""Model adapters: the one seam per model family (keyed by HF ``model_type``).

An adapter says how ds_spd reaches a family's decoder block: the layer class DeepSpeed's ``replace_module``
swaps, the q/k/v/o and MLP projections (separate or fused, sharded exactly as DeepSpeed AutoTP shards
them), the norms around attention and MLP, the rotary embedding, and which block math applies:

- ``pre_norm`` (LLaMA, Mistral, Qwen2/3, Gemma, Phi-3): the paper's block, docs/method.md section 1;
- ``sandwich`` (Gemma 2/3): a norm on the attention output and on the MLP output. SPD needs a definition
  here, because a norm of a partial sum is not the partial of a norm. Ours (rank-local):

      TP :  H = X + Na(ΣY_r);   Z_r = MLP_r(Nf(H));                 out = H + No(ΣZ_r)
      SPD:  U_r = X + Na(Y_r);  Z_r = MLP_r(Nf(U_r));  [ΣY, ΣZ] = AllReduce([Y_r, Z_r]);
            out = X + Na(ΣY) + No(ΣZ)

  Rank r feeds its MLP slice the normalised *partial* attention output (RMSNorm is scale-invariant up to
  eps, so Na(Y_r) is rank r's estimate of Na(ΣY)); the block output keeps the exact TP form, and the one
  all-reduce carries Y_r and Z_r together (one sync point, twice the bytes). With TP = 1 it is the
  original block.

Mixture-of-experts blocks are refused by name: under SPD each rank's router would see a different partial
input, so ranks could route a token to different experts (not defined by the paper; not supported).
Adding a family is one adapter here plus its tests (tests/test_families.py).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ds_spd.errors import LayoutError


@dataclass(frozen=True)
class ModelAdapter:
    name: str
    module: str                  # transformers.models.<module>.modeling_<module>
    layer_class: str             # the decoder-layer class in that module
    qkv: str = "separate"        # "separate": q_proj/k_proj/v_proj; "fused": qkv_proj rows (q; k; v)
    mlp: str = "gated"           # "gated": gate_proj/up_proj; "fused": gate_up_proj rows (gate; up)
    block: str = "pre_norm"      # "pre_norm" or "sandwich" (see the module docstring)

    # ---- classes and modules
    def modeling(self):
        return importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")

    def decoder_layer_class(self) -> type:
        return getattr(self.modeling(), self.layer_class)

    def apply_rotary(self, q, k, cos, sin):
        return self.modeling().apply_rotary_pos_emb(q, k, cos, sin)

    @staticmethod
    def ffn_norm(layer: nn.Module) -> nn.Module:
        """The norm in front of the MLP."""
        return getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm

    # ---- rotary embeddings and masks for calling a block directly (distillation, head grouping)
    @staticmethod
    def position_embeddings(rotary: nn.Module, x: torch.Tensor, pos: torch.Tensor, layer_type: str | None):
        if layer_type is not None and isinstance(getattr(rotary, "rope_type", None), dict):  # per layer type
            return rotary(x, pos, layer_type)
        return rotary(x, pos)

    @staticmethod
    def causal_mask(t: int, dtype, device, window: int | None = None) -> torch.Tensor:
        """Additive causal mask [1, 1, T, T]; with ``window``, each token sees the last ``window`` tokens."""
        i = torch.arange(t, device=device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= i[:, None] - i[None, :] < window
        return torch.zeros(t, t, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))[None, None]

    def localize_attention(self, attn: nn.Module, local_cols: int) -> None:
        """On a TP rank holding ``local_cols`` o_proj input columns: make a fused-qkv attention cut its local
        (q_r; k_r; v_r) by the local head counts. HF's Phi-3 attention reads the shared config's head count,
        which DeepSpeed AutoTP does not localise, so stock AutoTP misreads the fused output on every rank."""
        config = attn.config
        if self.qkv != "fused" or local_cols == config.num_attention_heads * attn.head_dim:
            return
        import copy
        q = local_cols // attn.head_dim
        kv = q * config.num_key_value_heads // config.num_attention_heads
        attn.config = copy.copy(config)
        attn.config.num_attention_heads, attn.config.num_key_value_heads = q, kv
        attn.num_key_value_heads, attn.num_key_value_groups = kv, q // kv

    # ---- projections, per shard
    def qk(self, attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key states [B, heads, T, head_dim] before rotary (with per-head q/k norms if any)."""
        b, t, _ = h.shape
        hd = attn.head_dim
        if self.qkv == "fused":
            w = attn.qkv_proj.weight
            n_q = attn.config.num_attention_heads * hd
            n_kv = attn.config.num_key_value_heads * hd
            q, k = F.linear(h, w[:n_q]), F.linear(h, w[n_q:n_q + n_kv])
        else:
            q, k = attn.q_proj(h), attn.k_proj(h)
        q, k = q.view(b, t, -1, hd), k.view(b, t, -1, hd)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2)

    def gate_up(self, mlp: nn.Module, cols: tuple[int, ...]) -> list[tuple]:
        """Per shard: (gate weight, gate bias, up weight, up bias). A fused ``gate_up_proj`` holds (gate; up):
        in full in virtual TP, and as (gate_r; up_r) on a rank (DeepSpeed's GateUpPack_LinearLayer)."""
        if self.mlp == "fused":
            gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
            gb, ub = (None, None) if mlp.gate_up_proj.bias is None else mlp.gate_up_proj.bias.chunk(2)
        else:
            gate, up, gb, ub = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.gate_proj.bias, mlp.up_proj.bias
        split = (lambda t: [None] * len(cols) if t is None else list(t.split(cols, dim=0)))
        return list(zip(split(gate), split(gb), split(up), split(ub)))

    @staticmethod
    def act(mlp: nn.Module):
        return getattr(mlp, "act_fn", None) or mlp.activation_fn

    # ---- weight permutation (head grouping): rows of q/k/v and columns of o, neurons of the MLP
    def permute(self, layer: nn.Module, q_rows: torch.Tensor, kv_rows: torch.Tensor, neurons: torch.Tensor) -> None:
        attn, mlp = layer.self_attn, layer.mlp

        def rows(weight_owner, idx):
            weight_owner.weight.data = weight_owner.weight.data[idx].contiguous()
            if weight_owner.bias is not None:
                weight_owner.bias.data = weight_owner.bias.data[idx].contiguous()
        if self.qkv == "fused":
            n_q, n_kv = q_rows.numel(), kv_rows.numel()
            rows(attn.qkv_proj, torch.cat([q_rows, n_q + kv_rows, n_q + n_kv + kv_rows]))
        else:
            rows(attn.q_proj, q_rows)
            rows(attn.k_proj, kv_rows)
            rows(attn.v_proj, kv_rows)
        attn.o_proj.weight.data = attn.o_proj.weight.data[:, q_rows].contiguous()
        if self.mlp == "fused":
            rows(mlp.gate_up_proj, torch.cat([neurons, mlp.down_proj.weight.shape[1] + neurons]))
        else:
            rows(mlp.gate_proj, neurons)
            rows(mlp.up_proj, neurons)
        mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, neurons].contiguous()


ADAPTERS: dict[str, ModelAdapter] = {a.name: a for a in (
    ModelAdapter("llama", "llama", "LlamaDecoderLayer"),
    ModelAdapter("mistral", "mistral", "MistralDecoderLayer"),
    ModelAdapter("qwen2", "qwen2", "Qwen2DecoderLayer"),
    ModelAdapter("qwen3", "qwen3", "Qwen3DecoderLayer"),
    ModelAdapter("gemma", "gemma", "GemmaDecoderLayer"),
    ModelAdapter("phi3", "phi3", "Phi3DecoderLayer", qkv="fused", mlp="fused"),
    ModelAdapter("gemma2", "gemma2", "Gemma2DecoderLayer", block="sandwich"),
    ModelAdapter("gemma3_text", "gemma3", "Gemma3DecoderLayer", block="sandwich"),
)}

#: Families refused by name, with the reason.
_MOE = ("mixture-of-experts block: under SPD each rank's router would see a different partial input, so ranks "
        "could send a token to different experts; SPD is not defined for it")
REFUSED: dict[str, str] = {t: _MOE for t in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3",
                                             "dbrx", "olmoe", "jamba", "granitemoe", "phimoe", "llama4",
                                             "gpt_oss")}
SUPPORTED_MODEL_TYPES = tuple(ADAPTERS)


def adapter_for(config) -> ModelAdapter:
    """The adapter of an HF config's ``model_type``, or a :class:`LayoutError` naming the supported list."""
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or [type(config).__name__]
    if model_type in REFUSED:
        raise LayoutError(f"unsupported architecture {archs[0]!r} (model_type={model_type!r}): {REFUSED[model_type]}; "
                          f"ds_spd supports model types {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in ADAPTERS:
        raise LayoutError(f"unsupported architecture {archs[0]!r} (model_type={model_type!r}); "
                          f"ds_spd supports model types {', '.join(SUPPORTED_MODEL_TYPES)}")
    return ADAPTERS[model_type]


def layer_type(config, layer_idx: int) -> str | None:
    types = getattr(config, "layer_types", None)
    return types[layer_idx] if types else None
