"""The CLI on 2 real CPU ranks: generate under torchrun, bench under the deepspeed launcher; each equal to virtual TP
or counting what it must. (A file of its own so that pytest-xdist can run it beside tests/core/test_multirank.py.)"""
import json

import pytest
from helpers import launch, last_json

pytestmark = pytest.mark.multirank


def test_cli_generate_under_torchrun_equals_virtual(tiny_dir, capsys):
    """generate under torchrun, which sets LOCAL_WORLD_SIZE but not LOCAL_SIZE (DeepSpeed's CPU path crashed without
    it): the same tokens as virtual TP. (eval under the deepspeed launcher == virtual TP, with sharded loading and
    all-reduces counted: tests/stages/test_distill.py's checkpoint round trip, tests/models/test_real_model.py.)"""
    import os
    import subprocess
    import sys

    from helpers import ROOT, clean_env, cli_json, free_port
    gen = ["--model", tiny_dir, "--spd-blocks", "0-3", "--prompt", "def main", "--max-new-tokens", "8"]
    g_virtual = cli_json(["generate", "--virtual-tp", "2", *gen], capsys)   # in this process
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "ds_spd",
                           "generate", *gen, "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=clean_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    g_real = last_json(proc.stdout)
    assert g_real["mode"] == "tp" and g_virtual["mode"] == "virtual"
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
