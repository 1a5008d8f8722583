"""Model families through their adapters (ds_spd.models.adapters), each with the LLaMA family's proofs, on tiny
random configs: SPD off == HF; TP=1 SPD == HF; the SPD block == an independent hook-based reference of its
block math (pre-norm: the paper's; sandwich: ds_spd's rank-local definition); head grouping keeps the plain
TP function; mixture-of-experts refused by name. (Virtual TP == 2 real ranks, every family:
tests/core/test_multirank.py.)"""
import copy

import pytest
import torch
from helpers import (CPU_ZERO2, FAMILIES, KV1_SHAPE, plan_of_classes, reference_logits, tiny_config,
                     tiny_model)

import ds_spd
from ds_spd.errors import LayoutError
from ds_spd.core.layout import TPLayout

def _model(family, **shape):
    model_type, overrides = FAMILIES[family]
    return tiny_model(model_type, **{**overrides, **shape})


def _ids(shape=(2, 12)):
    return torch.randint(0, 384, shape, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_spd_off_and_tp1_equal_hf(family):
    model, ids = _model(family), _ids()
    hf = _logits(model, ids)
    torch.testing.assert_close(_logits(ds_spd.virtualize(copy.deepcopy(model), 2), ids), hf, atol=1e-5, rtol=1e-5)
    all_spd_tp1 = ds_spd.virtualize(copy.deepcopy(model), 1, range(model.config.num_hidden_layers))
    torch.testing.assert_close(_logits(all_spd_tp1, ids), hf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_spd_matches_reference(family):
    model, ids, blocks = _model(family), _ids(), [0, 1, 3]
    out = _logits(ds_spd.virtualize(copy.deepcopy(model), 2, blocks), ids)
    torch.testing.assert_close(out, reference_logits(model, ids, 2, blocks), atol=1e-5, rtol=1e-5)
    assert (out - _logits(model, ids)).abs().max() > 1e-3   # SPD is not the identity


@pytest.mark.parametrize("family", FAMILIES)
def test_head_grouping_keeps_tp_function(family):
    from ds_spd.stages.headgroup import attention_kwargs, find_grouping, permute_block
    model = ds_spd.virtualize(_model(family), 2)
    layout, layer = model.spd_layout, model.model.layers[1]
    x = torch.randn(4, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    kwargs = attention_kwargs(model.model.rotary_emb, x, layer)
    with torch.no_grad():
        before = layer(x, **kwargs)
        grouping = find_grouping(layer, model.model.rotary_emb, x, layout)
        permute_block(layer, grouping, layout)
        torch.testing.assert_close(layer(x, **kwargs), before, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_replication_per_family(family, tp):
    """tp above the KV-head count, every family: SPD off == HF; SPD == the independent reference; head grouping
    (query heads scattered among the ranks sharing their KV head, MLP matched) keeps the TP function."""
    from ds_spd.stages.headgroup import attention_kwargs, find_grouping, permute_block
    model, ids, blocks = _model(family, **KV1_SHAPE), _ids(), [0, 1, 3]
    virtual = ds_spd.virtualize(copy.deepcopy(model), tp)
    assert virtual.spd_layout.kv_replicas == tp
    torch.testing.assert_close(_logits(virtual, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    ds_spd.set_spd_blocks(virtual, blocks)
    torch.testing.assert_close(_logits(virtual, ids), reference_logits(model, ids, tp, blocks), atol=1e-5, rtol=1e-5)
    ds_spd.set_spd_blocks(virtual, [])
    layer, rotary = virtual.model.layers[1], virtual.model.rotary_emb
    x = torch.randn(4, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    kwargs = attention_kwargs(rotary, x, layer)
    with torch.no_grad():
        before = layer(x, **kwargs)
        for matching in ("slice", "neuron"):
            grouping = find_grouping(layer, rotary, x, virtual.spd_layout, mlp_matching=matching)
            assert sorted(h for g in grouping.groups for h in g) == [0, 1, 2, 3]
            assert [len(g) for g in grouping.groups] == list(virtual.spd_layout.q_heads)
            permute_block(layer, grouping, virtual.spd_layout)
            torch.testing.assert_close(layer(x, **kwargs), before, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_distill_trains_fused_and_sandwich_blocks(family):

    from ds_spd.stages.distill.joint import distill
    from ds_spd.stages.distill.kit import DistillSettings
    model = ds_spd.virtualize(_model(family), 2)
    segments = torch.randint(0, 384, (8, 24), generator=torch.Generator().manual_seed(1))
    result = distill(model, plan_of_classes(model, ["ESB", "TP", "SB", "TP"]), segments, copy.deepcopy(CPU_ZERO2),
                     DistillSettings(epochs=4, lr=2e-3, micro_batch=4), progress=False)
    for i in (0, 2):
        assert result.history[-1]["loss"][i] < 0.8 * result.initial_mse[i]


def test_moe_refused_by_name():
    with pytest.raises(LayoutError, match=r"model_type='mixtral'.*mixture-of-experts.*supports model types llama"):
        TPLayout.for_model(tiny_config("mixtral", num_local_experts=4, num_experts_per_tok=2), 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_block_call_matches_the_model(family):
    """Distillation and head grouping call blocks directly (attention_kwargs): rotary variant and
    sliding-window mask must equal what the model gives each layer (T=12 > window 8)."""
    from ds_spd.stages.headgroup import attention_kwargs
    model = ds_spd.virtualize(_model(family), 2, [1])
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, args, kwargs, out, i=i: seen.__setitem__(
            i, (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], out)), with_kwargs=True)
    _logits(model, _ids((1, 12)))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            x, out = seen[i]
            torch.testing.assert_close(layer(x, **attention_kwargs(model.model.rotary_emb, x, layer)), out,
                                       atol=1e-5, rtol=1e-5)
