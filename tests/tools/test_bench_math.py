"""The bench's arithmetic on synthetic samples whose answers are known: paired ratios, savings and the share of
a saving the dropped all-reduces explain (the launcher test in test_multirank runs the measuring part)."""
import pytest

from ds_spd.tools.bench import BenchSettings, noise_warnings, summarize


def _summary(base, spd, ar_base=0.040, ar_spd=0.020):
    configs = [("spd0", "gloo", []), ("spd100", "gloo", list(range(30)))]
    samples = {("spd0", "gloo", "decode_b1"): base, ("spd100", "gloo", "decode_b1"): spd}
    comm = {("spd0", "gloo", "decode_b1"): [{"allreduce_per_forward": 61, "allreduce_seconds_per_forward": ar_base}] * len(base),
            ("spd100", "gloo", "decode_b1"): [{"allreduce_per_forward": 31, "allreduce_seconds_per_forward": ar_spd}] * len(spd)}
    rows = summarize(configs, ["decode_b1"], samples, comm, BenchSettings(), 30)["rows"]
    return {r["config"]: r for r in rows}


def test_saving_and_share_explained():
    base = [0.100, 0.104, 0.098, 0.102]
    rows = _summary(base, [b - 0.030 for b in base])
    z, s = rows["spd0"], rows["spd100"]
    assert z["outside_ms_per_forward"] == pytest.approx(61.0)        # median of 60, 64, 58, 62
    assert s["saving_ms"] == pytest.approx(30.0) and s["effect"] == "faster"
    per_reduce = 40.0 / 61
    assert s["dropped_allreduce_ms"] == pytest.approx(30 * per_reduce)
    assert s["ideal_ms"] == pytest.approx(z["median_ms"] - 30 * per_reduce)
    assert s["explained_share"] == pytest.approx(30 * per_reduce / 30.0)   # < 1: time outside the calls fell too


def test_no_share_without_a_demonstrated_saving():
    base = [0.100, 0.104, 0.098, 0.102]
    rows = _summary(base, [0.101, 0.099, 0.103, 0.097])   # no effect: nothing to explain
    assert rows["spd100"]["effect"] == "no effect" and rows["spd100"]["explained_share"] is None


def test_noise_warning_names_the_noisy_row():
    rows = _summary([0.100, 0.150, 0.098, 0.102], [0.07, 0.07, 0.07, 0.07])
    result = {"rows": list(rows.values()),
              "noise": {"start": {"other_processes_cpu_percent": 0.0}, "end": {"other_processes_cpu_percent": 0.0}}}
    assert noise_warnings(result) == ["decode_b1 on gloo: 0%-SPD spread 51% of the median over the repeats: noisy"]


def test_paired_serving_ratios_pair_by_repeat():
    from ds_spd.tools.bench_serve import paired_table
    runs = [{"path": "gloo", "load_name": "rate 1", "engine": e, "repeat": k, "output_throughput": 10.0,
             "tpot": {"p50_ms": base * (0.8 if e == "all" else 1.0)}, "ttft": {"p50_ms": 5.0}, "e2el": {"p50_ms": 9.0}}
            for k, base in enumerate([50.0, 70.0, 60.0]) for e in ("tp", "all")]
    (row,) = paired_table(runs)
    assert row["engine"] == "all" and row["tpot"]["ratio"] == pytest.approx(0.8)
    assert row["tpot"]["effect"] == "faster" and row["ttft"]["effect"] == "no effect"
