"""The training kit both B2B trainers share (ds_spd.stages.distill.joint, .layerwise) and the end-to-end stage
uses (.e2e): settings, the student module, the DeepSpeed / accelerate trainer, the epoch loop with its held-out
epoch choice, the one resume of a training state, the result.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from ds_spd.config import DistillConfig
from ds_spd.core.block import SPDDecoderLayer
from ds_spd.core.inject import model_device
from ds_spd.errors import PlanError
from ds_spd.models.adapters import layer_type
from ds_spd.plan import Plan
from ds_spd.ranks import is_main_rank, world_size
from ds_spd.stages.headgroup import HeadGrouping, attention_kwargs


class DistillSettings(DistillConfig):
    """The ``spd.distill`` knobs (declared once, in DistillConfig) plus what a run derives: the DeepSpeed
    micro-batch and the calibration seed."""

    lr: float = Field(3e-4, gt=0)   # resolved: a run's config may leave it to ds_spd.stages.lr
    kl_lr: float = Field(1e-5, gt=0)   # resolved: left to ds_spd.stages.lr.kl_stage_lr unless set
    micro_batch: int = Field(4, ge=1)
    seed: int = 0

    @property
    def stop_patience(self) -> int:
        return 2 if self.patience is None else self.patience

    def knobs(self) -> dict:
        """What determines the trained weights (not where they are written)."""
        return self.model_dump(exclude={"out", "work_dir", "activation_budget_gb"})


class BlockPairs(Dataset):
    """Per segment: the inputs and the teacher outputs of every trained block, ``[n_blocks, T, d]`` each."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets   # [n_blocks, N, T, d]

    def __len__(self) -> int:
        return self.inputs.shape[1]

    def __getitem__(self, n: int):
        return self.inputs[:, n], self.targets[:, n]


class BlockDistiller(nn.Module):
    """The student blocks, trained together; ``forward`` returns the summed loss and the per-block MSEs.

    ``followers``: per student, frozen original blocks its output runs through before the loss (a loss past the
    block, ``loss_window``): the targets are then the original model's outputs after those blocks."""

    def __init__(self, students: dict[int, SPDDecoderLayer], rotary: nn.Module,
                 followers: dict[int, list[SPDDecoderLayer]] | None = None):
        super().__init__()
        self.indices = sorted(students)
        self.blocks = nn.ModuleList([students[i] for i in self.indices])
        self._rotary = (rotary,)  # not a submodule: its inv_freq must stay fp32 when the engine casts to bf16
        # not submodules either: frozen, never the engine's to partition, cast or optimise
        self._followers = tuple(tuple((followers or {}).get(i, ())) for i in self.indices)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        dtype = self.blocks[0].input_layernorm.weight.dtype
        inputs = inputs.to(dtype)
        kwargs = {}   # rotary embeddings and mask depend only on the layer type (full / sliding attention)
        losses = []
        for j, block in enumerate(self.blocks):
            kind = layer_type(block.self_attn.config, block.self_attn.layer_idx)
            if kind not in kwargs:
                kwargs[kind] = attention_kwargs(self._rotary[0], inputs[:, j], block)
            out = block(inputs[:, j], **kwargs[kind])
            for follower in self._followers[j]:
                kind = layer_type(follower.self_attn.config, follower.self_attn.layer_idx)
                if kind not in kwargs:
                    kwargs[kind] = attention_kwargs(self._rotary[0], inputs[:, j], follower)
                out = follower(out, **kwargs[kind])
            losses.append(F.mse_loss(out.float(), targets[:, j].float()))
        losses = torch.stack(losses)
        return losses.sum(), losses.detach()


def grouped(cls: str, settings: DistillSettings) -> bool:
    """Whether a trained block of class ``cls`` gets head grouping first: ESB blocks (the paper), or every
    trained block (``head_grouping: all``: the permutation leaves plain TP's function unchanged, and neuron
    matching lowers the SPD error of every block it was measured on)."""
    return cls == "ESB" or settings.head_grouping == "all"


