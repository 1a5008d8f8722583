"""Which SPD definition for a sandwich-norm block (Gemma 2/3), on real weights: chosen on validation.

A sandwich block normalises the attention output (``Na``) before adding it to the residual. Under SPD rank r
only has its partial ``Y_r`` when it feeds its MLP slice, and a norm of a partial is not the partial of a
norm, so the rank's MLP input needs a definition (docs/design.md). Compared here:

- ``rank_local`` (ds_spd's): ``U_r = X + Na(Y_r)``: RMSNorm is scale-invariant, so rank r's normalised
  partial stands in for the normalised sum (full magnitude, rank r's direction);
- ``fixed_scale``: ``U_r = X + g ⊙ Y_r / c`` with ``g`` Na's gain and ``c`` the block's mean RMS of the full
  attention output ``ΣY`` on calibration text (the unmodified model's block inputs): rank r's linear share of
  the TP term ``Na(ΣY) = g ⊙ ΣY / rms(ΣY)``, as in the pre-norm block where rank r adds its own ``Y_r``.

Both keep the block output's exact TP form and one all-reduce of ``[Y_r, Z_r]``. Measured per tp: each
block's relative output error against the TP block on held-out calibration segments (all 18 blocks), and the
validation perplexity (pydoc and Shakespeare) with the least sensitive 5/9/13/18 blocks in SPD form (each
definition ranked by its own block errors), as paired ratios to TP with 95% intervals.

    OMP_NUM_THREADS=2 python scripts/experiments/sandwich_definitions.py --model gemma3-270m --tp 2,4 \\
        --out docs/results/sandwich
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import ds_spd  # noqa: E402
from ds_spd.config import DataConfig  # noqa: E402
from ds_spd.core.inject import decoder_layers, set_spd_blocks  # noqa: E402
from ds_spd.data import segments_for  # noqa: E402
from ds_spd.models.loading import load_model  # noqa: E402
from ds_spd.outputs import MD_MARK, check_output_dir, write_atomic, write_json  # noqa: E402
from ds_spd.stages.headgroup import attention_kwargs  # noqa: E402
from ds_spd.stages.scan import BlockInputs  # noqa: E402
from ds_spd.tools.evaluation import evaluate_lm, paired_ratio_ci  # noqa: E402

DEFINITIONS = ("rank_local", "fixed_scale")
EVAL_SETS = {"pydoc": 35, "shakespeare": 32}


def fixed_scale_sandwich(block, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The ``fixed_scale`` SPD form of a sandwich block (``block.scale``: calibrated mean rms(ΣY))."""
    norm_a, norm_o = block.post_attention_layernorm, block.post_feedforward_layernorm
    if not block.spd:
        h = x + norm_a(block.reduce(y, "attn"))
        return h + norm_o(block.reduce(block.mlp_partials(block.ffn_norm(h).unsqueeze(0)), "mlp"))
    z = block.mlp_partials(block.ffn_norm(x + _gain(norm_a, x) * y / block.scale))   # rank r: its linear share
    both = block.reduce(torch.cat([y, z], dim=-1), "spd")
    y_sum, z_sum = both.split(x.shape[-1], dim=-1)
    return x + norm_a(y_sum) + norm_o(z_sum)


def _gain(norm, x: torch.Tensor) -> torch.Tensor:
    """The elementwise gain of an RMSNorm module (what it multiplies a unit-RMS input by)."""
    unit = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    return norm(unit)   # rms(ones) = 1 (up to eps), so this is the gain


@torch.no_grad()
def calibrate(model, inputs: BlockInputs) -> list[float]:
    """Per block: mean over tokens of rms(ΣY), the full attention output before its norm."""
    scales = []
    rotary = model.model.rotary_emb
    for i, layer in enumerate(decoder_layers(model)):
        x = inputs.inputs[i]
        y, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **attention_kwargs(rotary, x, layer))
        total = y.sum(0)                      # [S, B, T, d] partials -> the TP sum
        scales.append(total.pow(2).mean(-1).sqrt().mean().item())
    return scales


@torch.no_grad()
def block_errors(model, inputs: BlockInputs) -> list[float]:
    """Per block: ||SPD block(x) - TP block(x)|| / ||TP block(x) - x|| on the block's own unmodified inputs."""
    rotary, out = model.model.rotary_emb, []
    for i, layer in enumerate(decoder_layers(model)):
        x = inputs.inputs[i]
        kwargs = attention_kwargs(rotary, x, layer)
        layer.spd = False
        tp = layer(x, **kwargs)
        layer.spd = True
        spd = layer(x, **kwargs)
        layer.spd = False
        out.append(((spd - tp).norm() / (tp - x).norm()).item())
    return out


