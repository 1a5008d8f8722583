"""The joint B2B trainer: every SB/ESB block trained together in one DeepSpeed (or accelerate) engine.

The loss is the sum of the per-block MSEs, each block's gradient depends only on its own term, and AdamW
updates every parameter on its own, so it is the same as training them one by one (ds_spd.stages.distill.
layerwise), *except for gradient clipping*: DeepSpeed clips at ``gradient_clipping`` (default 1.0 in DeepSpeed
0.19) over the global norm of everything in the engine, which couples the blocks once that norm exceeds the
threshold. With ``gradient_clipping: 0`` the two trainers give bitwise equal weights (tested; measured on
SmolLM2 in BENCHMARKS.md). ZeRO stage 2 or 3 shards optimizer state (and parameters) over the data-parallel
ranks, which split the calibration data.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ds_spd.choices import INPUT_SOURCES
from ds_spd.core.block import SPDDecoderLayer
from ds_spd.core.comm import CommStats, VirtualReduce
from ds_spd.core.inject import decoder_layers, model_device, set_spd_blocks
from ds_spd.errors import PlanError
from ds_spd.plan import Plan
from ds_spd.stages.distill.kit import (BlockDistiller, BlockPairs, DistillResult, DistillSettings, block_mse, fit,
                                      grouped, peak_memory, plan_digest)
from ds_spd.stages.headgroup import HeadGrouping, attention_kwargs, find_grouping, permute_block
from ds_spd.stages.scan import BlockInputs


@torch.no_grad()
def prepare_pairs(model: nn.Module, plan: Plan, blocks: list[int], segments: torch.Tensor, batch_size: int,
                  input_source: str) -> BlockPairs:
    """Block inputs from the original model (or the plan's zero-shot SPD prefix) and teacher outputs."""
    if input_source not in INPUT_SOURCES:
        raise ValueError(f"input_source must be one of {INPUT_SOURCES}, got {input_source!r}")
    set_spd_blocks(model, plan.spd_blocks if input_source == "prefix" else [])
    captured = BlockInputs.capture(model, segments, batch_size, progress=False)
    set_spd_blocks(model, [])
    layers, rotary = decoder_layers(model), model.model.rotary_emb
    inputs = torch.stack([captured.inputs[i] for i in blocks])
    targets = torch.empty_like(inputs)
    for j, i in enumerate(blocks):
        for b0 in range(0, inputs.shape[1], batch_size):
            x = inputs[j, b0:b0 + batch_size].to(model_device(model))
            targets[j, b0:b0 + batch_size] = layers[i](x, **attention_kwargs(rotary, x, layers[i])).cpu()
    return BlockPairs(inputs, targets)


def build_students(model: nn.Module, plan: Plan, blocks: list[int], pairs: BlockPairs,
                   settings: DistillSettings) -> tuple[dict[int, SPDDecoderLayer], dict[int, HeadGrouping]]:
    """SPD copies of the blocks; ESB blocks head-grouped on calibration block inputs first."""
    layout = model.spd_layout  # the virtualized model's (configured tp_grain_size): the one layout everywhere
    if layout.tp_size != plan.tp_size:
        raise PlanError(f"the model is virtualized for tp size {layout.tp_size}, the plan is for {plan.tp_size}")
    layers, rotary = decoder_layers(model), model.model.rotary_emb
    classes = {b.index: b.cls for b in plan.blocks}
    students, groupings = {}, {}
    for j, i in enumerate(blocks):
        student = copy.deepcopy(layers[i])
        student.reduce = VirtualReduce(CommStats(timed=False))
        student.spd = True
        if grouped(classes[i], settings):
            x = pairs.inputs[j, :settings.hg_segments].to(model_device(model))
            groupings[i] = find_grouping(student, rotary, x, layout, settings.mlp_matching)
            permute_block(student, groupings[i], layout)
        students[i] = student
    return students, groupings



def distill(model: nn.Module, plan: Plan, segments: torch.Tensor, ds_config: dict, settings: DistillSettings,
            checkpoint_dir: str | None = None, use_accelerate: bool = False, progress: bool = True) -> DistillResult:
    """Train every SB/ESB block of ``plan`` (``model`` is a virtualized model, unchanged by this call)."""
    blocks = plan.trained_blocks
    if not blocks:
        return DistillResult({}, {})
    torch.manual_seed(settings.seed)
    pairs = prepare_pairs(model, plan, blocks, segments, settings.micro_batch, settings.input_source)
    students, groupings = build_students(model, plan, blocks, pairs, settings)
    distiller = BlockDistiller(students, model.model.rotary_emb)
    mb = settings.micro_batch
    first = (pairs.inputs[:, :mb].transpose(0, 1), pairs.targets[:, :mb].transpose(0, 1))
    with torch.no_grad():
        _, initial = distiller(first[0].to(model_device(model)), first[1].to(model_device(model)))
    client = {"plan": plan_digest(plan), "blocks": blocks, "input_source": settings.input_source,
              "groupings": {str(i): [list(g.groups), g.mlp_permutation] for i, g in groupings.items()}}
    fitted = fit(distiller, pairs, ds_config, settings, use_accelerate, blocks=blocks, desc="distill",
                 progress=progress, tokens_per_item=pairs.inputs.shape[2], state_dir=checkpoint_dir, client=client)
    states, best = fitted.states, fitted.best
    layers = decoder_layers(model)
    final = block_mse({i: layers[i] for i in blocks}, states, model.model.rotary_emb, *first)
    return DistillResult(block_states=states, groupings=groupings, history=fitted.history,
                         initial_mse=dict(zip(blocks, initial.tolist())), final_mse=dict(zip(blocks, final.tolist())),
                         seconds=fitted.seconds,
                         tokens_per_second=fitted.tokens * len(blocks) / max(fitted.seconds, 1e-9),
                         peak_memory_bytes=peak_memory(), zero_stage=fitted.zero_stage,
                         best_epoch=dict(best.epoch) if best is not None else {},
                         start_val=dict(best.start) if best is not None else {})