def plan_digest(plan: Plan) -> str:
    """What of a plan determines the distilled weights: the model shape, tp size and grain, and each block's
    class (which blocks train, which get head grouping, which form the SPD prefix). Sensitivities and scan
    timings do not, so a re-scan that picks the same classes resumes the same run."""
    key = [plan.fingerprint, plan.tp_size, plan.tp_grain_size, [(b.index, b.cls) for b in plan.blocks]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DistillResult:
    block_states: dict[int, dict[str, torch.Tensor]]
    groupings: dict[int, HeadGrouping]
    history: list[dict] = field(default_factory=list)   # per epoch (all, resumed ones too): mean loss per block
    initial_mse: dict[int, float] = field(default_factory=dict)   # first micro-batch, before training (after HG)
    final_mse: dict[int, float] = field(default_factory=dict)     # the same micro-batch, the returned weights
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_bytes: int = 0
    zero_stage: int | None = None
    wall_seconds: float = 0.0     # layer-wise: the whole walk (activations and block reads included)
    spilled_bytes: int = 0        # layer-wise: activations that went to files (over the budget)
    best_epoch: dict[int, int] = field(default_factory=dict)     # with held-out segments: the epoch kept (0: start)
    start_val: dict[int, float] = field(default_factory=dict)    # held-out loss of the starting weights


def peak_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


#: The optimizer of a DeepSpeed config without one (ds_spd.stages.distill.run.deepspeed_config); lr is settings'.
DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"weight_decay": 0.0, "torch_adam": True}}


class Trainer:
    """DeepSpeed engine or accelerate (with its DeepSpeed plugin) behind the same four calls."""

    def __init__(self, distiller: nn.Module, ds_config: dict, settings: DistillSettings, use_accelerate: bool,
                 total_steps: int = 0):
        self.use_accelerate = use_accelerate
        self.scheduler = None
        lr = settings.lr
        # a distiller may give some of its parameters their own rate (the KL stage's TP-form blocks)
        params = distiller.param_groups(lr) if hasattr(distiller, "param_groups") else \
            [p for p in distiller.parameters() if p.requires_grad]
        optimizer = ds_config.get("optimizer", DEFAULT_OPTIMIZER)
        ds_config = {**ds_config, "optimizer": {**optimizer, "params": {**optimizer.get("params", {}), "lr": lr}}}
        schedule = lr_schedule(settings, total_steps)
        # ZeRO-3: the SPD block reads the MLP weights without calling the MLP module; DeepSpeed 0.19 fetches
        # such parameters on access (declaring SPDDecoderLayer a z3 leaf module broke the backward pass).
        from ds_spd.core.comm import backend, init_comm, prepare_dist_env, release_shm_buffer
        if use_accelerate:   # accelerate runs DeepSpeed's distributed init itself, inside prepare()
            prepare_dist_env()
            from accelerate import Accelerator
            from accelerate.utils import InitProcessGroupKwargs
            self.acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend=backend())])
            plugin = self.acc.state.deepspeed_plugin
            if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = settings.micro_batch
            self.zero_stage = None if plugin is None else plugin.zero_stage
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            self.model, self.optimizer = self.acc.prepare(distiller, optimizer)
            if schedule is not None:   # stepped here once per step (a prepared one steps once per process)
                self.scheduler = schedule(self.optimizer)
                self.acc.register_for_checkpointing(self.scheduler)
            release_shm_buffer()
            self.rank, self.world = self.acc.process_index, self.acc.num_processes
        else:
            import deepspeed

            init_comm()
            self.model, self.optimizer, _, _ = deepspeed.initialize(model=distiller, model_parameters=params,
                                                                    config=ds_config, lr_scheduler=schedule)
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            self.zero_stage = self.model.zero_optimization_stage()
        self.device = model_device(distiller)

    def step(self, *batch):
        loss, per_block = self.model(*batch)
        if self.use_accelerate:
            self.acc.backward(loss)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer.zero_grad()
        else:
            self.model.backward(loss)
            self.model.step()
        return per_block

    @torch.no_grad()
    def evaluate(self, *batch: torch.Tensor) -> torch.Tensor:
        """Per-block loss of the trained students (the engine's own forward: ZeRO-3 gathers what it needs)."""
        return self.model(*(t.to(self.device) for t in batch))[1].float().cpu()

    def validate(self, data: Dataset, micro_batch: int) -> list[float]:
        """Mean per-block loss over ``data`` (every rank the same: all of it), in micro-batches."""
        total, count = 0, 0
        for batch in DataLoader(data, batch_size=micro_batch):
            total = total + self.evaluate(*batch) * batch[0].shape[0]
            count += batch[0].shape[0]
        return (total / count).tolist()

    def save(self, directory: str, epoch: int, client: dict) -> None:
        """This epoch's training state under ``directory/epoch{N}``; then the earlier epochs' are removed (a
        resume needs only the latest: 30 blocks x 10 epochs of ZeRO state filled a disk)."""
        tag = f"epoch{epoch}"
        self._save(directory, epoch, tag, client)
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()   # every rank has written its part of this epoch
        if self.rank == 0:
            import shutil
            for name in os.listdir(directory):
                if name.startswith("epoch") and name[5:].isdigit() and int(name[5:]) < epoch:
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

    def _save(self, directory: str, epoch: int, tag: str, client: dict) -> None:
        if self.use_accelerate:
            path = os.path.join(directory, tag)
            self.acc.save_state(path)
            if self.rank == 0:
                with open(os.path.join(path, "client_state.json"), "w") as f:
                    json.dump({**client, "epoch": epoch}, f)
                with open(os.path.join(directory, "latest"), "w") as f:
                    f.write(tag)
            self.acc.wait_for_everyone()
        else:
            self.model.save_checkpoint(directory, tag=tag, client_state={**client, "epoch": epoch})

    def load(self, directory: str) -> dict | None:
        latest = os.path.join(directory, "latest")
        if not os.path.isfile(latest):
            return None
        if self.use_accelerate:
            tag = open(latest).read().strip()
            self.acc.load_state(os.path.join(directory, tag))
            with open(os.path.join(directory, tag, "client_state.json")) as f:
                return json.load(f)
        _, client = self.model.load_checkpoint(directory)
        return client

    def gathered_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """Full (unpartitioned) student weights, by block index (the module's ``indices`` and ``blocks``)."""
        import deepspeed
        module = self.model.module if hasattr(self.model, "module") else self.model
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
            return {i: {k: v.detach().float().cpu().clone() for k, v in block.state_dict().items()}
                    for i, block in zip(module.indices, module.blocks)}