def use_definition(model, name: str, scales: list[float]) -> None:
    import types
    for layer, scale in zip(decoder_layers(model), scales):
        layer.scale = scale
        if name == "fixed_scale":
            layer._sandwich = types.MethodType(fixed_scale_sandwich, layer)
        elif "_sandwich" in layer.__dict__:
            del layer._sandwich


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--tp", default="2,4")
    p.add_argument("--counts", default="5,9,13,18")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    check_output_dir(args.out, "sandwich experiment output", names=("sandwich.json", "sandwich.md"))
    tok = load_model(args.model)[1]
    calib = segments_for(DataConfig(dataset="pydoc+shakespeare", split="train", max_samples=24, seed=0), tok)
    fit, held = calib[:16], calib[16:]
    evals = {name: segments_for(DataConfig(dataset=name, split="validation", max_samples=n,
                                           seed=0 if name == "shakespeare" else None), tok)
             for name, n in EVAL_SETS.items()}
    results: dict = {"model": args.model, "tp": {}}
    counts = [int(c) for c in args.counts.split(",")]
    for tp in (int(t) for t in args.tp.split(",")):
        virtual = ds_spd.virtualize(load_model(args.model)[0], tp)
        t0 = time.perf_counter()
        scales = calibrate(virtual, BlockInputs.capture(virtual, fit, 4, progress=False))
        held_inputs = BlockInputs.capture(virtual, held, 4, progress=False)
        base = {name: evaluate_lm(virtual, segs, 4, progress=False) for name, segs in evals.items()}
        row = {"scales": scales, "tp_perplexity": {k: v["perplexity"] for k, v in base.items()}}
        for name in DEFINITIONS:
            use_definition(virtual, name, scales)
            errors = block_errors(virtual, held_inputs)
            order = sorted(range(len(errors)), key=lambda i: (errors[i], i))
            curve = {}
            for n in counts:
                set_spd_blocks(virtual, order[:n])
                curve[n] = {}
                for data, segs in evals.items():
                    r = evaluate_lm(virtual, segs, 4, progress=False)
                    pr = paired_ratio_ci(base[data], r)
                    curve[n][data] = {"ratio": pr["ratio"], "ci95": pr["ci95"], "perplexity": r["perplexity"]}
                set_spd_blocks(virtual, [])
                print(f"tp {tp} {name} {n}: " + ", ".join(f"{d} {100 * (c['ratio'] - 1):+.1f}%"
                                                          for d, c in curve[n].items()), flush=True)
            row[name] = {"block_errors": errors, "order": order, "curve": curve}
        use_definition(virtual, "rank_local", scales)
        row["seconds"] = time.perf_counter() - t0
        results["tp"][tp] = row
    command = "OMP_NUM_THREADS=%s python scripts/experiments/sandwich_definitions.py %s" % (
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(sys.argv[1:]))
    results["command"] = command
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "sandwich.json"), results, "sandwich")
    lines = [MD_MARK, f"# SPD definitions for sandwich-norm blocks, {args.model} (validation)", "", f"`{command}`", "",
             "Mean relative block error (SPD vs TP block output on held-out calibration segments, over all blocks), "
             "then the validation perplexity ratio to TP [95% paired CI] with the N least-error blocks in SPD form "
             "(pydoc / Shakespeare).", ""]
    for tp, row in results["tp"].items():
        lines += [f"## tp {tp}", "", "| definition | mean block error | " + " | ".join(f"{n} SPD" for n in counts) + " |",
                  "|---|---|" + "---|" * len(counts)]
        for name in DEFINITIONS:
            d = row[name]
            cells = [" / ".join(f"{100 * (c['ratio'] - 1):+.1f}% [{100 * (c['ci95'][0] - 1):+.1f}, "
                                f"{100 * (c['ci95'][1] - 1):+.1f}]" for c in d["curve"][n].values()) for n in counts]
            lines.append(f"| {name} | {sum(d['block_errors']) / len(d['block_errors']):.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    write_atomic(os.path.join(args.out, "sandwich.md"), "\n".join(lines) + "\n")
    print("\n".join(lines[1:]))


if __name__ == "__main__":
    main()
