"""The ``scan`` command's run: from the config to a scanned plan, with distillation's contract
(ds_spd.stages.distill.run): :func:`prepare` decides which scan runs and checks everything that reads no weights
(outputs, data, model, a checkpoint against the model); :func:`execute` does the work.

The scans (docs/recovery.md, "Sensitivity scan and plan"):

- ``streamed`` (the default): the blocks read one at a time from the safetensors files (ds_spd.stages.scan);
- ``in-memory`` (``--in-memory`` / ``--no-cache``): the whole model loaded, block inputs cached in RAM;
- ``distilled``: each block alone in SPD form with a checkpoint's distilled weights (``--checkpoint``), on the
  ranking split. The distilled ranking (``scan.ranking = "distilled"``) makes that checkpoint first: every block
  distilled once (each trains from the original model's inputs, so the result does not depend on which blocks
  are chosen later), kept in ``OUT.ranking/`` beside the plan (its ``plan.json``: every block, SB;
  ``checkpoint/`` and its work dir): an interrupted run resumes, a finished one is reused.

Which ranking suits which model, with what each delivered, is docs/recovery.md's ("The README's path with
defaults"). A perplexity delta has a sign: a block whose SPD form happens to suit the calibration text (or, after
distillation, fits it) scores below zero and is ranked cheapest; KL measures how far the block moves the model
whichever way (on Gemma 3 the blocks that moved it least were the ones distillation recovered on unseen text;
one model, one text).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cached_property

import torch

from ds_spd.config import SPDConfig
from ds_spd.errors import SPDInputError
from ds_spd.plan import Plan
from ds_spd.run import RunSpec
from ds_spd.stages.scan import ScanResult, cache_bytes, scan, scan_distilled, scan_streamed

def ranking_dir(out: str) -> str:
    """Where the distilled ranking of the plan ``out`` keeps its plan and checkpoint."""
    return os.path.splitext(out)[0] + ".ranking"


@dataclass
class ScanRun:
    spec: RunSpec
    kind: str                      # "streamed", "in-memory" or "distilled" (the module docstring)
    out: str
    metric: str
    checkpoint: str | None         # the distilled weights the "distilled" scan measures with
    distill_first: object = None   # the distilled ranking's DistillRun (every block), None when given a checkpoint
    use_cache: bool = True         # in memory: block inputs cached (False: a full forward per measurement)
    budget_bytes: int | None = None   # streamed: activations kept in RAM per rank
    last: int | None = None        # streamed: only the last N blocks

    @property
    def cfg(self) -> SPDConfig:
        return self.spec.config

    @cached_property
    def head_dtype(self) -> torch.dtype:
        """The head's matmul dtype while scoring (ds_spd.models.head.head_in); ``auto`` measured here."""
        from ds_spd.models.head import dtype_choice
        return dtype_choice(self.cfg.scan.head_dtype, "cuda" if torch.cuda.is_available() else "cpu")


def prepare(cfg: SPDConfig, out: str, *, checkpoint: str | None = None,
            in_memory: bool = False, no_cache: bool = False, activation_budget_gb: float | None = None,
            last: int | None = None, virtual_tp: int | None = None, split_given: bool = False,
            config_path: str | None = None) -> ScanRun:
    """Every check of a scan that reads no weights; ``out`` must be checked and held by the caller (the plan
    file). ``split_given``: the user chose the split (a distilled scan otherwise reads ``scan.ranking_split``)."""
    s = cfg.scan
    distill_first = None
    if checkpoint is None and s.ranking == "distilled":
        given = [f for f, v in (("in-memory", in_memory), ("no-cache", no_cache), ("last", last is not None),
                                ("activation-budget", activation_budget_gb is not None)) if v]
        if given:
            raise SPDInputError(f"--{given[0]} does not apply to the distilled ranking (the config's, or the model's "
                                "default): add --ranking zero-shot")
        distill_first = _every_block_run(cfg, out, config_path)
        checkpoint = distill_first.out
    kind = "distilled" if checkpoint is not None else "in-memory" if in_memory or no_cache else "streamed"
    calibration = cfg.calibration.model_dump()
    if kind == "distilled" and not split_given:   # costs with distilled weights: on text not trained on
        calibration["split"] = s.ranking_split
    from ds_spd.run import resolve_run
    spec = resolve_run(cfg.updated(checkpoint=None, calibration=calibration), virtual_tp=virtual_tp or cfg.tp_size,
                       data_parallel=True, data_section="calibration", read_weights=kind == "streamed")
    if checkpoint is not None and distill_first is None:   # given: made for this model, tp size and grain
        from ds_spd.checkpoint import open_checkpoint
        open_checkpoint(checkpoint, spec.model_config, spec.tp_size, cfg.tp_grain_size)
    return ScanRun(spec, kind, out, s.metric, checkpoint, distill_first, use_cache=not no_cache,
                   budget_bytes=None if activation_budget_gb is None else int(activation_budget_gb * 2**30),
                   last=last)


