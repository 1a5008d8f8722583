"""Layer-wise B2B distillation: one block resident at a time, for models that do not fit a rank.

The original model is walked block by block, as GPTQ-style calibration pipelines do: the embedding gives
block 0's inputs; for each block its weights are read from the safetensors files (all virtual-TP shards:
the student is the plan's tp-size SPD block), the teacher's outputs on the current inputs are the
targets, a trained block (SB / ESB) is distilled in its own DeepSpeed ZeRO engine, and the teacher's
outputs become the next block's inputs (``input_source="original"``, the paper's); with ``"prefix"`` the
next inputs come from the block in its plan form (zero-shot SPD for the plan's SPD blocks). Then the block
is dropped. Resident at any time: one teacher block, its student and optimizer state, the activations.

``"chain"`` walks two streams (asymmetric reconstruction, as OmniQuant and AdaRound train quantised blocks):
the teacher's (the original model) and the student chain's (the model as it will run: every block before in
its final form, trained SPD, zero-shot SPD or TP). A trained block learns to map the chain's inputs to the
teacher's outputs, so it undoes the drift the SPD blocks before it left in the residual stream instead of
imitating the teacher on inputs it will never see. The streams are one store until the first SPD block.
A block's inputs then depend on the weights trained before it: its resume key holds a digest of them
(``upstream``), and a block whose upstream changed is trained again.

``loss_window`` N measures a trained block's error after the next N original blocks (frozen, resident beside it),
against the teacher stream there (BRECQ's and CBQ's windows): an error counts by what the blocks after it make of
it. Each training step then runs N + 1 blocks forward and backward.

Activations beyond ``budget_bytes`` live in files under the work dir (``activations/``), read segment by
segment (ds_spd.stages.streaming).

Same training as the joint trainer (ds_spd.stages.distill.joint): every block sees the same micro-batches in the
same order (one DistributedSampler with the same seed per block), AdamW acts per parameter and blocks do
not share a loss term, so with ``gradient_clipping: 0`` the trained weights are bitwise equal (tested). With
clipping (DeepSpeed's default 1.0) this trainer clips each block's gradient norm on its own, the joint
trainer the global norm of all its blocks.

Data-parallel ranks split the teacher walk: each computes every world-th batch of activations and
broadcasts it (ds_spd.stages.streaming.computed_batches), so each rank holds all of them, as the sampler
needs, for a 1/world share of the compute.

Resume: a finished block is stored in the work dir (``blockNNN.safetensors`` + ``blockNNN.json``) and never
trained again; an unfinished block resumes from its last epoch (``blockNNN/``, DeepSpeed checkpoints). The trained
blocks are looked up before the walk: where all are finished there is no walk, and one of another run is refused
before any work.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ds_spd.core.block import SPDDecoderLayer
from ds_spd.errors import PlanError
from ds_spd.plan import Plan
from ds_spd.ranks import is_main_rank
from ds_spd.stages.distill.kit import (BlockDistiller, DistillResult, DistillSettings, block_mse, check_epochs, fit,
                                      grouped, peak_memory, plan_digest)
from ds_spd.stages.headgroup import HeadGrouping, find_grouping, permute_block
from ds_spd.stages.streaming import (ActivationBudget, ActivationStore, ActivationStores, BlockSource,
                                     default_budget_bytes, run_block)


class _SegmentPairs(Dataset):
    """(inputs, targets) of one block per segment, shaped like BlockPairs' items ([1, T, d] each)."""

    def __init__(self, inputs: ActivationStore, targets: ActivationStore):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, n: int):
        return self.inputs.read(n, n + 1), self.targets.read(n, n + 1)


# ---------------------------------------------------------------- training one block, resumable

def _done_paths(work_dir: str, i: int) -> tuple[str, str]:
    return os.path.join(work_dir, f"block{i:03d}.safetensors"), os.path.join(work_dir, f"block{i:03d}.json")


