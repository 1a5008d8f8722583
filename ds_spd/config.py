"""The ``"spd"`` section of a DeepSpeed JSON config, validated the way DeepSpeed validates its own.

One JSON file carries DeepSpeed's own keys (left to DeepSpeed) plus::

    "spd": {"model": "default", "tp_size": 2, "spd_blocks": [3, 4, 27], "dtype": "float32",
            "data": {"dataset": "pydoc", "seq_len": 256, "max_samples": 8}}

An unknown key or a bad value is a :class:`ConfigError` naming the key, raised before any rank works.
"""
from __future__ import annotations

import json
import os
from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ds_spd.choices import (COMM_PATHS, DISTILL_TRAINERS, DTYPES, HEAD_GROUPINGS, INPUT_SOURCES, KL_STAGE_BLOCKS,
                            KL_STAGE_DTYPES, LOAD_MODES, LR_SCHEDULES, MLP_MATCHINGS, SCAN_HEAD_DTYPES, SCAN_METHODS,
                            SCAN_METRICS, SCAN_RANKINGS)
from ds_spd.embedded import COMMON_RECIPE, embedded
from ds_spd.errors import ConfigError, describe_validation
from ds_spd.core.layout import DEFAULT_TP_GRAIN_SIZE


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    #: fields whose value is one of a fixed set (each a flag with those choices: ds_spd.cli)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    @field_validator("*")
    @classmethod
    def _choice(cls, v, info: ValidationInfo):
        allowed = cls.CHOICES.get(info.field_name)
        return v if allowed is None else _one_of(v, allowed)


class DataConfig(_Strict):
    """Evaluation / calibration text: local files, a shipped corpus, or a hub dataset."""

    text: Optional[list[str]] = Field(None, description="local text files, read with datasets' 'text' loader")
    dataset: str = Field("pydoc", description="shipped corpus (pydoc, shakespeare, docstrings, code), hub "
                         "name[:config], or a mixture of them with equal shares (pydoc+shakespeare)")
    split: str = "test"
    seq_len: int = Field(256, ge=2)
    max_samples: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    seed: Optional[int] = Field(None, description="draw max_samples random segments (else the first ones)")

    @field_validator("text", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    def source(self) -> dict:
        """What a result reports it read: the files, or the dataset (a mixture's names), and the split."""
        return {"text": self.text, "dataset": None if self.text else self.dataset, "split": self.split}


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)}")
    return value


