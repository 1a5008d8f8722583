"""The README's path (scan -> plan -> distill) through the CLI with each model's defaults, on every shipped model
(quick preset), and the distilled ranking on a tiny model: every chosen block whose SPD form changes the model is
trained, and each model gets its own recipe."""
import json
import os

import pytest
from helpers import last_json, run_cli_batch

from ds_spd.plan import load_plan
from ds_spd.stages.planner import relative

QUICK = ["--max-samples", "4", "--seq-len", "64", "--batch-size", "2"]


def readme_path(model: str, tmp_path, extra: list[str] = ()) -> tuple[dict, dict, str]:
    plan, ckpt = str(tmp_path / "plan.json"), str(tmp_path / "ckpt")
    # two processes: a distilled ranking trains in `scan`, and one process holds at most one training run
    results = run_cli_batch([
        ["scan", "--model", model, "--tp", "2", *QUICK, *extra, "--out", plan, "--json"],
        ["plan", "--plan", plan, "--spd-count", "3", "--json"]], str(tmp_path / "a"))
    results += run_cli_batch([
        ["distill", "--model", model, "--plan", plan, *QUICK[:4], *extra, "--epochs", "1", "--out", ckpt, "--json"]],
        str(tmp_path / "b"))
    assert [r["code"] for r in results] == [0, 0, 0], [r["stderr"][-3000:] for r in results]
    scan, _, distill = (last_json(r["stdout"]) for r in results)
    chosen = load_plan(plan)
    rel = relative(chosen)
    costly = {i for i in chosen.spd_blocks if rel[i] != 0}
    trained = {int(i) for i in distill["final_mse"]}
    assert len(chosen.spd_blocks) == 3 and costly and costly <= trained   # nothing that changes the model untrained
    assert trained == {b.index for b in chosen.blocks if b.cls in ("SB", "ESB")}
    with open(f"{ckpt}/provenance.json") as f:
        assert set(json.load(f)["final_mse"]) == {str(i) for i in trained}
    return scan, distill, plan


@pytest.mark.real_model
def test_readme_path_smollm2_its_recipe_keeps_the_cumulative_scan(tmp_path):
    scan, distill, _ = readme_path("default", tmp_path)
    assert (scan["method"], scan["ranking"], scan["head_dtype"]) == ("cumulative", "zero-shot", "bfloat16")
    assert distill["lr"] == 3e-4                                    # the lr rule on SmolLM2's weights


@pytest.mark.real_model
def test_readme_path_gemma3_distilled_ranking_and_its_recipe(tmp_path):
    config = tmp_path / "quick.json"   # the model's recipe applies under a config that does not set its keys
    config.write_text(json.dumps({"spd": {"distill": {"epochs": 1}}}))
    scan, distill, plan = readme_path("gemma3-270m", tmp_path, ["--config", str(config)])
    assert (scan["method"], scan["ranking"]) == ("isolated-distilled", "distilled")
    assert scan["distilled_blocks"] == list(range(18))              # every block distilled once, then ranked
    assert load_plan(plan).measured_with["data"]["split"] == "validation"   # on text distillation did not see
    assert os.path.isdir(str(tmp_path / "plan.ranking" / "checkpoint"))
    assert distill["lr"] == 1e-4                                    # Gemma 3's recipe, not the lr rule's 5e-5


def test_distilled_ranking_reuses_its_checkpoint_and_refuses_what_it_cannot_honour(tiny_dir, tmp_path):
    config = tmp_path / "quick.json"
    config.write_text(json.dumps({"spd": {"distill": {"epochs": 1}}}))
    common = ["scan", "--model", tiny_dir, "--tp", "2", "--max-samples", "4", "--seq-len", "32", "--batch-size", "2",
              "--config", str(config)]
    plan = str(tmp_path / "scan.json")
    first, again, last, cumulative = run_cli_batch([
        [*common, "--ranking", "distilled", "--out", plan, "--json"],
        [*common, "--ranking", "distilled", "--out", plan, "--json"],
        [*common, "--ranking", "distilled", "--last", "2", "--out", str(tmp_path / "b.json")],
        [*common, "--ranking", "distilled", "--method", "cumulative", "--out", str(tmp_path / "b.json")]],
        str(tmp_path))
    assert first["code"] == again["code"] == 0, first["stderr"][-2000:]
    assert "distilling all 4 blocks once" in first["stderr"] and "reuses" in again["stderr"]
    assert last_json(again["stdout"])["sensitivity"] == last_json(first["stdout"])["sensitivity"]
    assert load_plan(plan).scan["checkpoint"].endswith(os.path.join("scan.ranking", "checkpoint"))
    assert last["code"] == 2 and "--last does not apply to the distilled ranking" in last["stderr"]
    assert cumulative["code"] == 2 and "method must be 'isolated'" in cumulative["stderr"]
    assert not os.path.exists(tmp_path / "b.json")