def _load_done(work_dir: str | None, i: int, client: dict, epochs: int):
    """A block finished with ``epochs`` epochs: (state, info); None if not finished (or trained fewer epochs:
    it continues from its last epoch)."""
    if not work_dir:
        return None
    weights, meta = _done_paths(work_dir, i)
    if not (os.path.isfile(weights) and os.path.isfile(meta)):
        return None
    from safetensors.torch import load_file
    with open(meta) as f:
        info = json.load(f)
    saved = info.get("client") or {}
    if {k for k in saved.keys() | client.keys() if saved.get(k) != client.get(k)} == {"upstream"}:
        print(f"distill: block {i}: the blocks before it changed since it was trained (its inputs with them): "
              "trained again", file=sys.stderr, flush=True)
        return None
    if saved != client:
        raise PlanError(f"finished block {i} in {work_dir!r} is from another run: use another --work-dir, or --restart")
    check_epochs(len(info["history"]), epochs, work_dir)
    finished = len(info["history"]) == epochs or info.get("stopped_early")
    if not finished and not os.path.isdir(os.path.join(work_dir, f"block{i:03d}")):
        print(f"distill: block {i} finished {len(info['history'])} epochs, {epochs} asked; its training state was "
              "removed when it finished, so it trains again from the start", file=sys.stderr, flush=True)
    return (load_file(weights), info) if finished else None


def _save_done(work_dir: str, i: int, state: dict, info: dict) -> None:
    from safetensors.torch import save_file

    from ds_spd.outputs import write_atomic
    weights, meta = _done_paths(work_dir, i)
    write_atomic(weights, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp))
    write_atomic(meta, json.dumps(info))   # written last: its presence marks the block finished


def _drop_stale_state(block_dir: str, upstream: str) -> None:
    """Chain mode: an unfinished block's training state is kept only while the blocks before it are the ones
    it was trained after (``upstream`` file in its state directory, written before its first epoch)."""
    import torch.distributed as dist
    marker = os.path.join(block_dir, "upstream")
    if is_main_rank():
        if os.path.isdir(block_dir):
            saved = open(marker).read() if os.path.isfile(marker) else None
            if saved != upstream:
                print(f"distill: {block_dir}: trained after other weights of the blocks before it: starts over",
                      file=sys.stderr, flush=True)
                import shutil
                shutil.rmtree(block_dir)   # ds_spd's own training state, under the work dir it fingerprinted
        os.makedirs(block_dir, exist_ok=True)
        with open(marker, "w") as f:
            f.write(upstream)
    if dist.is_initialized():
        dist.barrier()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A digest of a block's weights (names, dtypes and bytes)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def chain_block(teacher: SPDDecoderLayer, cls: str, state: dict[str, torch.Tensor] | None) -> SPDDecoderLayer:
    """Block ``teacher`` in the form it will run: trained (``state``, SPD), zero-shot SPD (ISB) or TP."""
    if state is None:
        teacher.spd = cls != "TP"
        return teacher
    block = copy.deepcopy(teacher)
    block.load_state_dict(state)
    block.spd = True
    return block


def _window_target(source: BlockSource, i: int, y: ActivationStore, settings: DistillSettings, store
                   ) -> tuple[ActivationStore, list[SPDDecoderLayer]]:
    """``loss_window``: the original blocks after block ``i`` (frozen, as many as the model has) and the teacher
    stream's outputs after them (``y``: after block i), the trained block's target."""
    target, followers = y, []
    for j in range(i + 1, min(i + settings.loss_window, source.config.num_hidden_layers - 1) + 1):
        block = source.block(j).requires_grad_(False)
        nxt = store()
        run_block(block, source.rotary, target, nxt, settings.micro_batch, shared=True)
        if target is not y:
            target.close()
        target = nxt
        followers.append(block)
    return target, followers