class DistillConfig(_Strict):
    """Block-to-block distillation (paper defaults: 10 epochs, AdamW lr 5e-5, inputs from the original model).
    Each field is also a ``distill`` flag (ds_spd.cli)."""

    SECTION: ClassVar[str] = "distill"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "input_source": INPUT_SOURCES, "trainer": DISTILL_TRAINERS, "head_grouping": HEAD_GROUPINGS,
        "mlp_matching": MLP_MATCHINGS, "schedule": LR_SCHEDULES, "kl_dtype": KL_STAGE_DTYPES,
        "kl_blocks": KL_STAGE_BLOCKS}

    epochs: int = Field(8, ge=1, description="training epochs per block (fewer with patience)")
    lr: Optional[float] = Field(None, gt=0, description="AdamW learning rate (default: scaled to the trained blocks' "
                                "weights, ds_spd.stages.lr: 1e-3 on SmolLM2, 2e-4 on Gemma 3 270M)")
    input_source: str = Field("original", description=f"one of {INPUT_SOURCES}: block inputs from the original "
                              "model with its outputs as targets (paper); from the plan's zero-shot SPD prefix "
                              "with the teacher run on them as targets; or from the chain as it will run (the "
                              "blocks before in their trained SPD form) with the original model's outputs as "
                              "targets, so each block learns to undo the drift before it (layerwise only)")
    loss_window: int = Field(0, ge=0, description="layerwise: measure each trained block's error after this many "
                             "following original blocks (frozen), against the original model's outputs there: an "
                             "error counts by what it does downstream (0: at the block's own output, the paper's)")
    lag: bool = Field(False, description="lagged attention: each rank's MLP in an SPD block also reads the other "
                      "ranks' attention output one position late (kept from the step before in decode, where the "
                      "block's one sync carries it; a prefill syncs twice a block); the checkpoint records it and "
                      "every run of it uses it. Pre-norm blocks only; SmolLM2's recipe turns it on (docs/method.md)")
    hg_segments: int = Field(8, ge=1, description="calibration segments for head grouping (ESB)")
    esb_segments: Optional[int] = Field(None, ge=1, description="layerwise, original inputs: calibration segments "
                                        "the extremely sensitive (ESB) blocks read, held-out ones included "
                                        "(default: those the other blocks read); on SmolLM2 one such block costs "
                                        "what twenty others do, and more text lowers it (docs/experiments.md)")
    esb_segments_min_sensitivity: Optional[float] = Field(None, ge=0, description="with esb_segments: only the "
                                                         "ESB blocks whose relative sensitivity (the plan's, as "
                                                         "the planner classes blocks by) is at least this read "
                                                         "their own segments (default: every ESB block)")
    out: str = Field("runs/spd_checkpoint", description="the SPD checkpoint directory written")
    work_dir: Optional[str] = Field(None, description="ZeRO training checkpoints for resuming (default: OUT.work)")
    trainer: str = Field("layerwise", description=f"one of {DISTILL_TRAINERS}: one block resident at a time, read "
                         "from the model's safetensors files (layerwise), or all trained blocks of a loaded model "
                         "in one engine (joint); both train the same weights")
    activation_budget_gb: Optional[float] = Field(None, ge=0, description="layerwise: activations kept in RAM per "
                                                  "rank (GiB); more go to files in the work dir (default: a quarter "
                                                  "of the available memory, shared by the host's ranks)")
    head_grouping: str = Field("all", description=f"one of {HEAD_GROUPINGS}: which trained blocks get head grouping "
                               "first (the permutation keeps plain TP's function)")
    mlp_matching: str = Field("neuron", description=f"head grouping's MLP step, one of {MLP_MATCHINGS}: the MLP "
                              "slice each head group keeps (paper), or every neuron to the rank where its SPD "
                              "activation stays closest to its TP one (acts at one KV head per rank too)")
    schedule: str = Field("cosine", description=f"learning-rate schedule, one of {LR_SCHEDULES}")
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of the steps with a linear learning-rate warm-up")
    val_segments: Optional[int] = Field(None, ge=0, description="calibration segments held out of training: each "
                                        "block keeps the weights of its epoch with the lowest MSE on them, its "
                                        "starting weights included (0: the last epoch's; default: an eighth of the "
                                        "segments)")
    patience: Optional[int] = Field(None, ge=1, description="stop a block after this many epochs without a lower "
                                    "held-out MSE (needs held-out segments; default 2)")
    kl_epochs: int = Field(0, ge=0, description="after B2B: epochs of end-to-end distillation (KL of the SPD "
                           "model's next-token distribution to the TP model's), training only the distilled blocks; "
                           "needs the whole model in one process (refused before any work where it does not fit); "
                           "SmolLM2's recipe: 1 epoch over its 512 stage segments, 2 where the user sets the "
                           "segments; Gemma 3's: 2 (chosen on validation; docs/experiments.md), other models: off")
    kl_lr: Optional[float] = Field(None, gt=0, description="learning rate of the end-to-end stage (default: the "
                                   "blocks' lr / 20, ds_spd.stages.lr.kl_stage_lr: 1e-5 on Gemma 3 270M; SmolLM2's "
                                   "recipe 1e-4, chosen on its stage's segments; chosen on validation on both)")
    kl_segments: Optional[int] = Field(None, ge=1, description="calibration segments the end-to-end stage reads, "
                                       "held-out ones included (default: those the blocks read); it keeps no "
                                       "activations, so more cost time, not memory")
    kl_corpora: Optional[str] = Field(None, description="the corpora the end-to-end stage reads, a mixture as "
                                      "calibration.dataset takes (default: those the blocks read)")
    kl_dtype: str = Field("float32", description=f"one of {KL_STAGE_DTYPES}: the end-to-end stage's training passes "
                          "through the blocks under autocast in bf16, or in fp32 (the head, the KL and the held-out "
                          "epoch choice stay fp32); auto: bf16 where its matmul is faster than fp32 here (GPUs, "
                          "CPUs with bf16 units), measured once")
    kl_blocks: str = Field("distilled", description=f"one of {KL_STAGE_BLOCKS}: the blocks the end-to-end stage "
                           "trains: the distilled ones, or every block in the form the plan runs it in (the blocks "
                           "left in TP form and the zero-shot ones too; the checkpoint then stores them all and a "
                           "run loads each where it runs the block in that form)")
    kl_extra_lr: Optional[float] = Field(None, gt=0, description="with kl_blocks all: the learning rate of the "
                                         "blocks the stage trains beyond the distilled ones (default: kl_lr)")
    segments: Optional[int] = Field(None, ge=1, description="calibration segments distillation reads, held-out "
                                    "ones included (default: calibration.max_samples, the scan's count)")
    corpora: Optional[str] = Field(None, description="the corpora distillation reads, a mixture as calibration.dataset "
                                   "takes (default: the scan's calibration.dataset with the stdlib's docstrings added "
                                   "where that is the default mixture, else calibration.dataset)")

    @model_validator(mode="after")
    def _budget_needs_layerwise(self):
        if self.activation_budget_gb is not None and self.trainer != "layerwise":
            raise ValueError("activation_budget_gb applies to the layerwise trainer only")
        if self.patience is not None and self.val_segments == 0:
            raise ValueError("patience needs held-out segments (val_segments > 0) to measure improvement on")
        if self.loss_window and self.trainer != "layerwise":
            raise ValueError("loss_window applies to the layerwise trainer only")
        if self.input_source == "chain" and self.trainer != "layerwise":
            raise ValueError("input_source 'chain' trains the blocks in order, each on the outputs of those trained "
                             "before it: the layerwise trainer only")
        if self.esb_segments is not None and (self.trainer != "layerwise" or self.input_source != "original"):
            raise ValueError("esb_segments walks the original model's inputs on the extremely sensitive blocks' own "
                             "segments: the layerwise trainer with input_source 'original' only")
        if self.esb_segments_min_sensitivity is not None and self.esb_segments is None:
            raise ValueError("esb_segments_min_sensitivity chooses which ESB blocks read esb_segments: set "
                             "esb_segments")
        if self.kl_extra_lr is not None and self.kl_blocks != "all":
            raise ValueError("kl_extra_lr is the rate of the blocks the end-to-end stage trains beyond the distilled "
                             "ones: it needs kl_blocks 'all'")
        return self


