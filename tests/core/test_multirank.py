"""Real multi-rank TP on 2 and 4 CPU ranks (tests/support/tp_worker.py under torchrun), proved by equality; the CLI
on real ranks under the deepspeed launcher: tests/cli/test_cli_ranks.py."""
import json

import pytest
from helpers import FAMILIES, KV1, KV1_SHAPE, check_tp_worker, launch_workers, save_tiny, tiny_config

from ds_spd.core.layout import TPLayout

pytestmark = pytest.mark.multirank

# tp above the KV-head count: each KV head replicated on tp/kv ranks
KV_SHAPES = {"kv1-qwen2": {**KV1, "model_type": "qwen2"},   # q/k/v biases
             # 3 query heads on one KV head: at tp 2 its replicas hold 2 + 1 query heads (SmolLM2 at tp 6 in small)
             "q3kv1": {**KV1, "hidden_size": 48, "num_attention_heads": 3},
             **{f"kv1-{f}": {**FAMILIES[f][1], **KV1_SHAPE, "model_type": FAMILIES[f][0]}
                for f in ("phi3", "gemma3")}}   # fused qkv; sandwich norms, q/k norms, sliding windows


def run_tp_worker(models: dict[str, tuple[str, str, bool]], tmp_path, nprocs: int) -> str:
    """tests/support/tp_worker.py on ``nprocs`` ranks for ``models`` (name: dir, comm, sharded check), one launch;
    its results' prefix."""
    spec, prefix, blocks = tmp_path / "spec.json", str(tmp_path / "res"), [0, 2]
    spec.write_text(json.dumps([{"dir": d, "comm": c, "sharded": s} for d, c, s in models.values()]))
    launch_workers(["tests/support/tp_worker.py", str(spec), prefix, ",".join(map(str, blocks))], nprocs=nprocs)
    for i, name in enumerate(models):
        check_tp_worker([json.load(open(f"{prefix}.tp.{i}.rank{r}.json")) for r in range(nprocs)], blocks, name)
    return prefix


def check_replication(prefix: str, i: int, name: str, shape: dict, tp: int) -> None:
    """Model ``i`` with its KV heads replicated: sharded loading == full load (bitwise), and each rank read its own
    query heads and one whole KV head (a copy shared with its replicas)."""
    q_heads = TPLayout.for_model(tiny_config(**shape), tp).q_heads
    for rank in range(tp):
        sharded = json.load(open(f"{prefix}.sharded.{i}.rank{rank}.json"))
        assert sharded["max_diff"] == 0 and all(v == 0 for v in sharded["param_diffs"].values()), (name, rank)
        assert sharded["same_generation"], (name, rank)
        shapes = sharded["local_shapes"]
        if "model.layers.0.self_attn.qkv_proj.weight" in shapes:   # fused: (q_r; k; v)
            assert shapes["model.layers.0.self_attn.qkv_proj.weight"][0] == (q_heads[rank] + 2) * 16
        else:
            assert shapes["model.layers.0.self_attn.k_proj.weight"][0] == 16
            assert shapes["model.layers.0.self_attn.q_proj.weight"][0] == q_heads[rank] * 16


def test_real_tp_2_ranks_every_family_shm_and_gloo_and_kv_replication(tiny_dir, tiny_even_dir, kv1_dir, tmp_path):
    """One launch of 2 CPU ranks checks each model in turn: every family and LLaMA with an uneven split (6/3 heads:
    4 + 2 query heads) on the shm path, an even split on the gloo path, and two models with one KV head replicated
    on both ranks (3 query heads: 2 + 1 per replica), those also loaded sharded."""
    models = {"llama-uneven": (tiny_dir, "auto", False), "even, gloo": (tiny_even_dir, "gloo", False),
              **{f: (save_tiny(str(tmp_path / f), model_type=t, **o), "auto", False) for f, (t, o) in FAMILIES.items()},
              "kv1": (kv1_dir, "auto", True), "q3kv1": (save_tiny(str(tmp_path / "q3kv1"), **KV_SHAPES["q3kv1"]),
                                                      "auto", True)}
    prefix = run_tp_worker(models, tmp_path, nprocs=2)
    assert json.load(open(f"{prefix}.tp.0.rank0.json"))["layout_attn_cols"] == [64, 32]   # 4 + 2 query heads of 16
    kv1, q3 = list(models).index("kv1"), list(models).index("q3kv1")
    check_replication(prefix, kv1, "kv1", KV1, 2)
    check_replication(prefix, q3, "q3kv1", KV_SHAPES["q3kv1"], 2)
    assert [json.load(open(f"{prefix}.tp.{q3}.rank{r}.json"))["layout_attn_cols"][r] for r in (0, 1)] == [32, 16]


def test_kv_replication_on_4_ranks(kv1_dir, tmp_path):
    """tp 4 above the KV-head count (each KV head on 4 ranks), per model in one launch: SPD off == HF, real ==
    virtual TP with SPD on, generation identical, and sharded loading == full load (bitwise)."""
    shapes = {"kv1": KV1, **{n: KV_SHAPES[n] for n in ("kv1-qwen2", "kv1-phi3", "kv1-gemma3")}}
    models = {n: (kv1_dir if n == "kv1" else save_tiny(str(tmp_path / n), **s), "auto", True)
              for n, s in shapes.items()}
    prefix = run_tp_worker(models, tmp_path, nprocs=4)
    for i, (name, shape) in enumerate(shapes.items()):
        check_replication(prefix, i, name, shape, 4)
