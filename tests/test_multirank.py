"""Real multi-rank TP on 2 CPU ranks (deepspeed launcher and torchrun), proved by equality."""
import json

import pytest
from helpers import launch, last_json, tiny_config

pytestmark = pytest.mark.multirank


def _worker(model_dir, tmp_path, blocks, comm="auto"):
    prefix = str(tmp_path / f"res_{comm}")
    launch(["tests/tp_worker.py", model_dir, prefix, ",".join(map(str, blocks)), comm])
    return [json.load(open(f"{prefix}.rank{r}.json")) for r in (0, 1)]


def test_real_tp_matches_hf_and_virtual_on_gloo(tiny_even_dir, tmp_path):
    """An even split on the gloo path (the shm path and the uneven split: every family in
    tests/test_families.py::test_real_tp_matches_virtual)."""
    blocks = [0, 2]
    results = _worker(tiny_even_dir, tmp_path, blocks, "gloo")
    for res in results:
        # DeepSpeed AutoTP's own shards agree with the layout the virtual path uses.
        assert set(res["local_o_proj_cols_per_layer"]) == {res["layout_attn_cols"][res["rank"]]}   # every layer
        assert set(res["local_mlp_cols_per_layer"]) == {res["layout_mlp_cols"][res["rank"]]}
        assert res["off_vs_hf"] < 1e-5, res        # SPD off == HF model
        assert res["real_vs_virtual"] < 1e-5, res  # virtual TP == real TP, SPD on a mix of blocks
        assert res["spd_vs_hf"] > 1e-3, res        # and SPD really changed the function
        n = res["n_layers"]
        # 2 all-reduces per non-SPD block, 1 per SPD block, +1 for AutoTP's row-parallel lm_head.
        assert res["off_allreduce"]["allreduce_per_forward"] == 2 * n + 1
        assert res["spd_allreduce"]["allreduce_per_forward"] == 2 * n - len(blocks) + 1
        assert res["all_spd_allreduce"]["allreduce_per_forward"] == n + 1
        assert res["gen_real"] == res["gen_virtual"] == res["gen_nocache"]
    assert results[0]["gen_real"] == results[1]["gen_real"]


# q3kv1: 3 query heads on one KV head, so at tp 2 its replicas hold 2 + 1 query heads (SmolLM2 at tp 6 in small)
@pytest.mark.parametrize("tp,models", [(2, ("kv1", "q3kv1")), (4, ("kv1", "kv1-qwen2", "kv1-phi3", "kv1-gemma3"))])
def test_kv_replication_real_ranks_equal_hf_virtual_and_full_load(tp, models, kv1_dir, tmp_path):
    """tp above the KV-head count: each KV head replicated on tp/kv ranks. Per model, in one launch: SPD off ==
    HF, real == virtual TP with SPD on, generation identical, and sharded loading == full load (bitwise)."""
    from helpers import KV1, save_tiny
    from test_families import FAMILIES, KV1_SHAPE
    SHAPES = {"kv1": KV1, "kv1-qwen2": {**KV1, "model_type": "qwen2"},   # q/k/v biases
              "q3kv1": {**KV1, "hidden_size": 48, "num_attention_heads": 3},
              **{f"kv1-{f}": {**FAMILIES[f][1], **KV1_SHAPE, "model_type": FAMILIES[f][0]}
                 for f in ("phi3", "gemma3")}}   # fused qkv; sandwich norms, q/k norms, sliding windows
    dirs = {"kv1": kv1_dir}
    for name in models:
        if name not in dirs:
            dirs[name] = save_tiny(str(tmp_path / name), **SHAPES[name])
    prefix, blocks = str(tmp_path / "res"), [0, 2]
    launch(["tests/replication_worker.py", ",".join(dirs[m] for m in models), prefix, "0,2"], nprocs=tp)
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


