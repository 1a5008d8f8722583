"""The README's path (scan -> plan -> distill) through the CLI with SmolLM2's defaults (quick preset; Gemma 3's:
test_readme_path_gemma.py, a file of its own so another worker runs it), and the distilled ranking on a tiny
model: every chosen block whose SPD form changes the model is trained, and each model gets its own recipe."""
import json
import os

import pytest
from helpers import last_json, readme_path, run_cli_batch

from ds_spd.plan import load_plan

@pytest.mark.real_model
def test_readme_path_smollm2_its_recipe_scans_by_kl(tmp_path):
    scan, distill, plan = readme_path("default", tmp_path)
    assert (scan["method"], scan["ranking"], scan["metric"]) == ("isolated", "zero-shot", "kl")   # Gemma 3's scan
    assert load_plan(plan).scan["metric"] == "kl"
    assert scan["head_dtype"] in ("bfloat16", "float32")   # auto: resolved to what is faster on this machine
    assert distill["lr"] == 1e-3                                    # the lr rule on SmolLM2's weights
    assert distill["calibration"]["dataset"] == "pydoc+shakespeare+docstrings"   # its recipe's corpora
    assert distill["kl_stage"]["history"] and distill["kl_stage"]["final_kl"] <= distill["kl_stage"]["initial_kl"]
    assert json.load(open(os.path.join(distill["checkpoint"], "plan.json")))["lag"] is True   # its recipe's lag


def test_distilled_ranking_reuses_its_checkpoint_and_refuses_what_it_cannot_honour(tiny_dir, tmp_path):
    config = tmp_path / "quick.json"
    config.write_text(json.dumps({"spd": {"distill": {"epochs": 1}}}))
    common = ["scan", "--model", tiny_dir, "--tp", "2", "--max-samples", "4", "--seq-len", "32", "--batch-size", "2",
              "--config", str(config)]
    plan = str(tmp_path / "scan.json")
    lagged = tmp_path / "lagged.json"
    lagged.write_text(json.dumps({"spd": {"distill": {"epochs": 1, "lag": True}}}))
    first, again, last, cumulative, lag = run_cli_batch([
        [*common, "--ranking", "distilled", "--out", plan, "--json"],
        [*common, "--ranking", "distilled", "--out", plan, "--json"],
        [*common, "--ranking", "distilled", "--last", "2", "--out", str(tmp_path / "b.json")],
        [*common, "--ranking", "distilled", "--method", "cumulative", "--out", str(tmp_path / "b.json")],
        [*common, "--config", str(lagged), "--ranking", "distilled", "--out", plan, "--json"]],
        str(tmp_path))
    assert first["code"] == again["code"] == 0, first["stderr"][-2000:]
    assert "distilling all 4 blocks once" in first["stderr"] and "reuses" in again["stderr"]
    assert last_json(again["stdout"])["sensitivity"] == last_json(first["stdout"])["sensitivity"]
    assert load_plan(plan).scan["checkpoint"].endswith(os.path.join("scan.ranking", "checkpoint"))
    assert last["code"] == 2 and "--last does not apply to the distilled ranking" in last["stderr"]
    assert cumulative["code"] == 2 and "method must be 'isolated'" in cumulative["stderr"]
    # with lagged attention in the config the ranking's blocks are still distilled and measured plain: the same run
    assert lag["code"] == 0 and "reuses" in lag["stderr"], lag["stderr"][-2000:]
    assert last_json(lag["stdout"])["sensitivity"] == last_json(first["stdout"])["sensitivity"]
    assert not os.path.exists(tmp_path / "b.json")


def test_distilled_ranking_under_the_launcher_reads_the_checkpoint_its_first_rank_wrote(tiny_dir, tmp_path):
    from helpers import launch
    plan, config = str(tmp_path / "scan.json"), tmp_path / "quick.json"
    config.write_text(json.dumps({"spd": {"distill": {"epochs": 1}}}))
    res = launch(["ds_spd", "scan", "--model", tiny_dir, "--tp", "2", "--max-samples", "4", "--seq-len", "32",
                  "--batch-size", "2", "--ranking", "distilled", "--config", str(config), "--out", plan, "--json"],
                 module=True)
    ranking = json.load(open(os.path.join(tmp_path, "scan.ranking", "checkpoint", "provenance.json")))
    assert ranking["ranks"] == 2 and len(load_plan(plan).blocks) == 4
    assert all(b.sensitivity is not None for b in load_plan(plan).blocks), res.stderr[-2000:]


@pytest.mark.real_model
def test_distilled_ranking_trains_each_block_alone_without_smollm2s_kl_stage(tmp_path):
    from ds_spd.config import resolve_spd_config
    from ds_spd.stages.scan_run import _every_block_run
    cfg = resolve_spd_config({}, model="default", tp_size=2)
    assert cfg.distill.kl_epochs == 1   # the recipe's, for the README path's distill
    assert _every_block_run(cfg, str(tmp_path / "scan.json"), None).settings.kl_epochs == 0
