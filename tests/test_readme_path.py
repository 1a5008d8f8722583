"""The README's path (scan -> plan -> distill) through the CLI with the defaults, on every shipped model (quick
preset): every chosen block whose SPD form changes the model is trained, and each model gets its own recipe."""
import json

import pytest
from helpers import last_json, run_cli_batch

from ds_spd.plan import load_plan
from ds_spd.stages.planner import relative

pytestmark = [pytest.mark.real_model]


@pytest.mark.parametrize("model, blocks, lr", [("default", 30, 3e-4), ("gemma3-270m", 18, 1e-4)])
def test_readme_path_trains_every_chosen_block_that_costs_anything(model, blocks, lr, tmp_path):
    quick = ["--max-samples", "4", "--seq-len", "64", "--batch-size", "2"]
    plan, ckpt = str(tmp_path / "plan.json"), str(tmp_path / "ckpt")
    results = run_cli_batch([
        ["scan", "--model", model, "--tp", "2", *quick, "--out", plan, "--json"],
        ["plan", "--plan", plan, "--spd-count", "5", "--json"],
        ["distill", "--model", model, "--plan", plan, *quick, "--epochs", "1", "--out", ckpt, "--json"]],
        str(tmp_path))
    assert [r["code"] for r in results] == [0, 0, 0], [r["stderr"][-3000:] for r in results]
    scan, _, distill = (last_json(r["stdout"]) for r in results)
    assert scan["method"] == "isolated" and scan["head_dtype"] == "bfloat16"   # the default ranking and head
    chosen = load_plan(plan)
    assert len(chosen.blocks) == blocks and len(chosen.spd_blocks) == 5
    rel = relative(chosen)
    costly = {i for i in chosen.spd_blocks if rel[i] != 0}
    trained = {int(i) for i in distill["final_mse"]}
    assert costly and costly <= trained                     # nothing that changes the model is left untrained
    assert trained == {b.index for b in chosen.blocks if b.cls in ("SB", "ESB")}
    assert distill["lr"] == lr                               # SmolLM2: the lr rule; Gemma 3: its recipe
    with open(f"{ckpt}/provenance.json") as f:
        assert set(json.load(f)["final_mse"]) == {str(i) for i in trained}