def steps_per_epoch(n_items: int, world: int, micro_batch: int) -> int:
    """Optimizer steps in one epoch of ``n_items`` split by a DistributedSampler (which pads to equal shares)."""
    return math.ceil(math.ceil(n_items / world) / micro_batch)


def lr_schedule(settings: DistillSettings, total_steps: int):
    """A callable optimizer -> LambdaLR (DeepSpeed's client scheduler form), or None for a flat rate with no
    warm-up (then a ``scheduler`` of the DeepSpeed config, if any, applies). Cosine decays to 0 at the last
    step of the asked epochs; early stopping does not shorten it."""
    warm = int(settings.warmup * total_steps)
    if settings.schedule == "constant" and warm == 0:
        return None

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if settings.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class BestEpochs:
    """Per block, the epoch with the lowest held-out loss so far, that loss and the weights then (early
    stopping / epoch choice on validation); epoch 0 is the starting weights. Saved next to the training state,
    so a resumed run keeps them."""

    FILES = ("best.safetensors", "best.json")

    def __init__(self, blocks: list[int], patience: int | None):
        self.blocks, self.patience = list(blocks), patience
        self.loss: dict[int, float] = {}
        self.epoch: dict[int, int] = {}
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.start: dict[int, float] = {}   # the starting weights' held-out loss (epoch 0)

    def update(self, epoch: int, losses: list[float], states: Callable[[], dict[int, dict]]) -> list[int]:
        """Record one epoch's held-out losses; snapshot the improved blocks' weights. Returns those blocks."""
        if epoch == 0:
            self.start = dict(zip(self.blocks, losses))
        better = [i for i, v in zip(self.blocks, losses) if i not in self.loss or v < self.loss[i]]
        if better:
            now = states()
            for i in better:
                self.loss[i], self.epoch[i], self.state[i] = losses[self.blocks.index(i)], epoch, now[i]
        return better

    def exhausted(self, epoch: int) -> bool:
        """Every block went ``patience`` epochs without improving."""
        return self.patience is not None and all(epoch - self.epoch.get(i, 0) >= self.patience for i in self.blocks)

    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        from ds_spd.outputs import write_atomic
        os.makedirs(directory, exist_ok=True)
        tensors = {f"{i}/{k}": v.contiguous() for i, st in self.state.items() for k, v in st.items()}
        write_atomic(os.path.join(directory, self.FILES[0]), lambda tmp: save_file(tensors, tmp))
        write_atomic(os.path.join(directory, self.FILES[1]),
                     json.dumps({"loss": self.loss, "epoch": self.epoch, "start": self.start}))

    def load(self, directory: str) -> None:
        weights, meta = (os.path.join(directory, f) for f in self.FILES)
        if not os.path.isfile(meta):
            return
        from safetensors.torch import load_file
        with open(meta) as f:
            info = json.load(f)
        self.loss = {int(k): v for k, v in info["loss"].items()}
        self.epoch = {int(k): v for k, v in info["epoch"].items()}
        self.start = {int(k): v for k, v in info.get("start", {}).items()}
        for name, t in load_file(weights).items():
            i, _, k = name.partition("/")
            self.state.setdefault(int(i), {})[k] = t


