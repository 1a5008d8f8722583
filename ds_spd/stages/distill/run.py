"""The ``distill`` command's run: from a plan to an SPD checkpoint, safely.

Before any weights are read: the plan is checked against the model, tp size and grain; the output must
be new, empty or an SPD checkpoint; the work dir must be new or hold a run with the same fingerprint
(ds_spd.workdir); a checkpoint already written by a run with the same fingerprint and epochs is reported
as complete and left untouched. Then the model loads, ZeRO trains (resuming per epoch), and rank 0
swaps the new checkpoint in atomically, with the full history of every epoch in its provenance.
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, fields, replace

import torch

from ds_spd.checkpoint import check_checkpoint_target, is_checkpoint, read_provenance, save_checkpoint
from ds_spd.config import DataConfig, DistillConfig, SPDConfig, load_ds_config
from ds_spd.stages.distill.joint import distill
from ds_spd.stages.distill.kit import DEFAULT_OPTIMIZER, DistillSettings, plan_digest
from ds_spd.stages.planner import DEFAULT_THRESHOLDS, classify, relative
from ds_spd.errors import ConfigError, SPDInputError
from ds_spd.plan import BlockEntry, Plan, load_plan
from ds_spd.run import RunSpec
from ds_spd.workdir import RESUME_NEUTRAL, check_work_dir, comparable, prepare_work_dir, run_fingerprint


def deepspeed_config(config_path: str | None, lr: float) -> dict:
    """The DeepSpeed keys of the config file with distillation defaults: ZeRO-2, micro-batch 4, torch AdamW;
    ``spd.distill.lr`` is the one learning-rate knob, written into the optimizer's params."""
    ds = {k: v for k, v in (load_ds_config(config_path) if config_path else {}).items() if k != "spd"}
    ds.setdefault("train_micro_batch_size_per_gpu", 4)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("zero_optimization", {"stage": 2})
    optimizer = ds.setdefault("optimizer", copy.deepcopy(DEFAULT_OPTIMIZER))
    optimizer.setdefault("params", {})["lr"] = lr
    ds.setdefault("steps_per_print", 10**9)
    return ds


def resolve_lr(cfg: SPDConfig, spec: RunSpec, plan: Plan) -> tuple[float, str | None]:
    """``spd.distill.lr`` if set, else the lr scaled to the trained blocks' weights (ds_spd.stages.lr), read
    from the safetensors headers the layer-wise trainer checked (the joint trainer: the model's files)."""
    from ds_spd.errors import DataError
    from ds_spd.models.weights import model_weight_files
    from ds_spd.stages.lr import default_lr
    if cfg.distill.lr is not None:
        return cfg.distill.lr, None
    weights = spec.weights
    if weights is None:
        try:
            weights = model_weight_files(cfg.model)
        except DataError:   # e.g. a .bin model for the joint trainer's full load
            weights = None
    trained = plan.trained_blocks or plan.spd_blocks
    return default_lr(weights, trained)


def untrained_note(plan: Plan) -> list[str]:
    """What distillation leaves untrained (the plan's ISB blocks), each with its scanned cost relative to the
    baseline; a block today's planner would train (a plan written before blocks were classed by the size of
    their delta, when a negative delta made a block ISB) is flagged."""
    isb = [b for b in plan.blocks if b.cls == "ISB"]
    if not isb:
        return []
    rel = relative(plan) if any(b.sensitivity is not None for b in plan.blocks) else [None] * len(plan.blocks)
    unit = "%" if (plan.scan or {}).get("metric", "ppl") == "ppl" else " nats/token"
    scale = 100 if unit == "%" else 1
    costs = ", ".join(f"{b.index} ({'unscanned' if rel[b.index] is None else f'{rel[b.index] * scale:+.3g}{unit}'})"
                      for b in isb)
    lines = [f"not trained (ISB, zero-shot SPD): block(s) {costs} by the {(plan.scan or {}).get('method')} scan"]
    thresholds = tuple((plan.selection or {}).get("thresholds") or DEFAULT_THRESHOLDS)
    stale = [b.index for b in isb if rel[b.index] is not None and classify(rel[b.index], thresholds) != "ISB"]
    if stale:
        lines.append(f"block(s) {stale} change the model by more than the ISB threshold {thresholds[0]:g}: re-run "
                     "`ds-spd plan` (blocks are classed by the size of their delta) to distill them")
    return lines


def kl_stage_data(calibration: DataConfig, settings: DistillConfig | DistillSettings) -> DataConfig:
    """The text the end-to-end stage reads: the blocks' calibration, with its own segment count and corpora where
    ``distill.kl_segments`` / ``distill.kl_corpora`` set them."""
    update = {} if settings.kl_segments is None else {"max_samples": settings.kl_segments}
    if settings.kl_corpora is not None:
        update.update(dataset=settings.kl_corpora, text=None)
    return calibration.model_copy(update=update)


