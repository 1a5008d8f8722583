"""Plan selection rules, and the scan -> plan -> eval path through the CLI (tiny model)."""
import json
import os

import pytest
from helpers import cli_json, launch, last_json, tiny_config

from ds_spd.errors import PlanError
from ds_spd.plan import Plan, load_plan
from ds_spd.stages.planner import select

SENS = [0.9, 0.0, 0.2, -0.05, 0.08, 0.4]  # baseline 10 -> relative 9%, 0, 2%, -0.5%, 0.8%, 4%


def scanned_plan():
    plan = Plan.from_blocks("tiny", tiny_config(num_hidden_layers=6), 2, [])
    for b, s in zip(plan.blocks, SENS):
        b.sensitivity = s
    plan.scan = {"method": "cumulative", "metric": "ppl", "baseline": 10.0}
    return plan


def test_count_fraction_and_classes():
    plan = select(scanned_plan(), count=4)
    assert plan.spd_blocks == [1, 2, 3, 4]
    # default thresholds (0, 5%): only a block whose SPD form is measured to change nothing stays untrained (ISB);
    # block 3's negative delta is a change of the model (a cumulative scan: it undid part of the later blocks'
    # damage) that happened to help the calibration text, no measured zero cost: distilled
    assert {b.index: b.cls for b in plan.blocks} == {0: "TP", 1: "ISB", 2: "SB", 3: "SB", 4: "SB", 5: "TP"}
    assert select(scanned_plan(), fraction=0.5).spd_blocks == [1, 3, 4]
    everything = select(scanned_plan(), count=6, thresholds=(0.01, 0.05))
    # classed by the size of the delta: |-0.5%| and 0.8% are within t1 = 1%
    assert [b.cls for b in everything.blocks] == ["ESB", "ISB", "SB", "ISB", "ISB", "SB"]
    # a large negative delta is a large change: ESB, in either scan
    for method in ("cumulative", "isolated"):
        big = scanned_plan()
        big.scan["method"] = method
        big.blocks[3].sensitivity = -2.0
        assert select(big, count=4).blocks[3].cls == "ESB"


def test_thresholds_rule_excludes_esb():
    plan = select(scanned_plan(), thresholds=(0.005, 0.03))
    assert plan.spd_blocks == [1, 2, 3, 4]
    assert plan.selection["rule"] == "thresholds"


def test_budget_is_validated_by_measurement():
    calls = []

    def measure(blocks):  # the real model is worse than predicted: each block costs 1% on top
        calls.append(sorted(blocks))
        return 20.0 * (1 + sum(SENS[b] for b in blocks) / 10 + 0.01 * len(blocks))

    plan = select(scanned_plan(), max_increase=0.03, measure=measure)
    # predicted (cumulative relative): [3]-0.5%, [1]0, [4]0.8%, [2]2% -> 4 blocks fit 3%; measured: 4 blocks
    # +5.3%, 3 blocks +3.3%, 2 blocks +1.5% -> 2
    assert plan.spd_blocks == [1, 3]
    assert calls == [[], [1, 2, 3, 4], [1, 3, 4], [1, 3]]
    assert plan.selection["measured_increase"] == pytest.approx(0.015)
    assert plan.selection["validation_baseline"] == 20.0


def test_a_kl_scan_ranks_and_budgets_in_nats():
    plan = scanned_plan()
    plan.scan = {"method": "isolated", "metric": "kl", "baseline": 0.0}
    for b, kl in zip(plan.blocks, [0.3, 0.0, 0.004, 0.02, 0.01, 0.06]):
        b.sensitivity = kl
    chosen = select(plan, count=5)
    # r = the KL itself (no baseline to divide by): 0 -> ISB, up to 0.05 nats -> SB, beyond -> ESB
    assert chosen.spd_blocks == [1, 2, 3, 4, 5]
    assert {b.index: b.cls for b in chosen.blocks if b.cls != "TP"} == {1: "ISB", 2: "SB", 3: "SB", 4: "SB", 5: "ESB"}
    # the budget's first guess is the summed KL (0, .004, .014 within 3%; .034 not), then the measurement decides
    calls = []

    def measure(blocks):
        calls.append(sorted(blocks))
        return 10.0 * (1 + 0.01 * len(blocks))

    assert select(plan, max_increase=0.03, measure=measure).spd_blocks == [1, 2, 4]
    assert calls == [[], [1, 2, 4], [1, 2, 3, 4]]


