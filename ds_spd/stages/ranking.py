"""The distilled ranking (``scan --ranking distilled``): every block distilled once with the run's distill
settings, then each block's cost measured alone with its distilled weights (ds_spd.stages.scan.scan_distilled).

Why: a block's zero-shot cost does not say what it costs after distillation. On Gemma 3 270M at tp 2, through
the CLI, the zero-shot isolated ranking's 5 blocks cost +14.1% on unseen text after distillation, the distilled
ranking's (measured on the validation split, ``scan.ranking_split``) +6.4% (docs/recovery.md, "The README's path
with defaults"). Cost: one distillation of every block (each block
trains from the original model's inputs, so the result does not depend on which blocks are chosen later), then
an in-memory scan. Everything lives in ``OUT.ranking/`` beside the plan (``plan.json``: every block, SB;
``checkpoint/``, its work dir): an interrupted run resumes, a finished one is reused.
"""
from __future__ import annotations

import os

from ds_spd.config import SPDConfig
from ds_spd.errors import SPDInputError


def ranking_dir(out: str) -> str:
    """Where the distilled ranking of the plan ``out`` keeps its plan and checkpoint."""
    return os.path.splitext(out)[0] + ".ranking"


def distil_every_block(cfg: SPDConfig, out: str, config_path: str | None, progress: bool = True) -> str:
    """Distil every block of ``cfg.model`` at ``cfg.tp_size`` (resumable); returns the checkpoint's path."""
    import sys

    from ds_spd.models.loading import load_model_config
    from ds_spd.plan import Plan, load_plan
    from ds_spd.stages.distill import run as distill_run
    base = ranking_dir(out)
    plan_path, checkpoint = os.path.join(base, "plan.json"), os.path.join(base, "checkpoint")
    model_config = load_model_config(cfg.model)
    plan = Plan.from_blocks(cfg.model, model_config, cfg.tp_size, range(model_config.num_hidden_layers),
                            tp_grain_size=cfg.tp_grain_size)
    for b in plan.blocks:
        b.cls = "SB"
    if os.path.exists(plan_path):
        if load_plan(plan_path).model_dump() != plan.model_dump():
            raise SPDInputError(f"{plan_path!r} holds another plan (not this model / tp size's every-block plan): "
                                "move it, or write the scan elsewhere (--out)")
    else:   # every rank writes the same bytes atomically: no rank reads a half-written plan
        os.makedirs(base, exist_ok=True)
        plan.save(plan_path)
    run = distill_run.prepare(cfg.updated(distill={**cfg.distill.model_dump(), "out": checkpoint, "work_dir": None}),
                           plan_path, config_path, model=cfg.model)
    if run.complete:
        if progress:
            print(f"scan: the distilled ranking reuses {checkpoint} (same run, complete)", file=sys.stderr)
        return checkpoint
    if progress:
        print(f"scan: distilled ranking: distilling all {len(plan.blocks)} blocks once into {checkpoint} "
              f"({run.lr_note or f'lr {run.settings.lr:g}'}, {cfg.distill.segments or cfg.calibration.max_samples} "
              "segments)", file=sys.stderr, flush=True)
    distill_run.execute(run, progress=progress).pop("runner", None)
    return checkpoint