def _every_block_run(cfg: SPDConfig, out: str, config_path: str | None):
    """The distilled ranking's distill run: every block of the model, SB, into ``OUT.ranking/checkpoint``."""
    from ds_spd.models.loading import load_model_config
    from ds_spd.plan import load_plan
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
    # each block is ranked alone in its distilled form: no end-to-end stage, which trains them all together; in
    # plain SPD form (the costs are measured so), lagged attention or not in the run the ranking is for
    settings = {**cfg.distill.model_dump(), "out": checkpoint, "work_dir": None, "kl_epochs": 0, "lag": False}
    return distill_run.prepare(cfg.updated(distill=settings), plan_path, config_path, model=cfg.model)


@dataclass
class ScanReport:
    """What a scan measured: the plan with every block's sensitivity and no block chosen, the raw result, and the
    runner of an in-memory scan (None when streamed)."""

    plan: Plan
    result: ScanResult
    runner: object = None


def execute(run: ScanRun, progress: bool = True) -> ScanReport:
    """Measure (see :class:`ScanReport`)."""
    from ds_spd.data import segments_for
    from ds_spd.run import init_data_parallel
    if run.distill_first is not None:
        _distil_every_block(run.distill_first, progress)
    rank, world = init_data_parallel()
    cfg, d, s = run.cfg, run.cfg.calibration, run.cfg.scan
    head_dtype = run.head_dtype
    how = {"cached": run.use_cache, "head_dtype": str(head_dtype).removeprefix("torch.")}
    if run.kind == "streamed":
        from ds_spd.models.loading import load_tokenizer
        from ds_spd.stages.streaming import BlockSource
        source = BlockSource.from_files(run.spec.model_config, run.spec.weights, cfg.torch_dtype, cfg.tp_size,
                                        cfg.tp_grain_size)
        segments = segments_for(d, load_tokenizer(cfg.model), rank, world)
        _say(progress, f"scan: {s.method} / {run.metric}, streamed, virtual tp={cfg.tp_size}, {segments.shape[0]} x "
                       f"{d.seq_len} tokens per rank on {world} rank(s)")
        result = scan_streamed(source, segments, d.batch_size, s.method, run.metric, run.budget_bytes,
                               f"{run.out}.activations", run.last, progress, head_dtype)
        return ScanReport(plan_of_scan(cfg, run.spec.model_config, result, world, {**how, **result.extra}), result)
    from ds_spd.build import build_runner
    runner = build_runner(run.spec, data_parallel=True)
    segments = segments_for(d, runner.tokenizer, rank, world)
    if run.kind == "distilled":
        from ds_spd.checkpoint import read_block_states
        result = scan_distilled(runner.hf_model, read_block_states(run.checkpoint), segments, d.batch_size,
                                run.metric, progress, head_dtype)
        how["checkpoint"] = run.checkpoint
    else:
        need = cache_bytes(runner.hf_model.config, segments.shape[0], d.seq_len, cfg.torch_dtype, run.metric)
        _say(progress, f"scan: {s.method} / {run.metric}, virtual tp={cfg.tp_size}, {segments.shape[0]} x "
                       f"{d.seq_len} tokens per rank on {world} rank(s); activation cache {need / 2**30:.2f} GiB "
                       "per rank")
        result = scan(runner.hf_model, segments, d.batch_size, s.method, run.metric, use_cache=run.use_cache,
                      progress=progress, head_dtype=head_dtype)
    return ScanReport(plan_of_scan(cfg, runner.hf_model.config, result, world, how), result, runner)


def _distil_every_block(distill, progress: bool) -> None:
    from ds_spd.stages.distill import run as distill_run
    if distill.complete:
        _say(progress, f"scan: the distilled ranking reuses {distill.out} (same run, complete)")
        return
    _say(progress, f"scan: distilled ranking: distilling all {len(distill.plan.blocks)} blocks once into "
                   f"{distill.out} ({distill.lr_note or f'lr {distill.settings.lr:g}'}, "
                   f"{distill.cfg.calibration.max_samples} segments)")
    distill_run.execute(distill, progress=progress)
    import torch.distributed as dist
    if dist.is_initialized():   # the first rank writes the checkpoint that every rank reads next
        dist.barrier()


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def plan_of_scan(cfg: SPDConfig, model_config, result: ScanResult, world: int, how: dict):
    """A plan (no blocks chosen yet) holding a scan's sensitivities and how they were measured."""
    d = cfg.calibration
    plan = Plan.from_blocks(cfg.model, model_config, cfg.tp_size, [], tp_grain_size=cfg.tp_grain_size,
                            data=d.source(),
                            seq_len=d.seq_len, segments=d.max_samples, seed=d.seed, dtype=cfg.dtype, ranks=world)
    for b in plan.blocks:
        b.sensitivity = result.sensitivity[b.index]
    plan.scan = {"method": result.method, "metric": result.metric, "baseline": result.baseline,
                 "order": result.order, "after": result.after, "seconds": result.seconds,
                 "forwards_equivalent": result.forwards_equivalent, **how}
    return plan
