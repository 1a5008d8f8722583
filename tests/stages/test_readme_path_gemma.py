"""The README's path (scan -> plan -> distill) through the CLI with Gemma 3 270M's defaults (quick preset): its
recipe's zero-shot isolated scan ranked by KL, its lr and its KL stage; every chosen block that changes the model is
trained."""
import json

import pytest
from helpers import readme_path

from ds_spd.plan import load_plan


@pytest.mark.real_model
def test_readme_path_gemma3_kl_ranking_and_its_recipe(tmp_path):
    config = tmp_path / "quick.json"   # the model's recipe applies under a config that does not set its keys
    config.write_text(json.dumps({"spd": {"distill": {"epochs": 1}}}))
    scan, distill, plan = readme_path("gemma3-270m", tmp_path, ["--config", str(config)])
    assert (scan["method"], scan["ranking"], scan["metric"]) == ("isolated", "zero-shot", "kl")
    assert min(scan["sensitivity"]) > 0                             # KL: no block scores below the TP model
    assert load_plan(plan).scan["metric"] == "kl"
    assert distill["lr"] == 2e-4                                    # the lr rule on Gemma 3's weights
    assert distill["calibration"]["dataset"] == "pydoc+shakespeare+docstrings"   # every model's distillation corpora
    # its recipe's end-to-end KL stage ran over the whole model (the 262k-token head included)
    assert distill["kl_stage"]["history"] and distill["kl_stage"]["final_kl"] <= distill["kl_stage"]["initial_kl"]
