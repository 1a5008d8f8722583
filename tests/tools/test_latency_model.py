"""scripts/benchmarks/latency_model.py on a synthetic bench that follows the alpha-beta model exactly: held-out
predictions reproduce it, a row that breaks the model is the one flagged, and the paper check's arithmetic."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("latency_model", Path(__file__).parents[2] / "scripts" / "benchmarks" / "latency_model.py")
lm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm)

ALPHA, BETA, HIDDEN, L = 1.0, 2e-4, 576, 30   # ms, ms per byte


def synthetic_bench(slow=None):
    settings = {"prefill_len": 512}
    rows = []
    for w, compute in (("decode_b1", 40.0), ("decode_b8", 60.0), ("decode_b32", 90.0), ("prefill", 900.0)):
        t = ALPHA + BETA * lm.message_bytes(w, settings, HIDDEN)
        base = compute + (2 * L + 1) * t
        for k in (0, 8, 15, 22, 30):
            n = 2 * L + 1 - k
            ms = compute + n * t
            if (w, k) == slow:
                ms *= 1.10
            row = {"config": f"spd{k}", "comm": "gloo", "workload": w, "spd_blocks": k, "median_ms": ms,
                   "allreduce_per_forward": n, "allreduce_ms_per_forward": n * t}
            if k:
                row.update(ratio=ms / base, ratio_ci95=[ms / base - 0.005, ms / base + 0.005])
            rows.append({**row, "config": "spd0"} if k == 0 else row)
    return {"rows": rows, "settings": settings}


def test_fit_recovers_the_constants_and_held_out_rows_are_reproduced():
    fit = lm.fit_and_validate(synthetic_bench(), HIDDEN)["gloo"]
    assert fit["alpha_ms"] == pytest.approx(ALPHA) and fit["beta_ms_per_byte"] == pytest.approx(BETA)
    held = fit["held_out_workload"] + fit["held_out_fraction"]
    assert len(fit["held_out_workload"]) == 4 * 4 and len(fit["held_out_fraction"]) == 4 * 3
    assert all(h["in_ci"] for h in held)
    assert all(h["predicted_ms"] == pytest.approx(h["measured_ms"]) for h in held)


def test_a_row_off_the_model_is_the_one_flagged():
    fit = lm.fit_and_validate(synthetic_bench(slow=("decode_b8", 15)), HIDDEN)["gloo"]
    flagged = {(h["workload"], h["spd_blocks"]) for h in fit["held_out_fraction"] if not h["in_ci"]}
    assert flagged == {("decode_b8", 15)}


def test_paper_check():
    check = lm.paper_check()
    assert check["implied_f_comm"] == pytest.approx(0.197 / 0.35)
    for r in check["workloads"]:   # the needed per-all-reduce time gives exactly that share
        comm = 2 * lm.LLAMA70B["blocks"] * r["t_allreduce_needed_us"] / 1e3
        assert comm / (comm + r["compute_ms"]) == pytest.approx(check["implied_f_comm"])


def test_held_out_workload_is_left_out_of_its_own_fit():
    bench = synthetic_bench()
    for r in bench["rows"]:   # decode_b32's in-call times misreported: only the fits that use them go wrong
        if r["workload"] == "decode_b32":
            r["allreduce_ms_per_forward"] *= 1.5
    held = lm.fit_and_validate(bench, HIDDEN)["gloo"]["held_out_workload"]
    assert all(h["in_ci"] for h in held if h["workload"] == "decode_b32")
    assert not all(h["in_ci"] for h in held if h["workload"] != "decode_b32")