class ScanConfig(_Strict):
    """How ``scan`` measures and ranks the blocks; each field is also a ``scan`` flag (ds_spd.cli)."""

    SECTION: ClassVar[str] = "scan"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "method": SCAN_METHODS, "metric": SCAN_METRICS, "ranking": SCAN_RANKINGS, "head_dtype": SCAN_HEAD_DTYPES}

    method: str = Field(SCAN_METHODS[0], description=f"one of {SCAN_METHODS}: each block alone in SPD form, or the "
                        "paper's (last block first, cumulatively)")
    metric: str = Field(SCAN_METRICS[0], description=f"one of {SCAN_METRICS}: a block's cost as the change of "
                        "perplexity (the paper's; its sign rewards a change that suits the calibration text) or as "
                        "the KL divergence from the TP model's next-token distribution (never below 0)")
    ranking: str = Field(SCAN_RANKINGS[0], description=f"one of {SCAN_RANKINGS}: each block's zero-shot cost, or its "
                         "cost alone after distilling every block once with the distill settings (kept beside the "
                         "plan, resumable; docs/recovery.md)")
    head_dtype: str = Field(SCAN_HEAD_DTYPES[0], description=f"one of {SCAN_HEAD_DTYPES}: the head's matmul while "
                            "scoring (logits and softmax stay fp32); auto: bf16 where it is faster than fp32 here "
                            "(GPUs, CPUs with bf16 units), measured once")
    ranking_split: str = Field("validation", description="the calibration corpus's split a distilled ranking is "
                               "measured on (unless --split is given): text distillation did not train on, since "
                               "costs on the training text favour the blocks that fit it best (docs/recovery.md)")

    @model_validator(mode="after")
    def _distilled_is_isolated(self):
        if self.ranking == "distilled" and self.method != "isolated":
            raise ValueError("ranking 'distilled' measures each distilled block alone: method must be 'isolated'")
        return self


class SPDConfig(_Strict):
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"comm": COMM_PATHS, "load": LOAD_MODES, "dtype": DTYPES}

    model: str = Field("default", description="'default' (embedded SmolLM2-135M), a local HF directory or a hub id")
    tp_size: int = Field(2, ge=1)
    spd_blocks: Optional[list[int]] = None
    plan: Optional[str] = None
    checkpoint: Optional[str] = Field(None, description="SPD checkpoint dir (distilled blocks + their plan)")
    dtype: str = Field("float32", description=f"one of {DTYPES}")
    comm: str = "auto"
    load: str = Field("sharded", description=f"real TP weight loading, one of {LOAD_MODES}: each rank reads only "
                      "its slices from safetensors (sharded) or loads the full model before AutoTP shards it (full)")
    tp_grain_size: int = Field(DEFAULT_TP_GRAIN_SIZE, ge=1)
    data: DataConfig = Field(default_factory=DataConfig, description="held-out evaluation text (eval)")
    calibration: DataConfig = Field(default_factory=lambda: DataConfig(dataset="pydoc+shakespeare", split="train",
                                                                       max_samples=64, seed=0),
                                    description="calibration text (scan, distill): a mixture, so the distilled blocks "
                                                "do not fit one corpus")
    scan: ScanConfig = Field(default_factory=ScanConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _one_block_source(self):
        if self.spd_blocks is not None and self.plan is not None:
            raise ValueError("give spd_blocks or plan, not both")
        if self.checkpoint is not None and self.plan is not None:
            raise ValueError("give plan or checkpoint (which holds its plan), not both")
        return self

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype)

    def updated(self, **changes) -> "SPDConfig":
        """A copy with ``changes``, validated again (pydantic's model_copy does not validate)."""
        try:
            return SPDConfig.model_validate({**self.model_dump(), **changes})
        except ValidationError as err:
            raise ConfigError(describe_validation(err, "config key", "spd")) from None


