"""Cross-entropy, predictive entropy, KL to TP and top-1 agreement with TP of distilled checkpoints, per segment, on
validation text or a text file (virtual TP, one process): whether a perplexity below TP's is recovery toward TP
or a flatter model. Means with 95% bootstrap intervals over segments; each checkpoint's KL paired against the
first checkpoint's (``--before-kl-stage``: also each one's blocks before its KL stage, paired the same way).

    ck=runs/chain/gemma3-270m_tp2/ck13_adddocstrings
    python scripts/experiments/entropy_check.py --model gemma3-270m --segments 4 --checkpoints $ck,$ck+kl2+kllr5e-5 \
        --out docs/results/input_chain/gemma3-270m_tp2/entropy/entropy13.json
    # the README path's unseen text (KEEP_CHECKPOINTS=1 bash scripts/benchmarks/readme_path.sh ...):
    d=docs/results/readme_path/gemma3-270m_tp2
    python scripts/experiments/entropy_check.py --model gemma3-270m --text $d/readmes_pinned.txt \
        --segments 32 --checkpoints $d/checkpoint13 --before-kl-stage --out $d/kl_stage_vs_blocks13.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

STATS = ("cross_entropy", "entropy", "kl_to_tp", "top1_agrees_with_tp")


def _interval(values, resamples: int = 1000, seed: int = 0) -> dict:
    import numpy as np
    v = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
    lo, hi = np.percentile(v[idx].mean(1), [2.5, 97.5])
    return {"mean": float(v.mean()), "ci95": [float(lo), float(hi)]}


def blocks_alone(checkpoint: str, into: str) -> str | None:
    """The checkpoint's blocks as they were before its KL stage (each block's finished weights in its work dir,
    ``CHECKPOINT.work``), saved as a checkpoint at ``into``; None where they are the checkpoint's own weights (no
    stage ran, or it kept the blocks' weights): the same model, measured once."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ds_spd.checkpoint import read_block_states, read_provenance, save_checkpoint
    from ds_spd.plan import load_plan
    from ds_spd.stages.distill.layerwise import _done_paths
    final = read_block_states(checkpoint)
    before = {i: load_file(_done_paths(f"{checkpoint}.work", i)[0]) for i in final}
    if all(torch.equal(before[i][name], t) for i, state in final.items() for name, t in state.items()):
        return None
    return save_checkpoint(into, load_plan(os.path.join(checkpoint, "plan.json")), before,
                           AutoConfig.from_pretrained(checkpoint), read_provenance(checkpoint))


def main() -> None:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from ds_spd.build import build_runner
    from ds_spd.config import resolve_spd_config
    from ds_spd.data import segments_for
    from ds_spd.run import resolve_run
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--checkpoints", required=True, help="comma-separated distill checkpoints")
    ap.add_argument("--dataset", default="pydoc", help="a shipped corpus's validation split (unless --text)")
    ap.add_argument("--text", default=None, help="a text file instead (its segments from the start, as eval reads)")
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2, help="virtual tp size")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", action="store_true", help="the result as one JSON line on stdout (the steps' form)")
    ap.add_argument("--before-kl-stage", action="store_true",
                    help="also each checkpoint's blocks before its KL stage (from its work dir), as CKPT:blocks")
    args = ap.parse_args()
    checkpoints = args.checkpoints.split(",")
    paths = {"tp": None, **{c: c for c in checkpoints}}   # what each reported name measures (None: TP)
    if args.before_kl_stage:
        import shutil
        import tempfile
        scratch = tempfile.mkdtemp(prefix="blocks_alone_")
        for i, c in enumerate(checkpoints):
            paths[f"{c}:blocks"] = blocks_alone(c, os.path.join(scratch, str(i))) or c
    runners = {}
    for path in dict.fromkeys(paths.values()):   # each distinct model once
        kw = {"spd_blocks": []} if path is None else {"checkpoint": path}
        cfg = resolve_spd_config(None, model=args.model, tp_size=args.tp, **kw)
        runners[path] = build_runner(resolve_run(cfg, virtual_tp=args.tp))
    if args.before_kl_stage:   # loaded: the assembled copies are no longer needed
        shutil.rmtree(scratch)
    data = cfg.data.model_copy(update={"text": [args.text] if args.text else None, "dataset": args.dataset,
                                       "split": "test" if args.text else "validation",
                                       "max_samples": args.segments})
    ids = segments_for(data, runners[None].tokenizer)
    measured = {path: {s: [] for s in STATS} for path in runners}
    with torch.no_grad():
        for seg in tqdm(ids.split(1), desc="segments"):
            tp = None
            for path, runner in runners.items():   # TP first
                lp = F.log_softmax(runner.hf_model(input_ids=seg).logits[:, :-1].float(), -1)
                tp = lp if tp is None else tp
                row = measured[path]
                row["cross_entropy"].append(-lp.gather(-1, seg[:, 1:, None]).mean().item())
                row["entropy"].append(-(lp.exp() * lp).sum(-1).mean().item())
                row["kl_to_tp"].append((tp.exp() * (tp - lp)).sum(-1).mean().item())
                row["top1_agrees_with_tp"].append((lp.argmax(-1) == tp.argmax(-1)).float().mean().item())
    names = list(paths)
    per = {name: measured[paths[name]] for name in names}
    results = {name: {s: _interval(v) for s, v in per[name].items()} for name in names}
    first = names[1]
    for name in names[2:]:   # paired: the same segments' KL difference against the first checkpoint
        results[name]["kl_to_tp_minus_first"] = _interval(
            [a - b for a, b in zip(per[name]["kl_to_tp"], per[first]["kl_to_tp"])])
    for name in names:
        print(name, json.dumps({s: round(r["mean"], 4) for s, r in results[name].items()}), file=sys.stderr,
              flush=True)
    report = {"model": args.model, "virtual_tp": args.tp, "data": data.source(), "segments": int(ids.shape[0]),
              "seq_len": int(ids.shape[1]), **results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