def check_epochs(trained: int, asked: int, work_dir: str) -> None:
    if trained > asked:
        raise PlanError(f"work dir {work_dir!r} holds {trained} trained epochs, more than the {asked} asked: "
                        f"ask for >= {trained} epochs, or --restart")


def resume(trainer: Trainer, directory: str | None, client: dict, settings: DistillSettings,
           best: BestEpochs | None, what: str, progress: bool) -> dict | None:
    """Load the latest epoch's training state under ``directory`` into ``trainer`` (and ``best``), if there is
    one: the state saved with it (``epoch``, ``history``...), after checking that it belongs to this run
    (``client``: every key must match, the differing ones are named) and trained no more epochs than asked.
    None: nothing to resume, training starts at epoch 0."""
    found = trainer.load(directory) if directory and os.path.isdir(directory) else None
    if found is None:
        return None
    saved = found.get("client", {})
    mismatch = [k for k in client if saved.get(k) != client[k]]
    if mismatch:
        raise PlanError(f"training state of {what} in {directory!r} is for another run ({', '.join(mismatch)} "
                        "differ): use another --work-dir, or --restart")
    check_epochs(found["epoch"], settings.epochs, directory)
    if best is not None:
        best.load(directory)
    if progress:
        print(f"distill: resuming from epoch {found['epoch']} of {settings.epochs} ({what}, {directory})",
              file=sys.stderr, flush=True)
    return found


def run_epochs(trainer: Trainer, pairs: Dataset, settings: DistillSettings, start_epoch: int, desc: str,
               progress: bool, end_of_epoch: Callable[[int, list[float], list[float] | None], None],
               tokens_per_item: int, held_out: Dataset | None = None, best: BestEpochs | None = None
               ) -> tuple[int, float]:
    """The training loop of every trainer: epochs ``start_epoch+1..`` over ``pairs`` split by a seeded
    DistributedSampler (so every trainer sees the same micro-batches in the same order); after each epoch
    the held-out loss (if ``held_out``) goes to ``best``, then ``end_of_epoch(epoch, mean training loss per
    block, held-out loss per block or None)``; stops early once ``best`` is exhausted. Returns (tokens
    stepped, seconds)."""
    sampler = DistributedSampler(pairs, num_replicas=trainer.world, rank=trainer.rank, shuffle=True,
                                 seed=settings.seed)
    loader = DataLoader(pairs, batch_size=settings.micro_batch, sampler=sampler)
    tokens, start = 0, time.perf_counter()
    if best is not None and held_out is not None and start_epoch == 0 and not best.loss:
        # the starting weights (zero-shot SPD or head grouping's; the end-to-end stage's B2B weights) are epoch
        # 0's candidate: a block that training makes worse on the held-out segments keeps them
        best.update(0, trainer.validate(held_out, settings.micro_batch), trainer.gathered_state)
    for epoch in range(start_epoch, settings.epochs):
        if best is not None and best.exhausted(epoch):
            break
        sampler.set_epoch(epoch)
        total, count = 0, 0
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{settings.epochs}", disable=not progress, leave=False)
        for batch in bar:
            per_block = trainer.step(*(t.to(trainer.device) for t in batch))
            total = total + per_block.float().cpu()
            count += 1
            tokens += batch[0].shape[0] * tokens_per_item
            bar.set_postfix(loss=f"{per_block.mean().item():.3g}")   # per block (the end-to-end stage's share one)
        val = None
        if held_out is not None:
            val = trainer.validate(held_out, settings.micro_batch)
            if best is not None:
                best.update(epoch + 1, val, trainer.gathered_state)
        end_of_epoch(epoch + 1, (total / max(count, 1)).tolist(), val)
    return tokens, time.perf_counter() - start


@dataclass
class Fitted:
    """What :func:`fit` trained: the kept weights per block, every epoch's losses, and how."""

    states: dict[int, dict[str, torch.Tensor]]   # the held-out-best epoch's weights (else the last epoch's)
    history: list[dict]                          # per epoch: {"epoch", "loss": {block: v}, "val": {block: v}?}
    best: BestEpochs | None
    tokens: int
    seconds: float
    zero_stage: int | None


