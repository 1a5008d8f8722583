"""The SPD block in one process (virtual TP), against HF and against an independent reference."""
import copy

import pytest
import torch
from helpers import EVEN, FAMILIES, KV1, SMOL_HEADS, reference_logits, tiny_config, tiny_model

import ds_spd
from ds_spd.core.block import SPDDecoderLayer
from ds_spd.core.comm import CommStats, VirtualReduce
from ds_spd.core.layout import LayoutError, TPLayout


def _ids(vocab=384, shape=(2, 12)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(3))


def _biased_model(bias: bool):
    """The tiny model, with nonzero q/k/v, o_proj and MLP biases where ``bias`` (so where they are added matters)."""
    model = tiny_model(attention_bias=bias, mlp_bias=bias)
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_layout_matches_deepspeed_split():
    smol = tiny_config(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64)
    lay = TPLayout.for_model(smol, 2)
    assert (lay.q_heads, lay.kv_heads, lay.mlp_cols) == ((6, 3), (2, 1), (768, 768))
    assert TPLayout.for_model(smol, 3).q_heads == (3, 3, 3)
    tiny = TPLayout.for_model(tiny_config(), 2)  # intermediate 200 in grains of 64: 128 + 72
    assert (tiny.attn_cols, tiny.mlp_cols) == ((64, 32), (128, 72))
    assert TPLayout.for_model(tiny_config(), 3).mlp_cols == (64, 64, 72)


def test_layout_errors():
    with pytest.raises(LayoutError, match="3 KV heads, so tp must be at most 3 .* or a multiple of 3"):
        TPLayout.for_model(tiny_config(), 4)
    with pytest.raises(LayoutError, match="4 query heads, fewer than the 8 ranks"):
        TPLayout.for_model(tiny_config(**KV1), 8)
    with pytest.raises(LayoutError, match="positive"):
        TPLayout.for_model(tiny_config(), 0)
    from transformers import GPT2Config
    with pytest.raises(LayoutError, match="unsupported architecture.*GPT2"):
        TPLayout.for_model(GPT2Config(architectures=["GPT2LMHeadModel"]), 2)


def test_layout_replicates_kv_heads_beyond_their_count():
    one = TPLayout.for_model(tiny_config(**KV1), 4)
    assert (one.q_heads, one.kv_heads, one.kv_replicas) == ((1, 1, 1, 1), (1, 1, 1, 1), 4)
    assert [one.kv_head_range(r) for r in range(4)] == [(0, 1)] * 4
    smol = TPLayout.for_model(tiny_config(**SMOL_HEADS), 6)   # each KV head's 3 query heads: 2 + 1
    assert (smol.q_heads, smol.kv_replicas) == ((2, 1, 2, 1, 2, 1), 2)
    assert [smol.kv_head_range(r) for r in range(6)] == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3)]
    assert [smol.q_head_range(r) for r in (0, 1, 2)] == [(0, 2), (2, 3), (3, 5)]
    assert TPLayout.for_model(tiny_config(**SMOL_HEADS), 3).kv_replicas == 1   # not used: AutoTP's split