def test_selection_errors():
    with pytest.raises(PlanError, match="one rule"):
        select(scanned_plan(), count=2, fraction=0.5)
    with pytest.raises(PlanError, match="spd count"):
        select(scanned_plan(), count=7)
    with pytest.raises(PlanError, match="no sensitivities"):
        select(Plan.from_blocks("tiny", tiny_config(), 2, []), count=1)
    with pytest.raises(PlanError, match="validated"):
        select(scanned_plan(), max_increase=0.01)


def test_cli_scan_plan_eval(tiny_dir, tmp_path):
    from helpers import run_cli_batch
    out = str(tmp_path / "plan.json")
    data = ["--max-samples", "4", "--seq-len", "32", "--batch-size", "2"]
    # four commands in one process (tests/support/cli_batch.py), in order: each reads what the one before wrote
    results = run_cli_batch([
        ["scan", "--model", tiny_dir, "--virtual-tp", "2", *data, "--out", out, "--json"],
        ["plan", "--plan", out, "--spd-count", "2", "--json"],
        ["eval", "--model", tiny_dir, "--virtual-tp", "2", "--plan", out, *data, "--json"],
        ["plan", "--plan", out, "--model", tiny_dir, "--max-ppl-increase", "50%", "--out",
         str(tmp_path / "budget.json"), *data, "--json"]], str(tmp_path))
    assert [r["code"] for r in results] == [0, 0, 0, 0], [r["stderr"][-2000:] for r in results]
    scan, chosen, ev, budget = (last_json(r["stdout"]) for r in results)
    assert os.path.isfile(str(tmp_path / "plan.png"))
    plan = load_plan(out)
    assert plan.tp_size == 2 and plan.scan["method"] == "isolated"   # the default scan
    assert [b.sensitivity for b in plan.blocks] == pytest.approx(scan["sensitivity"])
    least = sorted(range(4), key=lambda i: (scan["sensitivity"][i], -i))[:2]
    assert chosen["spd_blocks"] == sorted(least) and plan.spd_blocks == sorted(least)
    assert ev["spd_blocks"] == sorted(least)
    sel = budget["selection"]
    assert sel["rule"] == "max_increase" and sel["measured_increase"] <= 0.5
    assert len(budget["spd_blocks"]) > 0 and sel["spd_count"] == len(budget["spd_blocks"])  # not vacuously met


@pytest.mark.multirank
def test_scan_data_parallel_under_launcher_equals_single_process(tiny_dir, tmp_path, capsys):
    # the head's dtype pinned: "auto" times a product on this machine, and a busy machine can pick bf16 in one process
    # and fp32 in the other (a 8e-5 relative difference, seen once under load)
    data = ["--max-samples", "4", "--seq-len", "32", "--batch-size", "2", "--tp", "2", "--head-dtype", "float32"]
    single = cli_json(["scan", "--model", tiny_dir, *data, "--virtual-tp", "2", "--out", str(tmp_path / "a.json")],
                      capsys)   # in this process
    multi = last_json(launch(["ds_spd", "scan", "--model", tiny_dir, *data, "--out", str(tmp_path / "b.json"),
                              "--json"], module=True).stdout)
    assert multi["baseline"] == pytest.approx(single["baseline"], rel=1e-5)
    # the same sums, batched differently across ranks: equal up to float rounding of the perplexity
    assert multi["sensitivity"] == pytest.approx(single["sensitivity"], abs=1e-5 * single["baseline"])
    assert json.load(open(tmp_path / "b.json"))["measured_with"]["ranks"] == 2


def test_distill_says_what_it_leaves_untrained_with_its_cost_and_flags_an_old_plans_classes():
    from ds_spd.stages.distill.run import untrained_note
    assert untrained_note(select(scanned_plan(), count=4)) == [
        "not trained (ISB, zero-shot SPD): block(s) 1 (+0%) by the cumulative scan"]
    # ISB by the user's threshold: said, each with its measured cost
    assert untrained_note(select(scanned_plan(), count=4, thresholds=(0.01, 0.05))) == [
        "not trained (ISB, zero-shot SPD): block(s) 1 (+0%), 3 (-0.5%), 4 (+0.8%) by the cumulative scan"]
    old = select(scanned_plan(), count=4)   # a plan written when a negative delta was classed ISB
    old.blocks[3].cls = "ISB"
    note = untrained_note(old)
    assert "3 (-0.5%)" in note[0] and note[1].startswith("block(s) [3] change the model by more than the ISB threshold")
