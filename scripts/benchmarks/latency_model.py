"""Alpha-beta latency model: what is *fitted* to `ds-spd bench` (and checked on held-out configurations), and
what is *assumed* to project LLaMA2-70B on 8 GPUs (each constant with its source), checked against the
paper's own figure.

Model of one forward with k of L blocks in SPD form, one all-reduce of ``bytes`` per sync point:

    T(k) = C + (2L + e - k) * t(bytes),   t(bytes) = alpha + beta * bytes     e: syncs outside blocks (lm_head)

so the saving is k * t / T(0) = f_comm * k / (2L + e), f_comm being the share of T(0) spent in all-reduces.

1. Fitted (CPU ranks, one bench.json): per all-reduce path, alpha and beta by least squares over the
   (message bytes, measured ms per whole all-reduce) points of the workloads.
2. Held out: (a) leave one workload (message size) out: fit alpha, beta on the others, predict the
   held-out workload's per-reduce time and the latency of its SPD rows, T(k) = T(0) - k t; (b) the slope in
   k: from the 0% and 100% rows' latencies alone, predict the intermediate fractions. A prediction counts as
   reproduced where it lies in the measured paired ratio's 95% interval.
3. Projected (NOT measured): LLaMA2-70B on 8 GPUs from assumed constants (ASSUMED, with sources), and the
   paper's 19.7% at 70% SPD turned into the all-reduce share it implies, f_comm = 0.197 / 0.35.

    python scripts/benchmarks/latency_model.py runs/bench_quiet/bench.json --out runs/latency_model
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

# Each projection constant: value and where it comes from. Nothing here was measured by this project.
ASSUMED = {
    "hbm_tb_s": (1.5, "A100-SXM4-80GB HBM2e peak is 2.039 TB/s (NVIDIA A100 datasheet); 1.5 TB/s (74% of peak) is an "
                      "assumed effective rate for decode's weight streaming"),
    "peak_tflops": (312.0, "A100 dense BF16/FP16 tensor-core peak (NVIDIA A100 datasheet)"),
    "mfu": (0.5, "assumed model-FLOPs utilisation of prefill"),
    "alpha_us": (15.0, "assumed per-all-reduce latency; NCCL all_reduce_perf reports ~10 us for small messages on "
                       "2 x A100-SXM4 over NVLink (github.com/NVIDIA/nccl/issues/583) and ~30 us between two PCIe "
                       "nodes (github.com/NVIDIA/nccl/issues/757); used for both links"),
    "links_GB_s": ((300, 10), "the paper's two settings: NVLink (A100: 600 GB/s both directions, 300 GB/s each, "
                              "datasheet) and P2P disabled (10 GB/s, the paper's figure)"),
    "ring": ("2 (N-1)/N * bytes / bandwidth", "ring all-reduce bus-bandwidth factor as NCCL's tests define it "
                                             "(nccl-tests doc/PERFORMANCE.md)"),
}
LLAMA70B = {"blocks": 80, "hidden": 8192, "params": 69e9, "bytes_per_value": 2, "gpus": 8}
PAPER = {"saving": 0.197, "spd_fraction": 0.7, "source": "Kim et al., ICML 2025: LLaMA2-70B, 8 x A100, low bandwidth"}


def _value(key):
    return ASSUMED[key][0]


def message_bytes(workload: str, settings: dict, hidden: int, bytes_per_value: int = 4) -> int:
    tokens = settings["prefill_len"] if workload == "prefill" else int(workload.split("_b")[1])
    return tokens * hidden * bytes_per_value


def _points(rows, path, settings, hidden, workloads):
    return [(message_bytes(r["workload"], settings, hidden), r["allreduce_ms_per_forward"] / r["allreduce_per_forward"])
            for r in rows if r["comm"] == path and r["workload"] in workloads and r.get("allreduce_per_forward")]


def fit_alpha_beta(points) -> tuple[float, float]:
    x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    beta, alpha = np.polyfit(x, y, 1)
    return float(alpha), float(beta)


def _in_ci(r, predicted_ms, base_ms):
    ratio = predicted_ms / base_ms
    lo, hi = r.get("ratio_ci95", (None, None))
    return {"predicted_ratio": ratio, "measured_ratio": r.get("ratio"), "measured_ci95": r.get("ratio_ci95"),
            "in_ci": None if lo is None else bool(lo <= ratio <= hi)}


def fit_and_validate(result: dict, hidden: int) -> dict:
    rows, settings = result["rows"], result["settings"]
    workloads = sorted({r["workload"] for r in rows})
    out = {}
    for path in sorted({r["comm"] for r in rows if r["config"] != "autotp"}):
        zero = {r["workload"]: r for r in rows if r["comm"] == path and r["config"] == "spd0"}
        alpha, beta = fit_alpha_beta(_points(rows, path, settings, hidden, workloads))
        f_comm = {w: z["allreduce_ms_per_forward"] / z["median_ms"] for w, z in zero.items()}
        held_workload, held_k = [], []
        for w in workloads:   # (a) leave this workload's message size out of the fit
            others = [o for o in workloads if o != w]
            if len({message_bytes(o, settings, hidden) for o in others}) < 2:
                continue
            a, b = fit_alpha_beta(_points(rows, path, settings, hidden, others))
            size = message_bytes(w, settings, hidden)
            z = zero[w]
            t_pred = a + b * size
            t_meas = z["allreduce_ms_per_forward"] / z["allreduce_per_forward"]
            for r in rows:
                if r["comm"] == path and r["workload"] == w and r["config"] != "spd0":
                    dropped = z["allreduce_per_forward"] - r["allreduce_per_forward"]
                    pred = z["median_ms"] - dropped * t_pred
                    held_workload.append({"workload": w, "message_KB": size / 1024, "spd_blocks": r["spd_blocks"],
                                          "t_predicted_us": 1e3 * t_pred, "t_measured_us": 1e3 * t_meas,
                                          "predicted_ms": pred, "measured_ms": r["median_ms"],
                                          **_in_ci(r, pred, z["median_ms"])})
        for w in workloads:   # (b) the slope in k from the end points, intermediate fractions held out
            z = zero[w]
            ends = [r for r in rows if r["comm"] == path and r["workload"] == w and r["config"] != "spd0"]
            full = max(ends, key=lambda r: r["spd_blocks"])
            slope = (z["median_ms"] - full["median_ms"]) / (z["allreduce_per_forward"] - full["allreduce_per_forward"])
            for r in ends:
                if r is full:
                    continue
                pred = z["median_ms"] - slope * (z["allreduce_per_forward"] - r["allreduce_per_forward"])
                held_k.append({"workload": w, "spd_blocks": r["spd_blocks"], "slope_ms_per_sync": slope,
                               "predicted_ms": pred, "measured_ms": r["median_ms"], **_in_ci(r, pred, z["median_ms"])})
        out[path] = {"alpha_ms": alpha, "beta_ms_per_byte": beta, "f_comm_at_0": f_comm,
                     "held_out_workload": held_workload, "held_out_fraction": held_k}
    return out


def ring_allreduce_s(msg_bytes: float, bw_GB_s: float, alpha_us: float, n: int) -> float:
    return alpha_us * 1e-6 + 2 * (n - 1) / n * msg_bytes / (bw_GB_s * 1e9)


def _compute_s(tokens: int) -> float:
    m = LLAMA70B
    weight_bytes = m["params"] * m["bytes_per_value"] / m["gpus"]
    flops = 2 * m["params"] * tokens / m["gpus"]
    return max(weight_bytes / (_value("hbm_tb_s") * 1e12), flops / (_value("peak_tflops") * 1e12 * _value("mfu")))


WORKLOADS_70B = (("decode_b1", 1), ("decode_b16", 16), ("prefill_1x2048", 2048))


def project(spd_fraction: float = PAPER["spd_fraction"]) -> list[dict]:
    """LLaMA2-70B, TP 8: per-forward latency without and with ``spd_fraction`` of the blocks in SPD form."""
    m, out = LLAMA70B, []
    k = round(spd_fraction * m["blocks"])
    for workload, tokens in WORKLOADS_70B:
        compute_s = _compute_s(tokens)
        msg = tokens * m["hidden"] * m["bytes_per_value"]
        for bw in _value("links_GB_s"):
            t_ar = ring_allreduce_s(msg, bw, _value("alpha_us"), m["gpus"])
            base = compute_s + 2 * m["blocks"] * t_ar
            spd = compute_s + (2 * m["blocks"] - k) * t_ar
            out.append({"workload": workload, "bandwidth_GB_s": bw, "message_KB": msg / 1024,
                        "f_comm": 2 * m["blocks"] * t_ar / base, "baseline_ms": 1e3 * base, "spd_ms": 1e3 * spd,
                        "saving": 1 - spd / base})
    return out


def paper_check() -> dict:
    """The all-reduce share the paper's saving implies under the bound, and per workload the per-all-reduce time
    (and the alpha at 10 GB/s) the assumed compute would need to produce it."""
    m = LLAMA70B
    bound = PAPER["spd_fraction"] / 2   # k / 2L
    f = PAPER["saving"] / bound
    rows = []
    for workload, tokens in WORKLOADS_70B:
        compute_s = _compute_s(tokens)
        t_needed = f / (1 - f) * compute_s / (2 * m["blocks"])
        msg = tokens * m["hidden"] * m["bytes_per_value"]
        alpha_needed = t_needed - ring_allreduce_s(msg, 10, 0.0, m["gpus"])
        rows.append({"workload": workload, "compute_ms": 1e3 * compute_s, "t_allreduce_needed_us": 1e6 * t_needed,
                     "alpha_needed_at_10GB_s_us": 1e6 * alpha_needed if alpha_needed > 0 else None,
                     "t_allreduce_assumed_10GB_s_us": 1e6 * ring_allreduce_s(msg, 10, _value("alpha_us"), m["gpus"])})
    return {"implied_f_comm": f, "bound_k_over_2L": bound, "workloads": rows, **PAPER}


def _num(x):
    return "-" if x is None else f"{x:.3f}"


def _verdict(h):
    return "-" if h["in_ci"] is None else ("yes" if h["in_ci"] else "no")


def _ratio_cell(h):
    ci = h["measured_ci95"] or (None, None)
    return f"{_num(h['predicted_ratio'])} | {_num(h['measured_ratio'])} ({_num(ci[0])}-{_num(ci[1])}) | {_verdict(h)}"


def markdown(fits: dict, projection: list[dict], check: dict) -> str:
    lines = ["## Fitted to measurements (CPU ranks)", "",
             "| bench | path | alpha (us) | beta (us/KB) | all-reduce share of latency at 0% SPD, per workload |",
             "|---|---|---|---|---|"]
    for b, per_path in fits.items():
        for path, fp in per_path.items():
            shares = ", ".join(f"{w} {v:.0%}" for w, v in sorted(fp["f_comm_at_0"].items()))
            lines.append(f"| {b} | {path} | {1e3 * fp['alpha_ms']:.1f} | {1e3 * fp['beta_ms_per_byte'] * 1024:.3f} | "
                         f"{shares} |")
    lines += ["", "### Held out: one workload's message size left out of the fit",
              "", "Predicted latency T(k) = T(0) - (dropped syncs) x t(size), with t from the other workloads' fit.", "",
              "| path | held-out workload | message KB | t predicted / measured (us) | SPD blocks | "
              "predicted ms | measured ms | predicted ratio | measured ratio (95% CI) | in CI |", "|---" * 10 + "|"]
    for per_path in fits.values():
        for path, fp in per_path.items():
            lines += [f"| {path} | {h['workload']} | {h['message_KB']:.1f} | {h['t_predicted_us']:.0f} / "
                      f"{h['t_measured_us']:.0f} | {h['spd_blocks']} | {h['predicted_ms']:.2f} | {h['measured_ms']:.2f} | "
                      f"{_ratio_cell(h)} |" for h in fp["held_out_workload"]]
    lines += ["", "### Held out: intermediate SPD fractions predicted from the 0% and 100% latencies", "",
              "| path | workload | SPD blocks | predicted ms | measured ms | predicted ratio | "
              "measured ratio (95% CI) | in CI |", "|---" * 8 + "|"]
    for per_path in fits.values():
        for path, fp in per_path.items():
            lines += [f"| {path} | {h['workload']} | {h['spd_blocks']} | {h['predicted_ms']:.2f} | "
                      f"{h['measured_ms']:.2f} | {_ratio_cell(h)} |" for h in fp["held_out_fraction"]]
    lines += ["", "## Assumed, not measured: the projection's constants", "", "| constant | value | source |",
              "|---|---|---|"]
    lines += [f"| {k} | {v} | {src} |" for k, (v, src) in ASSUMED.items()]
    m = LLAMA70B
    lines += ["", f"## Projected, not measured: LLaMA2-70B ({m['blocks']} blocks, hidden {m['hidden']}, fp16), "
                  f"TP {m['gpus']}, {PAPER['spd_fraction']:.0%} of blocks SPD", "",
              "| workload | link GB/s | message KB | share of time in all-reduce | baseline ms | SPD ms | saving |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['bandwidth_GB_s']} | {r['message_KB']:.0f} | {r['f_comm']:.0%} | "
              f"{r['baseline_ms']:.2f} | {r['spd_ms']:.2f} | {r['saving']:.1%} |" for r in projection]
    lines += ["", "## Check against the paper", "",
              f"{check['source']}: {check['saving']:.1%} lower end-to-end latency at {check['spd_fraction']:.0%} SPD. "
              f"Under the bound (saving = f_comm x k / 2L, k / 2L = {check['bound_k_over_2L']:.2f}) that is an "
              f"all-reduce share of **{check['implied_f_comm']:.0%}** of its latency. With the assumed compute, each "
              "workload needs this time per all-reduce to reach that share:", "",
              "| workload | assumed compute ms | t per all-reduce needed (us) | assumed at 10 GB/s (us) | "
              "alpha needed at 10 GB/s (us) |", "|---|---|---|---|---|"]
    for r in check["workloads"]:
        a = r["alpha_needed_at_10GB_s_us"]
        lines.append(f"| {r['workload']} | {r['compute_ms']:.2f} | {r['t_allreduce_needed_us']:.0f} | "
                     f"{r['t_allreduce_assumed_10GB_s_us']:.0f} | {'-' if a is None else f'{a:.0f}'} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bench", nargs="+", help="bench.json files from `ds-spd bench`")
    p.add_argument("--hidden", type=int, default=576, help="hidden size of the benched model (SmolLM2-135M: 576)")
    p.add_argument("--out", default="runs/latency_model")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    fits = {b: fit_and_validate(json.load(open(b)), args.hidden) for b in args.bench}
    projection, check = project(), paper_check()
    with open(os.path.join(args.out, "latency_model.json"), "w") as f:
        json.dump({"fits": fits, "assumed": {k: {"value": v, "source": s} for k, (v, s) in ASSUMED.items()},
                   "model": LLAMA70B, "projection": projection, "paper_check": check}, f, indent=2)
    text = markdown(fits, projection, check)
    with open(os.path.join(args.out, "latency_model.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
