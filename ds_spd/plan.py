"""The SPD plan: which blocks drop their attention sync, and what model / tp size it was made for.

A plan is data (JSON). It records a fingerprint of the model's shape and the tp size, so a plan made
for another model or tp size is rejected with a message that names the mismatch.
"""
from __future__ import annotations

import json
import os
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ds_spd.errors import PlanError, describe_validation
from ds_spd.core.layout import DEFAULT_TP_GRAIN_SIZE
from ds_spd.outputs import write_atomic

PLAN_FORMAT = "ds_spd.plan/1"
FINGERPRINT_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                    "num_attention_heads", "num_key_value_heads", "vocab_size")


def model_fingerprint(model_config) -> dict:
    return {k: getattr(model_config, k, None) for k in FINGERPRINT_KEYS}


class BlockEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0)
    sensitivity: Optional[float] = None
    cls: Literal["TP", "ISB", "SB", "ESB"] = Field("TP", alias="class")
    head_permutation: Optional[list[int]] = None   # ESB: KV heads in their new order (head grouping)
    mlp_permutation: Optional[list[int]] = None    # ESB: original MLP slice now held by each rank


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    format: Literal["ds_spd.plan/1"] = PLAN_FORMAT
    model: str
    fingerprint: dict
    tp_size: int = Field(ge=1)
    tp_grain_size: int = Field(DEFAULT_TP_GRAIN_SIZE, ge=1)  # AutoTP's MLP split depends on it
    blocks: list[BlockEntry]
    measured_with: dict = Field(default_factory=dict)
    scan: Optional[dict] = None       # how the sensitivities were measured (see ds_spd.stages.scan)
    selection: Optional[dict] = None  # which rule chose the SPD blocks (see ds_spd.planner)
    #: a checkpoint's blocks were distilled with lagged attention (docs/method.md): every run of them uses it
    lag: bool = False

    @property
    def spd_blocks(self) -> list[int]:
        return [b.index for b in self.blocks if b.cls != "TP"]

    @property
    def trained_blocks(self) -> list[int]:
        """The blocks distillation trains (SB and ESB; ISB blocks stay zero-shot)."""
        return [b.index for b in self.blocks if b.cls in ("SB", "ESB")]

    def check_compatible(self, model_config, tp_size: int, tp_grain_size: int | None = None) -> "Plan":
        """Refuse a plan made for another model shape, tp size or (when given) tp grain size."""
        fp = model_fingerprint(model_config)
        diff = {k: (self.fingerprint.get(k), fp[k]) for k in FINGERPRINT_KEYS if self.fingerprint.get(k) != fp[k]}
        if diff:
            detail = ", ".join(f"{k}: plan {a} vs model {b}" for k, (a, b) in diff.items())
            raise PlanError(f"plan was made for another model ({self.model}): {detail}")
        if self.tp_size != tp_size:
            raise PlanError(f"plan was made for tp size {self.tp_size}, not {tp_size}")
        if tp_grain_size is not None and self.tp_grain_size != tp_grain_size:
            raise PlanError(f"plan was made for tp_grain_size {self.tp_grain_size}, not {tp_grain_size}: the MLP "
                            "split differs (set spd.tp_grain_size to the plan's, or scan again)")
        if sorted(b.index for b in self.blocks) != list(range(len(self.blocks))) or \
                len(self.blocks) != fp["num_hidden_layers"]:
            raise PlanError(f"plan lists blocks {[b.index for b in self.blocks]}, the model has "
                            f"{fp['num_hidden_layers']} blocks")
        return self

    @classmethod
    def from_blocks(cls, model_name: str, model_config, tp_size: int, spd_blocks, *,
                    tp_grain_size: int = DEFAULT_TP_GRAIN_SIZE, **measured_with) -> "Plan":
        chosen = set(spd_blocks)
        blocks = [BlockEntry(index=i, **{"class": "ISB" if i in chosen else "TP"})
                  for i in range(model_config.num_hidden_layers)]
        return cls(model=model_name, fingerprint=model_fingerprint(model_config), tp_size=tp_size,
                   tp_grain_size=tp_grain_size, blocks=blocks, measured_with=measured_with)

    def save(self, path: str) -> None:
        """Write atomically: a crash never leaves a half-written plan."""
        write_atomic(path, self.model_dump_json(indent=2, by_alias=True))


def check_spd_blocks(blocks, num_layers: int) -> tuple[int, ...]:
    """Sorted, de-duplicated block indices, each in range, else a :class:`PlanError`."""
    blocks = tuple(sorted(set(int(b) for b in blocks)))
    bad = [b for b in blocks if not 0 <= b < num_layers]
    if bad:
        raise PlanError(f"spd_blocks {bad} out of range: the model has {num_layers} blocks (0..{num_layers - 1})")
    return blocks


def load_plan(path: str) -> Plan:
    if not os.path.isfile(path):
        raise PlanError(f"plan file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return Plan.model_validate(json.load(f))
    except UnicodeDecodeError:
        raise PlanError(f"plan file {path!r} is not UTF-8 text (a binary file?)") from None
    except OSError as err:
        raise PlanError(f"plan file {path!r} cannot be read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise PlanError(f"plan file {path!r} is not valid JSON: {err}") from None
    except ValidationError as err:
        raise PlanError(f"plan file {path!r} is not a valid ds_spd plan: {describe_validation(err, 'key')}") from None