def fit(module: nn.Module, data: Dataset, ds_config: dict, settings: DistillSettings, use_accelerate: bool, *,
        blocks: list[int], desc: str, progress: bool, tokens_per_item: int, state_dir: str | None = None,
        client: dict | None = None, probe: Dataset | None = None) -> Fitted:
    """The one training recipe of every trainer (joint, layer-wise, end-to-end): the last ``val_segments`` items of
    ``data`` held out, a :class:`Trainer` with its schedule over the asked epochs, the held-out epoch choice (on
    ``probe`` where nothing is held out and a probe is given), resume from ``state_dir`` (checked against
    ``client``) and a save after every epoch, the epochs; returns the kept weights."""
    train, held_out = split_held_out(data, settings)
    trainer = Trainer(module, ds_config, settings, use_accelerate,
                      settings.epochs * steps_per_epoch(len(train), world_size(), settings.micro_batch))
    measured = held_out if held_out is not None else probe
    best = BestEpochs(blocks, settings.stop_patience) if measured is not None else None
    # the work dir's fingerprint was checked before (ds_spd.workdir): only then is its training state loaded
    found = resume(trainer, state_dir, client or {}, settings, best, desc, progress) if state_dir else None
    start_epoch = found["epoch"] if found else 0
    history = _history_of(found, blocks)

    def end_of_epoch(epoch: int, mean: list[float], val: list[float] | None) -> None:
        history.append({"epoch": epoch, "loss": dict(zip(blocks, mean)),
                        **({"val": dict(zip(blocks, val))} if val is not None else {})})
        if state_dir:
            if best is not None and is_main_rank():
                best.save(state_dir)
            trainer.save(state_dir, epoch, {"client": client, "history": history})
    tokens, seconds = run_epochs(trainer, train, settings, start_epoch, desc, progress, end_of_epoch,
                                 tokens_per_item, measured, best)
    states = best.state if best is not None else trainer.gathered_state()
    return Fitted(states, history, best, tokens, seconds, trainer.zero_stage)


def _history_of(found: dict | None, blocks: list[int]) -> list[dict]:
    """The epochs a resumed training state recorded (JSON: block keys as strings), as :func:`fit` keeps them; a
    layer-wise state saved before :func:`fit` (a list of one block's losses, ``val`` beside it) converted."""
    saved = (found or {}).get("history", [])
    if saved and not isinstance(saved[0], dict):
        val = found.get("val") or []
        return [{"epoch": e + 1, "loss": {blocks[0]: v}, **({"val": {blocks[0]: val[e]}} if e < len(val) else {})}
                for e, v in enumerate(saved)]
    return [{**h, "loss": {int(k): v for k, v in h["loss"].items()},
             **({"val": {int(k): v for k, v in h["val"].items()}} if "val" in h else {})} for h in saved]


def held_out_count(n: int, settings: DistillSettings) -> int:
    """Held-out segments: ``val_segments``, by default an eighth of the ``n`` calibration segments."""
    return n // 8 if settings.val_segments is None else settings.val_segments


def split_held_out(pairs: Dataset, settings: DistillSettings) -> tuple[Dataset, Dataset | None]:
    """(training items, held-out items): the last ``val_segments`` calibration segments are held out."""
    n = len(pairs)
    v = held_out_count(n, settings)
    if not v:
        return pairs, None
    if v >= n:
        raise PlanError(f"val_segments {v} leaves no calibration segment to train on (there are {n}): "
                        "raise --max-samples or lower val_segments")
    return Subset(pairs, range(n - v)), Subset(pairs, range(n - v, n))


@torch.no_grad()
def block_mse(templates: dict[int, nn.Module], states: dict[int, dict[str, torch.Tensor]], rotary: nn.Module,
              inputs: torch.Tensor, targets: torch.Tensor,
              followers: dict[int, list[nn.Module]] | None = None) -> torch.Tensor:
    """Per-block MSE of the weights ``states`` (loaded into SPD copies of ``templates``) on ``inputs``
    ``[B, n_blocks, T, d]``: the plain forward, outside any engine, as initial_mse is measured."""
    copies = {}
    for i, template in templates.items():
        block = copy.deepcopy(template)
        block.load_state_dict(states[i])
        block.spd = True
        copies[i] = block
    device = model_device(next(iter(copies.values())))
    return BlockDistiller(copies, rotary, followers)(inputs.to(device), targets.to(device))[1].float().cpu()
