"""End-to-end stage after B2B: the distilled blocks trained together on the model's own output.

B2B fits each block to its teacher on the teacher's inputs, alone; the errors of 20 such blocks still add
up along the residual stream. This stage trains the distilled (SB / ESB) blocks, in their SPD form, to make
the SPD model's next-token distribution match the TP model's: loss KL(p_TP || p_SPD) per token, on the
calibration segments. With ``extra`` blocks (``distill.kl_blocks`` all) it trains those too, each in the
form the plan runs it in (a block left in TP form can take up drift the SPD blocks before it leave). The
whole model is in one process (virtual TP): the TP model is the same model with the original blocks swapped
back in and every block in TP form, so no second copy is held. Every other weight is frozen. Held-out
segments (``val_segments``) choose the epoch, as in B2B.

The stage is compute-bound (four passes through the model a step: the TP model's, the students' and their
backward); ``kl_dtype`` bfloat16 runs the training passes through the blocks under autocast (weights and
optimizer stay fp32), while the head, the KL and the held-out measurement that chooses the epoch stay fp32.
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ds_spd.core.inject import decoder_layers, set_spd_blocks
from ds_spd.stages.distill.kit import DistillSettings, fit, held_out_count


class EndToEndKL(nn.Module):
    """Trainable: the students (copies of the trained blocks, each in its planned form). ``forward(input_ids)``
    returns the mean per-token KL and, per student, that same value (each block's held-out objective is the
    joint one)."""

    def __init__(self, model: nn.Module, students: dict[int, nn.Module], spd_blocks: tuple[int, ...],
                 autocast: torch.dtype | None = None, rates: dict[int, float] | None = None):
        super().__init__()
        self.autocast = autocast   # the training passes through the blocks (not the head, not held-out ones)
        self.rates = rates or {}   # block -> its own learning rate (others: the stage's)
        self.indices = sorted(students)
        self.blocks = nn.ModuleList([students[i] for i in self.indices])
        self.spd_blocks = tuple(spd_blocks)
        self._model = (model,)     # not a submodule: frozen, and not the engine's to partition or cast
        layers = decoder_layers(model)
        self._originals = {i: layers[i] for i in self.indices}

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups: the students at ``lr``, those with a rate of their own at it."""
        groups: dict[float, list] = {}
        for i, block in zip(self.indices, self.blocks):
            groups.setdefault(self.rates.get(i, lr), []).extend(p for p in block.parameters() if p.requires_grad)
        return [{"params": params, "lr": rate} for rate, params in groups.items()]

    def _use(self, students: bool) -> None:
        layers = decoder_layers(self._model[0])
        for i, block in zip(self.indices, self.blocks):
            layers[i] = block if students else self._originals[i]
        set_spd_blocks(self._model[0], self.spd_blocks if students else ())

    def forward(self, input_ids: torch.Tensor):
        from ds_spd.models.head import final_hidden, kl_to
        model = self._model[0]
        cast = self.autocast if torch.is_grad_enabled() and self.autocast not in (None, torch.float32) else None
        blocks = torch.autocast(input_ids.device.type, dtype=cast) if cast else nullcontext()
        try:
            self._use(False)
            with torch.no_grad(), blocks:
                target = final_hidden(model, input_ids=input_ids)
            self._use(True)
            with blocks:
                hidden = final_hidden(model, input_ids=input_ids)
            kl = kl_to(model, hidden.float(), target.float())   # the head in chunks of tokens, fp32
        finally:
            self._use(False)
        return kl, kl.detach().repeat(len(self.indices))


def kl_stage(model: nn.Module, states: dict[int, dict[str, torch.Tensor]], spd_blocks: tuple[int, ...],
             segments: torch.Tensor, ds_config: dict, settings: DistillSettings, use_accelerate: bool = False,
             progress: bool = True, autocast: torch.dtype | None = None, extra: tuple[int, ...] = (),
             extra_lr: float | None = None) -> dict:
    """Train the blocks of ``states`` (B2B results, loaded into SPD copies of ``model``'s blocks; ``model``
    is a virtualized model with its original weights, left as it was) and those of the ``extra`` blocks that
    ``states`` lacks (from their original weights, at ``extra_lr`` if given) for ``settings.kl_epochs`` epochs
    at ``settings.kl_lr``. Returns {"states", "blocks", "history", "initial_kl", "final_kl", "best_epoch",
    "seconds", ...}: KL measured on the held-out segments (else the first micro-batch), before and with the
    returned weights. ``autocast``: the dtype of the training passes through the blocks (None: the model's own)."""
    kl_settings = settings.model_copy(update={"epochs": settings.kl_epochs, "lr": settings.kl_lr})
    layers = decoder_layers(model)
    requires = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    students = {}
    for i in sorted(set(states) | set(extra)):
        student = copy.deepcopy(layers[i])
        if i in states:
            student.load_state_dict(states[i])
        student.requires_grad_(True)
        students[i] = student
    module = EndToEndKL(model, students, spd_blocks, autocast,
                        rates={i: extra_lr for i in extra if i not in states} if extra_lr else None)
    data = TensorDataset(segments)
    held_out = held_out_count(len(data), kl_settings)
    start = time.perf_counter()
    try:
        # epoch 0 is the B2B weights; the epoch is chosen on the held-out segments, else the first micro-batch
        fitted = fit(module, data, ds_config, kl_settings, use_accelerate, blocks=module.indices,
                     desc="end-to-end KL", progress=progress, tokens_per_item=segments.shape[1],
                     probe=TensorDataset(segments[:kl_settings.micro_batch]))
        first, best = module.indices[0], fitted.best
        history = [{"epoch": h["epoch"], "kl": h["loss"][first], **({"val_kl": h["val"][first]} if "val" in h else {})}
                   for h in fitted.history]
        return {"states": fitted.states, "blocks": list(module.indices), "history": history,
                "initial_kl": best.start[first], "final_kl": best.loss[first], "best_epoch": best.epoch[first],
                "seconds": time.perf_counter() - start,
                "segments": len(data), "held_out": held_out,
                "dtype": str(autocast or next(module.parameters()).dtype).removeprefix("torch."),
                "measured_on": "held-out calibration segments" if held_out else "the first calibration micro-batch"}
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
