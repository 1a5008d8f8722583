"""The packed one-query attention (ds_spd.models.attention) against HF's SDPA attention with the KV heads repeated
per query group (what HF runs inside torch.compile), and as a model's registered attention implementation."""
import torch
from helpers import tiny_model
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from ds_spd.models.attention import NAME, packed_decode_attention, use_packed_decode_attention


class _Module(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def test_packed_equals_repeated_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 6, 1, 16, generator=g), torch.randn(4, 2, 40, 16, generator=g),
               torch.randn(4, 2, 40, 16, generator=g))
    mask = torch.arange(40)[None, None, None, :] <= torch.tensor([3, 17, 39, 0])[:, None, None, None]
    packed, _ = packed_decode_attention(_Module(), q, k, v, mask, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask,
                                                           scale=0.3).transpose(1, 2)
    assert packed.shape == (4, 1, 6, 16)
    torch.testing.assert_close(packed, ref)
    # several queries (prefill): HF's attention, unchanged
    q2 = torch.randn(4, 6, 5, 16, generator=g)
    mask2 = torch.ones(4, 1, 5, 40, dtype=torch.bool)
    torch.testing.assert_close(packed_decode_attention(_Module(), q2, k, v, mask2)[0],
                               sdpa_attention_forward(_Module(), q2, k, v, mask2)[0])


@torch.no_grad()
def test_model_with_packed_attention_equals_sdpa():
    """A model switched to the implementation (every config its modules hold names it): a decode step's logits
    after a cached prefill equal SDPA's."""
    model, ids = tiny_model(), torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(1))
    assert model.config.num_attention_heads > model.config.num_key_value_heads   # query groups to pack

    def step():
        cache = model(ids[:, :-1], use_cache=True).past_key_values
        return model(ids[:, -1:], cache=cache).logits
    ref = step()
    use_packed_decode_attention(model)
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {NAME}
    torch.testing.assert_close(step(), ref)
