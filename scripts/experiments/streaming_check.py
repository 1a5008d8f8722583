"""On SmolLM2: the streamed stages against the in-memory ones, in one process, same data and seed.

    OMP_NUM_THREADS=2 python scripts/experiments/streaming_check.py --out docs/results/streaming

1. Scan: the streamed cumulative scan (one block resident, activations spilled to files: budget 0)
   against the in-memory cached scan; every sensitivity compared.
2. Distillation: the layer-wise trainer (one block resident, spilled activations) against the joint
   trainer (every trained block in one DeepSpeed ZeRO-2 engine) on the same plan, data order and seed,
   with DeepSpeed's default gradient clipping (1.0: over the joint engine's global norm, over one block's
   norm layer-wise) and without: per-block, per-epoch losses and final weights compared; training
   throughput (block-tokens/s of the optimisation steps) and wall time of each; peak RSS of the process.
Writes streaming.json and streaming.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from ds_spd.outputs import MD_MARK, check_output_dir, write_atomic, write_json  # noqa: E402

ZERO2 = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
         "steps_per_print": 10**9, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.0,
                                                                           "torch_adam": True}}}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/results/streaming")
    p.add_argument("--segments", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--blocks", type=int, default=10, help="the N least sensitive blocks are distilled")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    check_output_dir(args.out, "results directory", names=("streaming.json", "streaming.md"))

    import ds_spd
    from ds_spd.config import DataConfig
    from ds_spd.data import segments_for
    from ds_spd.models.loading import default_model_dir, load_model
    from ds_spd.models.weights import weight_files
    from ds_spd.stages.distill.joint import distill
    from ds_spd.stages.distill.kit import DistillSettings
    from ds_spd.stages.distill.layerwise import distill_layerwise
    from ds_spd.stages.planner import ranking
    from ds_spd.stages.scan import scan, scan_streamed
    from ds_spd.stages.streaming import BlockSource
    from ds_spd.plan import Plan

    model, tok = load_model("default")
    segments = segments_for(DataConfig(split="train", seq_len=args.seq_len, max_samples=args.segments, seed=0), tok)
    source = BlockSource.from_files(model.config, weight_files(default_model_dir()), torch.float32, 2, 64)
    virtual = ds_spd.virtualize(copy.deepcopy(model), 2)
    out: dict = {"segments": args.segments, "seq_len": args.seq_len, "command": " ".join([sys.executable, *sys.argv])}

    t0 = time.perf_counter()
    loaded = scan(virtual, segments, 4, "cumulative", "ppl", progress=True)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as spill:
        streamed = scan_streamed(source, segments, 4, "cumulative", "ppl", budget_bytes=0, spill_dir=spill)
    t2 = time.perf_counter()
    diffs = [abs(a - b) for a, b in zip(loaded.sensitivity, streamed.sensitivity)]
    out["scan"] = {"in_memory_seconds": t1 - t0, "streamed_seconds": t2 - t1, "baseline": [loaded.baseline,
                   streamed.baseline], "max_abs_sensitivity_diff": max(diffs),
                   "max_rel_sensitivity_diff": max(d / max(abs(a), 1e-12) for d, a in zip(diffs, loaded.sensitivity)),
                   "same_order": ranking_of(loaded) == ranking_of(streamed),
                   "spilled_bytes": streamed.extra["spilled_bytes"], "peak_rss_gb_after": peak_rss_gb()}
    print(json.dumps(out["scan"]), flush=True)

    plan = Plan.from_blocks("default", model.config, 2, [])
    for b in plan.blocks:
        b.sensitivity = loaded.sensitivity[b.index]
    plan.scan = {"metric": "ppl", "baseline": loaded.baseline}
    chosen = ranking(plan)[:args.blocks]
    esb = chosen[-1]   # the most sensitive chosen block gets head grouping too
    for b in plan.blocks:
        b.cls = "TP" if b.index not in chosen else "ESB" if b.index == esb else "SB"
    settings = DistillSettings(epochs=args.epochs, lr=3e-4, micro_batch=4)
    out["distill"] = []
    for clip in (None, 0.0):   # DeepSpeed's default gradient_clipping (1.0), and none
        ds_config = {**ZERO2, **({} if clip is None else {"gradient_clipping": clip})}
        t0 = time.perf_counter()
        joint = distill(virtual, plan, segments, copy.deepcopy(ds_config), settings, progress=True)
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            layer = distill_layerwise(source, plan, segments, copy.deepcopy(ds_config), settings, work_dir=work,
                                      budget_bytes=0, progress=True)
        t2 = time.perf_counter()
        weight_diff = max((layer.block_states[i][k] - v).abs().max().item()
                          for i, state in joint.block_states.items() for k, v in state.items())
        loss_diff = max(abs(a["loss"][i] - b["loss"][i]) / a["loss"][i]
                        for a, b in zip(joint.history, layer.history) for i in a["loss"])
        row = {"gradient_clipping": "DeepSpeed default (1.0)" if clip is None else clip,
               "blocks": sorted(chosen), "esb": esb, "epochs": args.epochs,
               "joint": {"train_seconds": joint.seconds, "block_tokens_per_second": joint.tokens_per_second,
                         "wall_seconds": t1 - t0},
               "layerwise": {"train_seconds": layer.seconds, "block_tokens_per_second": layer.tokens_per_second,
                             "wall_seconds": t2 - t1, "spilled_bytes": layer.spilled_bytes},
               "throughput_ratio": layer.tokens_per_second / joint.tokens_per_second,
               "wall_ratio": (t1 - t0) / (t2 - t1),
               "max_abs_weight_diff": weight_diff, "max_rel_loss_diff": loss_diff,
               "final_loss": {"joint": joint.history[-1]["loss"], "layerwise": layer.history[-1]["loss"]},
               "peak_rss_gb_after": peak_rss_gb()}
        out["distill"].append(row)
        print(json.dumps(row), flush=True)
    write_json(os.path.join(args.out, "streaming.json"), out, "streaming/1")
    s = out["scan"]
    lines = [MD_MARK, f"SmolLM2-135M, virtual tp 2, {args.segments} × {args.seq_len} calibration tokens, one process.",
             "", "| stage | in memory | streamed (activations spilled) | agreement |", "|---|---|---|---|",
             f"| cumulative scan | {s['in_memory_seconds']:.0f} s | {s['streamed_seconds']:.0f} s | sensitivities "
             f"max abs diff {s['max_abs_sensitivity_diff']:.2e} (rel {s['max_rel_sensitivity_diff']:.1e}), "
             f"same ranking: {s['same_order']} |"]
    for d in out["distill"]:
        lines.append(f"| distill {len(d['blocks'])} blocks ({args.epochs} epochs, gradient_clipping "
                     f"{d['gradient_clipping']}): joint vs layer-wise | {d['joint']['block_tokens_per_second']:.0f} "
                     f"block-tokens/s, wall {d['joint']['wall_seconds']:.0f} s | "
                     f"{d['layerwise']['block_tokens_per_second']:.0f} block-tokens/s ({d['throughput_ratio']:.2f}x), "
                     f"wall {d['layerwise']['wall_seconds']:.0f} s | weights max abs diff "
                     f"{d['max_abs_weight_diff']:.2e}, losses max rel diff {d['max_rel_loss_diff']:.1e} |")
    write_atomic(os.path.join(args.out, "streaming.md"), "\n".join(lines) + "\n")
    print("\n".join(lines[1:]))


def ranking_of(result) -> list[int]:
    return sorted(range(len(result.sensitivity)), key=lambda i: (result.sensitivity[i], -i))


if __name__ == "__main__":
    main()
