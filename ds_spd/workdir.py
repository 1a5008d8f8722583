"""The distillation work dir: what makes resuming safe.

``distill`` saves DeepSpeed (or accelerate) training state after every epoch into a work dir and resumes
from it. DeepSpeed's resume unpickles the ``.pt`` files there (``torch.load(weights_only=False)``), so a
work dir is *trusted input*: ds_spd only loads one that it wrote, recognised by ``ds_spd_run.json``, which
holds the run's fingerprint: everything that determines the trained weights (model, plan, tp size and
grain, dtype, calibration data and its file contents, learning rate, micro-batch, seeds, the DeepSpeed
config, the number of ranks, the launcher). The fingerprint is compared *before* any training state is
loaded; a difference is an error naming the keys (``--restart`` discards the old state). The number of
epochs is not part of it: asking for more epochs continues a finished run. Nor is the end-to-end KL stage's
(``kl_epochs``, ``kl_lr``, ``kl_segments``, ``kl_corpora``, ``kl_dtype``, ``kl_blocks``, ``kl_extra_lr``): it
runs after the blocks, from their finished weights, and keeps nothing here, so trying it at another rate reuses
the blocks.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

from ds_spd.errors import OutputError, PlanError
from ds_spd.outputs import check_writable_place, write_json

RUN_FILE = "ds_spd_run.json"
#: Distill settings that do not change what the work dir holds (the blocks' trained weights).
RESUME_NEUTRAL = ("epochs", "kl_epochs", "kl_lr", "kl_segments", "kl_corpora", "kl_dtype", "kl_blocks",
                  "kl_extra_lr")
#: DeepSpeed config keys that do not change the trained weights (logging and profiling).
_NEUTRAL_DS_KEYS = ("steps_per_print", "wall_clock_breakdown", "flops_profiler", "tensorboard", "wandb",
                    "csv_monitor", "comms_logger", "dump_state", "memory_breakdown")


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def data_fingerprint(data) -> dict:
    """A calibration data config (``spd.calibration``), with the content of local files."""
    fp = {"split": data.split, "seed": data.seed, "max_samples": data.max_samples, "seq_len": data.seq_len}
    if data.text:
        fp["text"] = [{"path": os.path.abspath(p), "sha256": file_digest(p)} for p in data.text]
    else:
        fp["dataset"] = data.dataset
    return fp


def run_fingerprint(*, model: str, model_fingerprint: dict, plan_digest: str, tp_size: int, tp_grain_size: int,
                    dtype: str, calibration, settings: dict, ds_config: dict, ranks: int, launcher: str) -> dict:
    return {"model": model, "model_shape": model_fingerprint, "plan": plan_digest, "tp_size": tp_size,
            "tp_grain_size": tp_grain_size, "dtype": dtype, "calibration": data_fingerprint(calibration),
            "settings": _resume_settings(settings),
            "deepspeed": {k: v for k, v in ds_config.items() if k not in _NEUTRAL_DS_KEYS},
            "ranks": ranks, "launcher": launcher}


def _resume_settings(settings: dict) -> dict:
    """The settings that decide the trained weights; one left unset (None) is left out, so a run written before
    that setting existed (which behaves as it being unset) still resumes."""
    return {k: v for k, v in settings.items() if k not in RESUME_NEUTRAL and v is not None}


def comparable(saved: dict) -> dict:
    """A stored fingerprint as :func:`run_fingerprint` makes one now (older ones also held the neutral settings)."""
    if isinstance(saved, dict) and isinstance(saved.get("settings"), dict):
        return {**saved, "settings": _resume_settings(saved["settings"])}
    return saved


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every (dotted) key whose value differs."""
    a, b = _flatten(json.loads(json.dumps(old, default=str))), _flatten(json.loads(json.dumps(new, default=str)))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_run_file(work_dir: str) -> dict | None:
    try:
        with open(os.path.join(work_dir, RUN_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_work_dir(work_dir: str, fingerprint: dict, restart: bool = False) -> str:
    """Before any model is loaded: ``"new"``, ``"resume"`` or ``"restart"``; refuses a work dir ds_spd did
    not write (no fingerprint file) and, without ``restart``, one written for another run."""
    if os.path.lexists(work_dir) and not os.path.isdir(work_dir):
        raise OutputError(f"work dir {work_dir!r} exists and is not a directory")
    check_writable_place(os.path.join(work_dir, RUN_FILE), "work dir", shown=work_dir)
    if not os.path.isdir(work_dir) or not os.listdir(work_dir):
        return "new"
    found = read_run_file(work_dir)
    if found is None or "fingerprint" not in found:
        raise OutputError(f"work dir {work_dir!r} is not empty and has no {RUN_FILE}: it was not written by this "
                          "version of ds_spd. A work dir is trusted input (DeepSpeed unpickles its .pt files), so "
                          "ds_spd refuses it: give another --work-dir, or move it away")
    diff = differences(comparable(found["fingerprint"]), fingerprint)
    if diff and not restart:
        raise PlanError(f"work dir {work_dir!r} holds training state of another run; differing: "
                        f"{'; '.join(diff)}. Pass --restart to discard it and start over, or give another --work-dir")
    return "restart" if diff or restart else "resume"


def prepare_work_dir(work_dir: str, fingerprint: dict, state: str) -> None:
    """On one rank, after :func:`check_work_dir`: discard old state on restart, write the fingerprint file."""
    if state == "restart":
        if read_run_file(work_dir) is None:  # checked before; never delete a directory ds_spd did not write
            raise OutputError(f"work dir {work_dir!r} has no {RUN_FILE}: refusing to delete it")
        shutil.rmtree(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    if state != "resume":
        write_json(os.path.join(work_dir, RUN_FILE), {"fingerprint": fingerprint}, "workdir/1")