def kl_autocast(name: str, model: torch.nn.Module) -> torch.dtype | None:
    """The KL stage's training dtype through the blocks (``distill.kl_dtype``): ``auto`` is bf16 where a matmul
    is faster in bf16 than in fp32 on the model's device (ds_spd.models.head.faster_head_dtype, measured once);
    None: the model's own dtype."""
    from ds_spd.models.head import dtype_choice
    dtype = dtype_choice(name, next(model.parameters()).device)
    return None if dtype == torch.float32 else dtype


def check_kl_fits(kl_epochs: int, spec: RunSpec) -> None:
    """The end-to-end stage holds the whole model in one process: refused before any work where it would not
    fit this rank's share of the available memory twice over (weights, then logits and trained state)."""
    from ds_spd.models.sharded import meta_model
    from ds_spd.stages.streaming import available_bytes
    if not kl_epochs:
        return
    need = 2 * sum(p.numel() * p.element_size() for p in meta_model(spec.model_config, spec.config.torch_dtype)
                   .parameters())
    have = available_bytes()
    if need > have:
        raise SPDInputError(f"the end-to-end KL stage (--kl-epochs {kl_epochs}) needs the whole model in one "
                            f"process (~{need / 2**30:.1f} GiB), {have / 2**30:.1f} GiB are available per rank: "
                            "drop --kl-epochs, or free memory")


def launched_by_accelerate() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or "ACCELERATE_MIXED_PRECISION" in os.environ


@dataclass
class DistillRun:
    spec: RunSpec
    plan: Plan
    ds_config: dict
    settings: DistillSettings
    out: str
    work_dir: str
    fingerprint: dict
    work_state: str          # "new", "resume" or "restart"
    use_accelerate: bool
    lr_note: str | None = None   # how the default lr was chosen (None: set by the user)

    @property
    def cfg(self) -> SPDConfig:
        return self.spec.config

    @property
    def complete(self) -> bool:
        """The output already holds this exact run's checkpoint (same fingerprint, same epochs and end-to-end
        stage: the settings the work dir's fingerprint leaves out)."""
        prov = read_provenance(self.out) if is_checkpoint(self.out) else {}
        knobs, saved = self.settings.knobs(), prov.get("settings") or {}
        return (comparable(prov.get("run")) == self.fingerprint
                and all(saved.get(k, knobs[k]) == knobs[k] for k in RESUME_NEUTRAL)
                and prov.get("epochs") == self.settings.epochs)

    def recorded(self) -> dict:
        """A complete run's results as its checkpoint recorded them, in the keys ``distill --json`` reports a run
        in: a rerun with nothing to do still says what the checkpoint holds."""
        prov = read_provenance(self.out)
        return {**{k: prov[k] for k in PROVENANCE_FIELDS if k in prov},
                "peak_memory_bytes": prov.get("peak_memory_bytes_rank0")}


@dataclass
class DistillReport:
    """What a distill run trained and measured (``--json`` prints it, less the runner); the fields in
    :data:`PROVENANCE_FIELDS` are also recorded in the checkpoint's provenance."""

    checkpoint: str
    initial_mse: dict[int, float]
    final_mse: dict[int, float]
    last_epoch_loss: dict[int, float]
    epochs_trained: list[int]
    seconds: float
    tokens_per_second: float
    peak_memory_bytes: int
    zero_stage: int | None
    trainer: str
    wall_seconds: float
    spilled_bytes: int
    model: str
    tp_size: int
    lr: float
    segments: int
    calibration: dict   # the text it read (DataConfig.source)
    best_epoch: dict[int, int]
    held_out_start: dict[int, float]
    kl_stage: dict | None
    runner: object = None    # the loaded runner (joint trainer or KL stage), for a caller that evaluates next

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "runner"}


PROVENANCE_FIELDS = ("zero_stage", "initial_mse", "final_mse", "last_epoch_loss", "seconds", "tokens_per_second",
                     "trainer", "wall_seconds", "spilled_bytes", "best_epoch", "held_out_start", "kl_stage")


