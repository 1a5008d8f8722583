"""Alpha-beta latency model: fitted to `ds-spd bench` measurements, then used to project LLaMA2-70B on 8 GPUs.

Model of one forward with k of L blocks in SPD form (one all-reduce of `bytes` per sync point):

    T(k) = C + (2L - k + e) * (alpha + beta * bytes)        e: all-reduces outside the blocks (lm_head)

1. Fit (measured): per all-reduce path, alpha and beta by least squares over the bench's (message bytes,
   measured ms per all-reduce) points; C from the 0%-SPD rows. Then T(k) is predicted for every SPD row
   and compared with the measurement.
2. Project (NOT measured): LLaMA2-70B (80 blocks, hidden 8192, fp16) on 8 GPUs, ring all-reduce
   alpha + 2 (N-1)/N * bytes / bandwidth at 300 GB/s and 10 GB/s, with stated assumptions for alpha and
   for compute (memory-bound decode at an effective HBM bandwidth, compute-bound prefill at an MFU).

    python scripts/latency_model.py runs/bench_smollm2_tp2/bench.json --out runs/latency_model
"""
import argparse
import json
import os

import numpy as np

HIDDEN_SMOLLM2 = 576
# Projection assumptions (A100-80GB class, as in the paper), stated, not measured here.
GPU = {"alpha_us": 15.0, "hbm_tb_s": 1.5, "peak_tflops": 312.0, "mfu": 0.5}
LLAMA70B = {"blocks": 80, "hidden": 8192, "params": 69e9, "bytes_per_value": 2}


def message_bytes(workload: str, settings: dict) -> int:
    tokens = settings["prefill_len"] if workload == "prefill" else int(workload.split("_b")[1])
    return tokens * HIDDEN_SMOLLM2 * 4  # fp32 activations


def fit(result: dict) -> dict:
    rows, settings = result["rows"], result["settings"]
    fits = {}
    for path in sorted({r["comm"] for r in rows if r["config"] != "autotp"}):
        pts = [(message_bytes(r["workload"], settings), r["allreduce_ms_per_forward"] / r["allreduce_per_forward"])
               for r in rows if r["comm"] == path and r.get("allreduce_per_forward")]
        x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        beta, alpha = np.polyfit(x, y, 1)
        compute = {r["workload"]: r["median_ms"] - r["allreduce_per_forward"] * (alpha + beta * message_bytes(r["workload"], settings))
                   for r in rows if r["comm"] == path and r["config"] == "spd0"}
        checks = []
        for r in rows:
            if r["comm"] != path or r["config"] == "autotp":
                continue
            t_ar = alpha + beta * message_bytes(r["workload"], settings)
            predicted = compute[r["workload"]] + r["allreduce_per_forward"] * t_ar
            checks.append({"workload": r["workload"], "spd_blocks": r["spd_blocks"], "measured_ms": r["median_ms"],
                           "predicted_ms": predicted})
        fits[path] = {"alpha_ms": alpha, "beta_ms_per_byte": beta, "compute_ms": compute, "checks": checks,
                      "f_comm_at_0": {w: 1 - compute[w] / next(r["median_ms"] for r in rows if r["comm"] == path
                                                             and r["config"] == "spd0" and r["workload"] == w)
                                      for w in compute}}
    return fits


def project(spd_fraction: float = 0.7) -> list[dict]:
    """LLaMA2-70B, TP 8: per-forward latency without and with `spd_fraction` of the blocks in SPD form."""
    m, n_gpu, out = LLAMA70B, 8, []
    for workload, tokens in (("decode_b1", 1), ("decode_b16", 16), ("prefill_1x2048", 2048)):
        weight_bytes = m["params"] * m["bytes_per_value"] / n_gpu
        flops = 2 * m["params"] * tokens / n_gpu
        compute_s = max(weight_bytes / (GPU["hbm_tb_s"] * 1e12), flops / (GPU["peak_tflops"] * 1e12 * GPU["mfu"]))
        msg = tokens * m["hidden"] * m["bytes_per_value"]
        for bw in (300, 10):
            t_ar = GPU["alpha_us"] * 1e-6 + 2 * (n_gpu - 1) / n_gpu * msg / (bw * 1e9)
            base = compute_s + 2 * m["blocks"] * t_ar
            k = round(spd_fraction * m["blocks"])
            spd = compute_s + (2 * m["blocks"] - k) * t_ar
            out.append({"workload": workload, "bandwidth_GB_s": bw, "f_comm": 2 * m["blocks"] * t_ar / base,
                        "baseline_ms": 1e3 * base, "spd_ms": 1e3 * spd, "saving": 1 - spd / base})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bench", nargs="+", help="bench.json files from `ds-spd bench`")
    p.add_argument("--out", default="runs/latency_model")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    fits = {b: fit(json.load(open(b))) for b in args.bench}
    projection = project()
    with open(os.path.join(args.out, "latency_model.json"), "w") as f:
        json.dump({"fits": fits, "assumptions": {"gpu": GPU, "model": LLAMA70B}, "projection": projection}, f, indent=2)
    lines = ["## Fitted to measurements (CPU ranks)", "",
             "| bench | path | alpha (us) | beta (us/KB) | max abs error of predicted vs measured latency |",
             "|---|---|---|---|---|"]
    for b, per_path in fits.items():
        for path, fp in per_path.items():
            err = max(abs(c["predicted_ms"] - c["measured_ms"]) / c["measured_ms"] for c in fp["checks"])
            lines.append(f"| {b} | {path} | {1e3 * fp['alpha_ms']:.1f} | {1e3 * fp['beta_ms_per_byte'] * 1024:.3f} | "
                         f"{100 * err:.0f}% |")
    lines += ["", "## Projected, not measured: LLaMA2-70B, TP 8, 70% of blocks SPD", "",
              f"Assumptions: all-reduce alpha {GPU['alpha_us']} us, ring all-reduce; decode memory-bound at "
              f"{GPU['hbm_tb_s']} TB/s effective HBM, prefill at {GPU['mfu']:.0%} of {GPU['peak_tflops']} TFLOP/s.",
              "", "| workload | link GB/s | share of time in all-reduce | baseline ms | SPD ms | saving |",
              "|---|---|---|---|---|---|"]
    for r in projection:
        lines.append(f"| {r['workload']} | {r['bandwidth_GB_s']} | {r['f_comm']:.0%} | {r['baseline_ms']:.2f} | "
                     f"{r['spd_ms']:.2f} | {r['saving']:.1%} |")
    lines.append("\nPaper (measured on 8 x A100, low-bandwidth setting): ~19.7% lower end-to-end latency at 70% SPD.")
    with open(os.path.join(args.out, "latency_model.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
