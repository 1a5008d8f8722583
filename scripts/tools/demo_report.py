"""Assemble runs/demo/report.md from the demo's JSON outputs (see scripts/tools/demo.sh)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ds_spd.tools.evaluation import paired_ratio_ci  # noqa: E402


def load(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def _ci(ci, digits):
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _ratio(r):
    return f"{r['ratio']:.4f} [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] ({r['verdict']})"


def recipe(distill: dict) -> str:
    """The settings the checkpoint was trained with, from its provenance."""
    prov = load(distill["checkpoint"], "provenance.json")
    s, cal = prov["settings"], prov["calibration"]
    return (f"head grouping: {s.get('head_grouping', '?')}, MLP matching: {s.get('mlp_matching', '?')}; "
            f"calibration {cal['dataset']} {cal['max_samples']} x {cal['seq_len']} tokens; {s['epochs']} epochs at most, "
            f"lr {s['lr']:g}")


def eval_table(evals: dict) -> list[str]:
    """Table rows of the three evaluations, then distilled vs zero-shot (paired)."""
    lines = []
    for name, e in evals.items():
        ratio = "—" if name == "tp" else _ratio(paired_ratio_ci(evals["tp"], e))
        lines.append(f"| {name} | {len(e['spd_blocks'])} | {e['perplexity']:.3f} {_ci(e['perplexity_ci95'], 2)} | "
                     f"{ratio} | {e['accuracy']:.4f} {_ci(e['accuracy_ci95'], 4)} | {e['allreduce_per_forward']:.0f} |")
    d = paired_ratio_ci(evals["zero_shot"], evals["distilled"])
    return lines + ["", f"Distilled vs zero-shot SPD: perplexity ratio {_ratio(d)}."]


def main(out: str) -> None:
    plan = load(out, "plan_summary.json")
    distill = load(out, "distill.json")
    evals = {k: load(out, f"eval_{k}.json") for k in ("tp", "zero_shot", "distilled")}
    gen = load(out, "generate.json")["generations"][0]
    lines = ["# ds_spd demo: SmolLM2-135M, tensor parallel on 2 CPU ranks", "",
             "## Sensitivity scan and plan", "", "![plan](plan.png)", "",
             f"SPD blocks ({len(plan['spd_blocks'])}): {plan['spd_blocks']}; classes: {plan['classes']}", "",
             f"## Distillation (DeepSpeed ZeRO, B2B; {recipe(distill)})", "",
             "| block | MSE before | MSE after |", "|---|---|---|"]
    for i in sorted(distill["final_mse"], key=int):
        lines.append(f"| {i} | {distill['initial_mse'][i]:.4g} | {distill['final_mse'][i]:.4g} |")
    lines += ["", f"{distill['seconds']:.0f} s, {distill['tokens_per_second']:.0f} block-tokens/s, ZeRO stage "
              f"{distill['zero_stage']}, peak memory {distill['peak_memory_bytes'] / 2**30:.2f} GiB on rank 0 "
              f"({distill.get('trainer', 'joint')} trainer). MSE on the first calibration micro-batch, before and "
              "after training.", ""]
    kl = distill.get("kl_stage")
    if kl:   # the end-to-end stage after the blocks (SmolLM2's recipe)
        lines += [f"Then the end-to-end KL stage (the trained blocks together, KL of the SPD model's next-token "
                  f"distribution to TP's): {kl['initial_kl']:.4g} -> {kl['final_kl']:.4g} per token on the "
                  f"{kl['measured_on']}, epoch {kl['best_epoch']} kept, {kl['seconds']:.0f} s.", ""]
    lines += ["## Tensor-parallel evaluation (2 ranks, held-out text)", "",
              "Intervals: 95% bootstrap over segments; the ratio's interval is paired (the same segment draws for "
              "both models), so it measures the difference between the models rather than the spread of the text.",
              "", "| model | SPD blocks | perplexity (95% CI) | ratio to TP (paired 95% CI) | top-1 accuracy (95% CI) "
              "| all-reduces / forward |", "|---|---|---|---|---|---|"]
    lines += eval_table(evals)
    shak = os.path.join(out, "shakespeare")
    if os.path.isdir(shak):
        lines += ["", "Shakespeare test split (32 segments; part of the default calibration mixture):", "",
                  "| model | SPD blocks | perplexity (95% CI) | ratio to TP (paired 95% CI) | top-1 accuracy (95% CI) "
                  "| all-reduces / forward |", "|---|---|---|---|---|---|"]
        lines += eval_table({k: load(shak, f"eval_{k}.json") for k in ("tp", "zero_shot", "distilled")})
    lines += ["", f"Generation with the distilled checkpoint: *{gen['prompt']}*{gen['completion']} "
              f"({gen['ms_per_token']:.1f} ms/token)", "", "## Latency", "", "![bench](bench/bench.png)", ""]
    with open(os.path.join(out, "bench", "bench.md")) as f:
        lines.append(f.read())
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
