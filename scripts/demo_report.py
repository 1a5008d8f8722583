"""Assemble runs/demo/report.md from the demo's JSON outputs (see scripts/demo.sh)."""
import json
import os
import sys


def load(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def main(out: str) -> None:
    plan = load(out, "plan_summary.json")
    distill = load(out, "distill.json")
    evals = {k: load(out, f"eval_{k}.json") for k in ("tp", "zero_shot", "distilled")}
    gen = load(out, "generate.json")["generations"][0]
    base = evals["tp"]["perplexity"]
    lines = ["# ds_spd demo: SmolLM2-135M, tensor parallel on 2 CPU ranks", "",
             "## Sensitivity scan and plan", "", "![plan](plan.png)", "",
             f"SPD blocks ({len(plan['spd_blocks'])}): {plan['spd_blocks']}; classes: {plan['classes']}", "",
             "## Distillation (DeepSpeed ZeRO, B2B; head grouping for ESB)", "",
             "| block | MSE before | MSE after |", "|---|---|---|"]
    for i in sorted(distill["final_mse"], key=int):
        lines.append(f"| {i} | {distill['initial_mse'][i]:.4g} | {distill['final_mse'][i]:.4g} |")
    lines += ["", f"{distill['seconds']:.0f} s, {distill['tokens_per_second']:.0f} block-tokens/s, ZeRO stage "
              f"{distill['zero_stage']}, peak memory {distill['peak_memory_bytes'] / 2**30:.2f} GiB on rank 0", "",
              "## Tensor-parallel evaluation (2 ranks, held-out text)", "",
              "| model | SPD blocks | perplexity | vs TP | top-1 accuracy | all-reduces / forward |",
              "|---|---|---|---|---|---|"]
    for name, e in evals.items():
        lines.append(f"| {name} | {len(e['spd_blocks'])} | {e['perplexity']:.3f} | "
                     f"{100 * (e['perplexity'] / base - 1):+.1f}% | {e['accuracy']:.4f} | {e['allreduce_per_forward']:.0f} |")
    lines += ["", f"Generation with the distilled checkpoint: *{gen['prompt']}*{gen['completion']} "
              f"({gen['ms_per_token']:.1f} ms/token)", "", "## Latency", "", "![bench](bench/bench.png)", ""]
    with open(os.path.join(out, "bench", "bench.md")) as f:
        lines.append(f.read())
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