def _train_block(i: int, teacher: SPDDecoderLayer, rotary: nn.Module, layout, cls: str, x: ActivationStore,
                 y: ActivationStore, ds_config: dict, settings: DistillSettings, work_dir: str | None,
                 client: dict, use_accelerate: bool, progress: bool,
                 followers: list[SPDDecoderLayer] = ()) -> dict:
    import torch.distributed as dist
    student = copy.deepcopy(teacher)
    student.spd = True
    grouping = None
    if grouped(cls, settings):
        grouping = find_grouping(student, rotary, x.read(0, min(settings.hg_segments, len(x))), layout,
                                 settings.mlp_matching)
        permute_block(student, grouping, layout)
    distiller = BlockDistiller({i: student}, rotary, {i: list(followers)})
    mb = min(settings.micro_batch, len(x))
    first = (x.read(0, mb)[:, None], y.read(0, mb)[:, None])
    with torch.no_grad():
        _, initial = distiller(*first)
    block_dir = os.path.join(work_dir, f"block{i:03d}") if work_dir else None
    if block_dir and "upstream" in client:
        _drop_stale_state(block_dir, client["upstream"])
    fitted = fit(distiller, _SegmentPairs(x, y), ds_config, settings, use_accelerate, blocks=[i], desc=f"block {i}",
                 progress=progress, tokens_per_item=x.shape[1], state_dir=block_dir, client=client)
    state, best = fitted.states[i], fitted.best
    final = block_mse({i: teacher}, {i: state}, rotary, *first, followers={i: list(followers)})
    info = {"client": client, "history": [h["loss"][i] for h in fitted.history],
            "val_history": [h["val"][i] for h in fitted.history if "val" in h],
            "best_epoch": best.epoch[i] if best is not None else None,
            "start_val": best.start.get(i) if best is not None else None,
            "stopped_early": len(fitted.history) < settings.epochs,
            "initial_mse": initial[0].item(), "final_mse": final[0].item(),
            "seconds": fitted.seconds,
            "tokens": fitted.tokens, "grouping": None if grouping is None else grouping.to_json(),
            "zero_stage": fitted.zero_stage}
    if work_dir and is_main_rank():
        _save_done(work_dir, i, state, info)
    if dist.is_initialized():
        dist.barrier()
    if block_dir and os.path.isdir(block_dir) and is_main_rank():
        import shutil
        shutil.rmtree(block_dir)   # the finished block's file supersedes its training state
    del fitted, distiller, student
    gc.collect()
    return {"state": state, **info}


def distill_layerwise(source: BlockSource, plan: Plan, segments: torch.Tensor, ds_config: dict,
                      settings: DistillSettings, work_dir: str | None = None, budget_bytes: int | None = None,
                      use_accelerate: bool = False, progress: bool = True,
                      esb_segments: torch.Tensor | None = None) -> DistillResult:
    """Train every SB/ESB block of ``plan``, one block resident at a time (see the module docstring);
    ``esb_segments``: the ESB blocks' own calibration segments (original inputs only): the original model is walked
    on them first, up to the last ESB block, each ESB block trained there as the main walk trains a block; the main
    walk then takes them as finished."""
    # what is alive now lives through the walk: frozen, the gc.collect() after each block scans only what that
    # block made (a full collection cost 0.3 s on Gemma 3, twice a block)
    gc.freeze()
    try:
        if source.layout.tp_size != plan.tp_size:
            raise PlanError(f"the blocks are read for tp size {source.layout.tp_size}, the plan is for "
                            f"{plan.tp_size}")
        budget = ActivationBudget(default_budget_bytes() if budget_bytes is None else budget_bytes)
        walk = dict(source=source, plan=plan, ds_config=ds_config, settings=settings, work_dir=work_dir,
                    budget=budget, use_accelerate=use_accelerate, progress=progress)
        t0 = time.perf_counter()
        done: dict[int, dict] = {}
        esb = [] if esb_segments is None else esb_own_blocks(plan, settings.esb_segments_min_sensitivity)
        if esb:
            done = _walk(trained=esb, segments=esb_segments, extra={"segments": int(esb_segments.shape[0])},
                         activations="activations_esb", desc=f"ESB blocks on {len(esb_segments)} segments", **walk)
        done = _walk(trained=plan.trained_blocks, segments=segments, own=done, **walk)
        return _result(done, budget, time.perf_counter() - t0)
    finally:
        gc.unfreeze()


