"""Real multi-rank TP on 2 and 4 CPU ranks (tests/support/tp_worker.py, tests/support/replication_worker.py), proved by
equality; the CLI on real ranks: tests/cli/test_cli_ranks.py."""
import json

import pytest
from helpers import FAMILIES, KV1_SHAPE, check_tp_worker, launch, tiny_config

pytestmark = pytest.mark.multirank


def test_real_tp_matches_hf_and_virtual_every_family_shm_and_gloo(tiny_dir, tiny_even_dir, tmp_path):
    """Every family and LLaMA with an uneven split (6/3 heads: 4 + 2 query heads) on the shm path, and an even
    split on the gloo path, in one launch of 2 CPU ranks (tests/support/tp_worker.py checks each model in turn)."""
    from helpers import save_tiny
    models = {"llama-uneven": (tiny_dir, "auto"), "even, gloo": (tiny_even_dir, "gloo"),
              **{f: (save_tiny(str(tmp_path / f), model_type=t, **o), "auto") for f, (t, o) in FAMILIES.items()}}
    prefix, blocks = str(tmp_path / "res"), [0, 2]
    launch(["tests/support/tp_worker.py", ",".join(d for d, _ in models.values()), prefix,
            ",".join(map(str, blocks)), ",".join(c for _, c in models.values())], timeout=900)
    for i, name in enumerate(models):
        check_tp_worker([json.load(open(f"{prefix}.{i}.rank{rank}.json")) for rank in (0, 1)], blocks, name)
    uneven = json.load(open(f"{prefix}.0.rank0.json"))["layout_attn_cols"]
    assert uneven == [64, 32]   # 4 + 2 query heads of 16


# q3kv1: 3 query heads on one KV head, so at tp 2 its replicas hold 2 + 1 query heads (SmolLM2 at tp 6 in small)
@pytest.mark.parametrize("tp,models", [(2, ("kv1", "q3kv1")), (4, ("kv1", "kv1-qwen2", "kv1-phi3", "kv1-gemma3"))])
def test_kv_replication_real_ranks_equal_hf_virtual_and_full_load(tp, models, kv1_dir, tmp_path):
    """tp above the KV-head count: each KV head replicated on tp/kv ranks. Per model, in one launch: SPD off ==
    HF, real == virtual TP with SPD on, generation identical, and sharded loading == full load (bitwise)."""
    from helpers import KV1, save_tiny
    SHAPES = {"kv1": KV1, "kv1-qwen2": {**KV1, "model_type": "qwen2"},   # q/k/v biases
              "q3kv1": {**KV1, "hidden_size": 48, "num_attention_heads": 3},
              **{f"kv1-{f}": {**FAMILIES[f][1], **KV1_SHAPE, "model_type": FAMILIES[f][0]}
                 for f in ("phi3", "gemma3")}}   # fused qkv; sandwich norms, q/k norms, sliding windows
    dirs = {"kv1": kv1_dir}
    for name in models:
        if name not in dirs:
            dirs[name] = save_tiny(str(tmp_path / name), **SHAPES[name])
    prefix, blocks = str(tmp_path / "res"), [0, 2]
    launch(["tests/support/replication_worker.py", ",".join(dirs[m] for m in models), prefix, "0,2"], nprocs=tp)
    from ds_spd.core.layout import TPLayout
    for i, name in enumerate(models):
        for rank in range(tp):
            res = json.load(open(f"{prefix}.tp.{i}.rank{rank}.json"))
            assert res["tp"] == tp and res["layout_attn_cols"][rank] in res["local_o_proj_cols_per_layer"]
            assert set(res["local_o_proj_cols_per_layer"]) == {res["layout_attn_cols"][rank]}, (name, rank)
            assert res["off_vs_hf"] < 1e-5 and res["real_vs_virtual"] < 1e-5 and res["spd_vs_hf"] > 1e-3, res
            assert res["spd_allreduce"]["allreduce_per_forward"] == 2 * res["n_layers"] - len(blocks) + 1
            assert res["gen_real"] == res["gen_virtual"] == res["gen_nocache"], (name, rank)
            sharded = json.load(open(f"{prefix}.sharded.{i}.rank{rank}.json"))
            assert sharded["max_diff"] == 0 and all(v == 0 for v in sharded["param_diffs"].values()), (name, rank)
            assert sharded["same_generation"], (name, rank)
            shapes = sharded["local_shapes"]
            # the rank reads its own query heads and one whole KV head (a copy shared with its replicas)
            q_heads = TPLayout.for_model(tiny_config(**SHAPES[name]), tp).q_heads[rank]
            if "model.layers.0.self_attn.qkv_proj.weight" in shapes:   # fused: (q_r; k; v)
                assert shapes["model.layers.0.self_attn.qkv_proj.weight"][0] == (q_heads + 2) * 16
            else:
                assert shapes["model.layers.0.self_attn.k_proj.weight"][0] == 16
                assert shapes["model.layers.0.self_attn.q_proj.weight"][0] == q_heads * 16
        if name == "q3kv1":
            assert [json.load(open(f"{prefix}.tp.{i}.rank{r}.json"))["layout_attn_cols"][r] for r in range(tp)] == \
                [32, 16]   # 2 + 1 query heads on the KV head's two replicas