def prepare(cfg: SPDConfig, plan_path: str, config_path: str | None, model: str | None = None,
            restart: bool = False) -> DistillRun:
    """Every check of a distill run that reads no weights (see the module docstring); the model is ``model``
    (the --model flag) or the plan's."""
    from ds_spd.ranks import is_main_rank, world_size
    from ds_spd.run import resolve_run
    plan = load_plan(plan_path)
    cfg = cfg.updated(model=model or plan.model, tp_size=plan.tp_size, plan=None, spd_blocks=None, checkpoint=None)
    if cfg.distill.segments is not None:   # distillation's own count (an embedded model's recipe sets one)
        cfg = cfg.updated(calibration={**cfg.calibration.model_dump(), "max_samples": cfg.distill.segments})
    if cfg.distill.corpora is not None:    # distillation's own text: folded into the calibration it reads, so the
        # run's fingerprint is that of the same text given as --dataset
        cfg = cfg.updated(calibration={**cfg.calibration.model_dump(), "dataset": cfg.distill.corpora, "text": None},
                          distill={**cfg.distill.model_dump(), "corpora": None})
    spec = resolve_run(cfg, virtual_tp=plan.tp_size, data_parallel=True, data_section="calibration",
                       read_weights=cfg.distill.trainer == "layerwise")   # layer-wise reads blocks from files
    plan.check_compatible(spec.model_config, plan.tp_size, cfg.tp_grain_size)
    if cfg.distill.lag:
        from ds_spd.core.inject import lag_refusal
        if lag_refusal(spec.adapter):
            raise ConfigError(f"distill.lag: {lag_refusal(spec.adapter)}")
        spec = replace(spec, lag=True)   # the stage's model and the joint trainer's run with it
    d = cfg.calibration
    check_kl_fits(cfg.distill.kl_epochs, spec)
    kl_data = kl_stage_data(d, cfg.distill)
    if cfg.distill.kl_epochs and kl_data.dataset != d.dataset:   # its own corpora (a misspelt one: before any work)
        from ds_spd.data import check_data_source
        check_data_source(kl_data.text, kl_data.dataset, kl_data.split)
    use_accelerate = launched_by_accelerate()
    out = cfg.distill.out.rstrip(os.sep)
    work_dir = (cfg.distill.work_dir or out + ".work").rstrip(os.sep)
    if os.path.abspath(work_dir) == os.path.abspath(out):
        raise SPDInputError(f"the work dir and the checkpoint output are the same directory {out!r}")
    check_checkpoint_target(out)
    if is_main_rank():   # one writer per checkpoint and work dir, for the whole run
        from ds_spd.locks import hold
        hold(out, "checkpoint output")
        hold(work_dir, "work dir")
    lr, lr_note = resolve_lr(cfg, spec, plan)   # reads a few blocks' weights: after the output checks
    kl_lr = cfg.distill.kl_lr
    if kl_lr is None:
        from ds_spd.stages.lr import KL_STAGE_DIVISOR, kl_stage_lr
        kl_lr = kl_stage_lr(lr)
        if cfg.distill.kl_epochs:
            lr_note = f"{lr_note or f'lr {lr:g} (set)'}; the KL stage's lr {kl_lr:g} = lr / {KL_STAGE_DIVISOR}"
    ds_config = deepspeed_config(config_path, lr)
    settings = DistillSettings(**{**cfg.distill.model_dump(), "lr": lr, "kl_lr": kl_lr},
                               micro_batch=ds_config["train_micro_batch_size_per_gpu"], seed=d.seed or 0)
    fingerprint = run_fingerprint(model=cfg.model, model_fingerprint=plan.fingerprint, plan_digest=plan_digest(plan),
                                  tp_size=plan.tp_size, tp_grain_size=cfg.tp_grain_size, dtype=cfg.dtype,
                                  calibration=d, settings=settings.knobs(), ds_config=ds_config, ranks=world_size(),
                                  launcher="accelerate" if use_accelerate else "deepspeed")
    run = DistillRun(spec, plan, ds_config, settings, out, work_dir, fingerprint, "new", use_accelerate, lr_note)
    if not run.complete:
        run.work_state = check_work_dir(work_dir, fingerprint, restart)
    return run