def esb_own_blocks(plan: Plan, floor: float | None = None) -> list[int]:
    """The ESB blocks that read their own segments (``esb_segments``): every one, or those whose relative sensitivity
    is at least ``floor`` (``esb_segments_min_sensitivity``; a block the scan did not measure included)."""
    esb = [b.index for b in plan.blocks if b.cls == "ESB"]
    if floor is None or not esb:
        return esb
    from ds_spd.stages.planner import relative
    rel = relative(plan)
    return [i for i in esb if rel[i] is None or abs(rel[i]) >= floor]


class _ResumeKeys:
    """Each trained block's resume key, handed out in walk order: the plan, the block, its class and the input
    source (``extra``: what else its training depends on); in chain mode also a digest of the blocks before it in
    their final form (classes, trained weights), since its inputs are their outputs."""

    def __init__(self, plan: Plan, settings: DistillSettings, extra: dict):
        self.plan, self.classes = plan_digest(plan), {b.index: b.cls for b in plan.blocks}
        self.source, self.extra = settings.input_source, extra
        self.chain = settings.input_source == "chain"
        self.upstream = hashlib.sha256()
        self.diverged = False   # chain: an SPD block is behind (before it the chain is the original model)

    def client(self, i: int) -> dict:
        client = {"plan": self.plan, "block": i, "class": self.classes[i], "input_source": self.source, **self.extra}
        return {**client, "upstream": self.upstream.hexdigest()[:16]} if self.chain else client

    def passed(self, i: int, state: dict[str, torch.Tensor] | None) -> None:
        """Block ``i`` is behind the walk now, in its final form (``state``: its trained weights)."""
        self.diverged = self.diverged or self.classes[i] != "TP"
        if self.chain and self.diverged:
            self.upstream.update(f"{i}:{self.classes[i]}:{'' if state is None else state_digest(state)};".encode())


def _lookup(work_dir: str | None, i: int, client: dict, settings: DistillSettings, progress: bool) -> dict | None:
    """Block ``i``'s finished record (state, history, ...) in the work dir, or None (see :func:`_load_done`)."""
    got = _load_done(work_dir, i, client, settings.epochs)
    if got is None:
        return None
    if progress:
        print(f"distill: block {i} already trained ({work_dir}): not trained again", file=sys.stderr)
    return {"state": got[0], **got[1]}


def _finished(work_dir: str | None, plan: Plan, trained: list[int], settings: DistillSettings, extra: dict,
              own: dict[int, dict], progress: bool) -> dict[int, dict | None]:
    """{block: its finished record, or None} for the trained blocks looked up before the walk: all of them (their
    keys do not depend on each other), or in chain mode those up to the first unfinished one (the keys after it
    depend on the weights it will get). A block of another run is refused here, before the expensive walk."""
    keys, found = _ResumeKeys(plan, settings, extra), {}
    for i in range(max(trained) + 1):
        if i in trained:
            found[i] = own[i] if i in own else _lookup(work_dir, i, keys.client(i), settings, progress)
            if found[i] is None and keys.chain:
                break
        keys.passed(i, found[i]["state"] if found.get(i) else None)
    return found