def parse_block_list(text: str) -> list[int]:
    """``"3,4,27"`` or ranges ``"0-4,27"``; ``""`` / ``"none"`` is no block. A reversed range is an error."""
    blocks: list[int] = []
    if text.strip().lower() in ("", "none"):
        return blocks
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError(f"bad block list {text!r}: use e.g. 3,4,27 or 20-29") from None
        if last < first:
            raise ConfigError(f"bad block list {text!r}: range {part.strip()!r} is reversed (write {last}-{first})")
        blocks.extend(range(first, last + 1))
    return blocks


def build_spd_config(section: dict[str, Any], prefix: str = "spd") -> SPDConfig:
    try:
        return SPDConfig(**section)
    except ValidationError as err:
        raise ConfigError(describe_validation(err, "config key", prefix)) from None


def load_ds_config(path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON config file (with or without an ``"spd"`` section)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (a binary file?)") from None
    except OSError as err:
        raise ConfigError(f"config file {path!r} cannot be read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path!r} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {path!r} must hold a JSON object")
    return cfg


def _section_or_default(section: dict[str, Any], part: str) -> dict[str, Any]:
    """The config's ``part`` section as given, or its defaults (to merge keys into)."""
    return section.get(part) or SPDConfig.model_fields[part].default_factory().model_dump()


def _model_recipe(section: dict[str, Any], model: str, flags: set[str]) -> None:
    """Fill the keys an embedded model's recipe sets (ds_spd.embedded.EmbeddedModel.recipe), and those every model
    gets (ds_spd.embedded.COMMON_RECIPE), where neither the section nor a flag (``flags``: dotted keys) sets them,
    nor the keys the entry names as overriding it."""
    found = embedded(model) if isinstance(model, str) else None
    explicit = {f"{part}.{key}" for part, keys in section.items() if isinstance(keys, dict) for key in keys} | flags
    for dotted, value, *overridden_by in (*COMMON_RECIPE, *(found.recipe if found else ())):
        if dotted in explicit or explicit.intersection(overridden_by):
            continue
        part, key = dotted.split(".")
        section[part] = {**_section_or_default(section, part), key: value}


def resolve_spd_config(config=None, **overrides) -> SPDConfig:
    """Build an SPDConfig from a path, a DS config dict, an "spd" dict or an SPDConfig; non-None overrides win."""
    if isinstance(config, SPDConfig):
        section = config.model_dump()
    else:
        is_file = isinstance(config, (str, os.PathLike))
        config = load_ds_config(str(config)) if is_file else dict(config or {})
        # a file is a DeepSpeed config (its "spd" section may be absent); a dict is one if it has "spd",
        # else it is the "spd" section itself
        section = config.get("spd", {}) if is_file or "spd" in config else config
        if not isinstance(section, dict):
            raise ConfigError("config key 'spd' must be a JSON object")
    section = dict(section)
    data_over = overrides.pop("data", None) or {}
    data_key = overrides.pop("data_section", "data")
    flags = {f"{data_key}.{k}" for k, v in data_over.items() if v is not None}
    parts = {part: {k: v for k, v in (overrides.pop(part, None) or {}).items() if v is not None}
             for part in ("scan", "distill")}   # a command's own flags, by config section
    flags |= {f"{part}.{key}" for part, given in parts.items() for key in given}
    _model_recipe(section, overrides.get("model") or section.get("model", "default"), flags)
    # a partial section keeps its other keys' defaults (calibration's are not DataConfig's: the train split);
    # merged after the recipe, which must see only what the user set
    for part in ("data", "calibration", "scan", "distill"):
        if isinstance(section.get(part), dict):
            section[part] = {**_section_or_default({}, part), **section[part]}
    for part, given in parts.items():
        if given:
            section[part] = {**_section_or_default(section, part), **given}
    for key, value in overrides.items():
        if value is not None:
            section[key] = list(value) if key == "spd_blocks" else value
            # a block source given as an override replaces the config's (spd_blocks given together with a
            # checkpoint pick a subset of its blocks)
            for dropped in {"spd_blocks": ("plan",), "checkpoint": ("plan", "spd_blocks"),
                            "plan": ("spd_blocks", "checkpoint")}.get(key, ()):
                if dropped not in overrides or overrides[dropped] is None:
                    section.pop(dropped, None)
    if data_over:
        section[data_key] = {**_section_or_default(section, data_key),
                             **{k: v for k, v in data_over.items() if v is not None}}
    return build_spd_config(section)