def test_cli_eval_and_generate_real_equals_virtual(tiny_dir, tmp_path):
    """eval under the deepspeed launcher (sharded loading == full load), generate under torchrun: both equal
    virtual TP."""
    from helpers import run_cli_batch
    common = ["--model", tiny_dir, "--spd-blocks", "1,3", "--max-samples", "4", "--seq-len", "32", "--json"]
    gen = ["--model", tiny_dir, "--spd-blocks", "0-3", "--prompt", "def main", "--max-new-tokens", "8", "--json"]
    references = run_cli_batch([["eval", "--virtual-tp", "2", *common], ["generate", "--virtual-tp", "2", *gen]],
                               str(tmp_path))   # both virtual references in one process
    virtual, g_virtual = (last_json(r["stdout"]) for r in references)
    real = last_json(launch(["ds_spd", "eval", *common], module=True).stdout)
    # each rank read only its slices (sharded loading, the default), the same numbers as the full load
    full = last_json(launch(["ds_spd", "eval", *common, "--load", "full"], module=True).stdout)
    assert (real["load"], full["load"]) == ("sharded", "full")
    assert real["perplexity"] == full["perplexity"] and real["accuracy"] == full["accuracy"]
    assert real["mode"] == "tp" and virtual["mode"] == "virtual"
    assert real["spd_blocks"] == virtual["spd_blocks"] == [1, 3]
    assert real["perplexity"] == pytest.approx(virtual["perplexity"], rel=1e-5)
    assert real["accuracy"] == pytest.approx(virtual["accuracy"], abs=1e-9)
    assert virtual["allreduce_per_forward"] == 2 * 4 - 2
    assert real["allreduce_per_forward"] == 2 * 4 - 2 + 1  # + lm_head
    assert real["allreduce_seconds_per_forward"] > 0
    # AutoTP's row-parallel lm_head all-reduce goes through ds_spd's reducer: counted and timed
    assert real["allreduce_by_kind_per_forward"]["lm_head"] == 1
    assert real["allreduce_seconds_by_kind_per_forward"]["lm_head"] > 0

    # generate under torchrun, which sets LOCAL_WORLD_SIZE but not LOCAL_SIZE (DeepSpeed's CPU path crashed
    # without it): the same tokens as virtual TP
    import os
    import subprocess
    import sys

    from helpers import ROOT, clean_env, free_port
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "ds_spd",
                           "generate", *gen], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=clean_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    g_real = last_json(proc.stdout)
    assert g_real["mode"] == "tp"
    assert g_real["generations"][0]["token_ids"] == g_virtual["generations"][0]["token_ids"]
    assert len(g_real["generations"][0]["token_ids"]) == 8


def test_bench_runs_and_counts(tiny_dir, tmp_path):
    out = str(tmp_path / "bench")
    cfg = tmp_path / "grain.json"   # a non-default grain: the AutoTP baseline must be sharded like ds_spd
    cfg.write_text(json.dumps({"spd": {"tp_grain_size": 8}}))
    launch(["ds_spd", "bench", "--config", str(cfg), "--model", tiny_dir, "--repeats", "3", "--prefill-len", "32",
            "--decode-tokens", "2", "--decode-batches", "1", "--fractions", "0,0.5,1", "--out", out], module=True)
    result = json.load(open(f"{out}/bench.json"))
    # intermediate 200 at tp 2: grain 8 gives 104 + 96 columns (the default grain 64 gives 128 + 72)
    assert result["mlp_columns_rank0_layer0"] == {"autotp": [104], "ds_spd": [104]}
    rows = {(r["config"], r["comm"], r["workload"]): r for r in result["rows"]}
    n = result["n_layers"]
    for path in ("auto", "gloo"):
        for w in ("prefill", "decode_b1"):
            assert rows[("spd0", path, w)]["allreduce_per_forward"] == 2 * n + 1
            assert rows[("spd50", path, w)]["allreduce_per_forward"] == 2 * n + 1 - n // 2
            assert rows[("spd100", path, w)]["allreduce_per_forward"] == n + 1
            assert "ideal_ms" in rows[("spd100", path, w)]
    for path in ("auto", "gloo"):   # AutoTP on each path, paired with ds_spd 0% on the same path
        autotp = rows[("autotp", path, "prefill")]
        assert autotp["median_ms"] > 0 and autotp["n_pairs"] == 3
    # paired ratios to the same path's 0%-SPD configuration, with an interval and its verdict
    spd100 = rows[("spd100", "gloo", "decode_b1")]
    assert spd100["n_pairs"] == 3 and spd100["ratio_ci95"][0] <= spd100["ratio"] <= spd100["ratio_ci95"][1]
    assert spd100["effect"] in ("faster", "slower", "no effect") and "ratio" not in rows[("spd0", "gloo", "decode_b1")]
    assert {"start", "end"} <= set(result["noise"]) and isinstance(result["warnings"], list)
    import os
    assert os.path.isfile(f"{out}/bench.png") and os.path.isfile(f"{out}/bench.md")