@pytest.mark.parametrize("shape,tp", [("kv1", 2), ("kv1", 4), ("smol", 6)])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_kv_replication_off_equals_hf_and_spd_matches_reference(shape, tp, model_type):
    model = tiny_model(model_type, **(KV1 if shape == "kv1" else SMOL_HEADS))
    ids, blocks = _ids(), [0, 2]
    virtual = ds_spd.virtualize(copy.deepcopy(model), tp)
    torch.testing.assert_close(_logits(virtual, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    ds_spd.set_spd_blocks(virtual, blocks)
    out = _logits(virtual, ids)
    torch.testing.assert_close(out, reference_logits(model, ids, tp, blocks), atol=1e-5, rtol=1e-5)
    assert (out - _logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_spd_off_equals_hf(model_type, tp):
    model = tiny_model(model_type)
    ids = _ids()
    virtual = ds_spd.virtualize(copy.deepcopy(model), tp)
    torch.testing.assert_close(_logits(virtual, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_spd_matches_reference(tp, bias):
    model = _biased_model(bias)
    ids, blocks = _ids(), [0, 2, 3]
    ref = reference_logits(model, ids, tp, blocks)
    virtual = ds_spd.virtualize(copy.deepcopy(model), tp, blocks)
    out = _logits(virtual, ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - _logits(model, ids)).abs().max() > 1e-3  # SPD is not the identity transformation


def test_tp1_spd_block_equals_original_block():
    model = tiny_model()
    layer = model.model.layers[1]
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7).unsqueeze(0)
    kwargs = dict(position_embeddings=model.model.rotary_emb(x, pos), attention_mask=None, position_ids=pos)
    with torch.no_grad():
        expected = layer(x, **kwargs)
        spd = SPDDecoderLayer(copy.deepcopy(layer), (layer.self_attn.o_proj.in_features,),
                              (model.config.intermediate_size,), VirtualReduce(CommStats()), spd=True)
        torch.testing.assert_close(spd(x, **kwargs), expected, atol=1e-6, rtol=1e-6)
    ids = _ids()
    all_spd = ds_spd.virtualize(copy.deepcopy(model), 1, range(4))
    torch.testing.assert_close(_logits(all_spd, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_allreduce_counts():
    model = ds_spd.virtualize(tiny_model(), 2)
    n, ids = model.config.num_hidden_layers, _ids()
    for blocks in ([], [1], list(range(n))):
        ds_spd.set_spd_blocks(model, blocks)
        model.spd_stats.reset()
        _logits(model, ids)
        assert model.spd_stats.summary()["allreduce_per_forward"] == 2 * n - len(blocks)
        assert ds_spd.get_spd_blocks(model) == tuple(blocks)
    with pytest.raises(ValueError, match="out of range"):
        ds_spd.set_spd_blocks(model, [n])


def test_generation_with_kv_cache_matches_no_cache():
    model = ds_spd.virtualize(tiny_model(**EVEN), 2, [0, 2])
    prompt = _ids(shape=(1, 6))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_state_dict_names_preserved():
    model = tiny_model()
    names = set(model.state_dict())
    virtual = ds_spd.virtualize(copy.deepcopy(model), 2, [1])
    assert set(virtual.state_dict()) == names


@pytest.mark.parametrize("tp", [2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_lagged_spd_matches_reference(tp, bias):
    """Lagged attention (docs/method.md): each rank's MLP also reads the other ranks' attention output one position
    late; against the hook reference, and unlike plain SPD."""
    model = _biased_model(bias)
    ids, blocks = _ids(), [0, 2, 3]
    virtual = ds_spd.virtualize(copy.deepcopy(model), tp, blocks)
    plain = _logits(virtual, ids)
    ds_spd.set_lag(virtual)
    out = _logits(virtual, ids)
    torch.testing.assert_close(out, reference_logits(model, ids, tp, blocks, lag=True), atol=1e-5, rtol=1e-5)
    assert (out - plain).abs().max() > 1e-3
    ds_spd.set_lag(virtual, False)
    torch.testing.assert_close(_logits(virtual, ids), plain, atol=0, rtol=0)


def test_lagged_tp1_equals_original_and_sandwich_refused():
    model = tiny_model()
    ids = _ids()
    one = ds_spd.virtualize(copy.deepcopy(model), 1, range(4))
    ds_spd.set_lag(one)   # one rank: no other ranks, nothing late
    torch.testing.assert_close(_logits(one, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    kind, overrides = FAMILIES["gemma3"]
    gemma = ds_spd.virtualize(tiny_model(kind, **overrides), 2, [0])
    with pytest.raises(ValueError, match="pre-norm blocks, not the gemma3_text family's sandwich blocks"):
        ds_spd.set_lag(gemma)


def test_lagged_decode_with_kv_cache_matches_full_forward_and_syncs_once():
    """Prefill then one token at a time through the cache (the state is the last position's O_r) gives the full
    forward's logits; a decode step syncs once a lagged block, carrying [Y_r + Z_r, Y_r]; a prefill twice."""
    from transformers import DynamicCache
    model = ds_spd.virtualize(tiny_model(**EVEN), 2, [0, 2])
    ds_spd.set_lag(model)
    ids = _ids(shape=(2, 10))
    n = model.config.num_hidden_layers
    full = _logits(model, ids)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.spd_stats.reset()
        steps = [model(ids[:, :4], cache=cache, use_cache=True).logits]
        assert model.spd_stats.summary()["allreduce_per_forward"] == 2 * n
        for t in range(4, 10):
            model.spd_stats.reset()
            steps.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
            assert model.spd_stats.summary()["allreduce_per_forward"] == 2 * n - 2
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert set(cache.spd_lag) == {0, 2}
    prompt = _ids(shape=(1, 6))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.tolist() == uncached.tolist()