def _walk(source: BlockSource, plan: Plan, trained: list[int], segments: torch.Tensor, ds_config: dict,
          settings: DistillSettings, work_dir: str | None, budget: ActivationBudget, use_accelerate: bool,
          progress: bool, own: dict[int, dict] | None = None, extra: dict | None = None,
          activations: str = "activations", desc: str = "") -> dict[int, dict]:
    """Walk the model on ``segments`` through the last of ``trained``, training each of them that is not finished
    (in the work dir, or in ``own``: trained by an earlier walk); {block: its record (state, history, ...)}. No walk
    where every one is finished. ``extra``: what the blocks' resume keys hold beyond the plan's."""
    own, extra = own or {}, extra or {}
    if not trained:
        return {}
    looked_up = _finished(work_dir, plan, trained, settings, extra, own, progress)
    if len(looked_up) == len(trained) and all(looked_up.values()):
        return looked_up
    torch.manual_seed(settings.seed)
    keys = _ResumeKeys(plan, settings, extra)
    classes, chain = keys.classes, keys.chain
    prefix = set(plan.spd_blocks) if settings.input_source == "prefix" else set()
    stores = ActivationStores((segments.shape[0], segments.shape[1], source.config.hidden_size), source.dtype, budget,
                              os.path.join(work_dir, activations) if work_dir else None)
    store = stores.new
    x = store()
    source.first_inputs(segments, settings.micro_batch, x, shared=True)
    xs = x            # chain: the student chain's inputs (the teacher's store until the first SPD block)
    done: dict[int, dict] = {}
    last = max(trained)
    for i in tqdm(range(last + 1), desc=f"layer-wise distill, {desc}" if desc else "layer-wise distill",
                  disable=not progress):
        teacher = source.block(i)
        y = None
        if i in trained:
            client = keys.client(i)
            found = looked_up[i] if i in looked_up else _lookup(work_dir, i, client, settings, progress)
            if found is None or (not prefix and i < last):   # to train on, or the next block's inputs
                y = store()
                run_block(teacher, source.rotary, x, y, settings.micro_batch, shared=True)
            if found is not None:
                done[i] = found
            else:
                target, followers = _window_target(source, i, y, settings, store)
                done[i] = _train_block(i, teacher, source.rotary, source.layout, classes[i], xs, target, ds_config,
                                       settings, work_dir, client, use_accelerate, progress, followers)
                if target is not y:
                    target.close()
        elif chain and i < last:
            y = store()
            run_block(teacher, source.rotary, x, y, settings.micro_batch, shared=True)
        if i == last:
            if y is not None:
                y.close()
        elif chain:   # two streams: the teacher's outputs, and the chain's through block i in its final form
            state = done[i]["state"] if i in done else None
            if xs is x and classes[i] == "TP":
                nxt_s = y     # no SPD block yet: the chain is the teacher
            else:
                nxt_s = store()
                run_block(chain_block(teacher, classes[i], state), source.rotary, xs, nxt_s, settings.micro_batch,
                          shared=True)
            keys.passed(i, state)
            if xs is not x:
                xs.close()
            x.close()
            x, xs = y, nxt_s
        else:
            if y is not None and not prefix:
                nxt = y          # the teacher's outputs are the next block's original inputs
            else:
                nxt = store()
                teacher.spd = i in prefix
                run_block(teacher, source.rotary, x, nxt, settings.micro_batch, shared=True)
                if y is not None:
                    y.close()
            x.close()
            x = xs = nxt
        del teacher
        gc.collect()
    if xs is not x:
        xs.close()
    x.close()
    stores.remove_directory()
    return done


def _result(done: dict[int, dict], budget: ActivationBudget, wall: float) -> DistillResult:
    """The trained blocks' records as one result (``wall``: both walks' time)."""
    if not done:
        return DistillResult({}, {})
    train_seconds = sum(d["seconds"] for d in done.values())
    tokens = sum(d["tokens"] for d in done.values())
    epochs = max(len(d["history"]) for d in done.values())
    history = [{"epoch": e + 1, "loss": {i: d["history"][e] for i, d in done.items() if e < len(d["history"])},
                **({"val": {i: d["val_history"][e] for i, d in done.items() if e < len(d.get("val_history", []))}}
                   if any(d.get("val_history") for d in done.values()) else {})}
               for e in range(epochs)]
    groupings = {i: HeadGrouping.from_json(d["grouping"]) for i, d in done.items() if d["grouping"] is not None}
    return DistillResult(
        block_states={i: d["state"] for i, d in done.items()}, groupings=groupings, history=history,
        initial_mse={i: d["initial_mse"] for i, d in done.items()},
        final_mse={i: d["final_mse"] for i, d in done.items()},
        seconds=train_seconds, tokens_per_second=tokens / max(train_seconds, 1e-9), peak_memory_bytes=peak_memory(),
        zero_stage=next((d["zero_stage"] for d in done.values()), None), wall_seconds=wall,
        spilled_bytes=budget.spilled_bytes,
        best_epoch={i: d["best_epoch"] for i, d in done.items() if d.get("best_epoch") is not None},
        start_val={i: d["start_val"] for i, d in done.items() if d.get("start_val") is not None})