def execute(run: DistillRun, progress: bool = True) -> DistillReport:
    """Load, train (resuming from the work dir), write the checkpoint on rank 0; returns what was trained."""
    import torch.distributed as dist

    from ds_spd import __version__
    from ds_spd.data import segments_for
    from ds_spd.ranks import is_main_rank, world_size
    from ds_spd.build import build_runner
    from ds_spd.run import init_data_parallel
    layerwise = run.settings.trainer == "layerwise"
    if progress and run.lr_note:
        print(f"distill: {run.lr_note}", file=sys.stderr)
    if layerwise:   # nothing of the model loads here: blocks are read one at a time
        from ds_spd.models.loading import load_tokenizer
        init_data_parallel()
        runner, tokenizer = None, load_tokenizer(run.cfg.model)
    else:
        runner = build_runner(run.spec, data_parallel=True)
        tokenizer = runner.tokenizer
    if is_main_rank():
        prepare_work_dir(run.work_dir, run.fingerprint, run.work_state)
    if dist.is_initialized():
        dist.barrier()
    d = run.cfg.calibration
    segments = segments_for(d, tokenizer)
    if layerwise:
        from ds_spd.stages.distill.layerwise import BlockSource, distill_layerwise, esb_own_blocks
        source = BlockSource.from_files(run.spec.model_config, run.spec.weights, run.cfg.torch_dtype, run.plan.tp_size,
                                        run.cfg.tp_grain_size, lag=run.spec.lag)
        budget = run.settings.activation_budget_gb
        esb = None   # the extremely sensitive blocks' own segments, where set and the plan has such blocks
        own = run.settings.esb_segments is not None and esb_own_blocks(run.plan,
                                                                       run.settings.esb_segments_min_sensitivity)
        if own:
            esb = segments_for(d.model_copy(update={"max_samples": run.settings.esb_segments}), tokenizer)
        result = distill_layerwise(source, run.plan, segments, run.ds_config, run.settings, run.work_dir,
                                   None if budget is None else int(budget * 2**30), run.use_accelerate, progress,
                                   esb_segments=esb)
    else:
        result = distill(runner.hf_model, run.plan, segments, run.ds_config, run.settings, run.work_dir,
                         run.use_accelerate, progress=progress)
    e2e = None
    if run.settings.kl_epochs and result.block_states:   # end-to-end KL stage: the whole model, one process
        from ds_spd.stages.distill.e2e import kl_stage
        if runner is None:
            runner = build_runner(run.spec, data_parallel=True)
        kl_data = kl_stage_data(d, run.settings)
        kl_segments = segments if kl_data == d else segments_for(kl_data, tokenizer)
        every = range(run.spec.model_config.num_hidden_layers) if run.settings.kl_blocks == "all" else ()
        e2e = kl_stage(runner.hf_model, result.block_states, tuple(run.plan.spd_blocks), kl_segments, run.ds_config,
                       run.settings, run.use_accelerate, progress, kl_autocast(run.settings.kl_dtype, runner.hf_model),
                       extra=tuple(every), extra_lr=run.settings.kl_extra_lr)
        e2e["calibration"] = kl_data.source()
        result.block_states = e2e.pop("states")
        if progress:
            print(f"distill: end-to-end KL {e2e['initial_kl']:.4g} -> {e2e['final_kl']:.4g} "
                  f"(epoch {e2e['best_epoch']} kept, {e2e['measured_on']}; {e2e['segments']} segments, "
                  f"{e2e['dtype']}, {e2e['seconds']:.0f} s)", file=sys.stderr)
    last_epoch = result.history[-1]["loss"] if result.history else {}
    report = DistillReport(
        checkpoint=run.out, initial_mse=result.initial_mse, final_mse=result.final_mse, last_epoch_loss=last_epoch,
        epochs_trained=[h["epoch"] for h in result.history], seconds=result.seconds,
        tokens_per_second=result.tokens_per_second, peak_memory_bytes=result.peak_memory_bytes,
        zero_stage=result.zero_stage, trainer=run.settings.trainer, wall_seconds=result.wall_seconds,
        spilled_bytes=result.spilled_bytes, model=run.cfg.model, tp_size=run.plan.tp_size, lr=run.settings.lr,
        segments=d.max_samples, calibration=d.source(), best_epoch=result.best_epoch,
        held_out_start=result.start_val, kl_stage=e2e, runner=runner)
    if is_main_rank():
        blocks = [BlockEntry(index=b.index, sensitivity=b.sensitivity, **{"class": b.cls},
                             head_permutation=result.groupings[b.index].kv_order if b.index in result.groupings else None,
                             mlp_permutation=result.groupings[b.index].mlp_permutation
                             if b.index in result.groupings else None)
                  for b in run.plan.blocks]
        plan = run.plan.model_copy(update={"blocks": blocks, "tp_grain_size": run.cfg.tp_grain_size,
                                           "lag": run.spec.lag})
        measured = {k: v for k, v in report.to_json().items() if k in PROVENANCE_FIELDS}
        provenance = {"run": run.fingerprint, "epochs": run.settings.epochs, "ds_spd": __version__,
                      "torch": torch.__version__, "settings": run.settings.knobs(),
                      "launcher": "accelerate" if run.use_accelerate else "deepspeed", "ranks": world_size(),
                      "bf16": bool(run.ds_config.get("bf16", {}).get("enabled")), "calibration": d.model_dump(),
                      "mse_measured_on": "the first calibration micro-batch, before and after B2B (before any end-to-end stage)",
                      "lr_rule": run.lr_note or "set by the user", "history": result.history,
                      "peak_memory_bytes_rank0": result.peak_memory_bytes, **measured}
        save_checkpoint(run.out, plan, result.block_states, run.spec.model_config, provenance,
                        tuned=sorted(set(result.block_states) - set(run.plan.trained_blocks)))
        if progress:
            for i in sorted(report.final_mse):
                print(f"block {i:3d} ({run.plan.blocks[i].cls}): MSE {result.initial_mse[i]:.4g} -> "
                      f"{report.final_mse[i]:.4g}", file=sys.stderr)
    return report
