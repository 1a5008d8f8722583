"""Bad input a user may give, as CLI cases: each must be one clear line, exit 2, before any work.

Shared by tests/test_safety.py (which asserts each) and scripts/benchmarks/bad_input_table.py (which measures them all
and writes the table in BENCHMARKS.md). A case is (name, class, setup(tmp, model_dir) -> argv, expected text).
"""
from __future__ import annotations

import json
import os
from typing import Callable

REFUSED_DATA = ["--max-samples", "2", "--seq-len", "24"]   # what a refused command would read: little
TINY_DATA = [*REFUSED_DATA, "--batch-size", "2"]


def _binary(tmp: str, name: str) -> str:
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 8)
    return path


def _text(tmp: str, name: str, content: str) -> str:
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(content)
    return path


def _plan(tmp: str, model_dir: str, **changes) -> str:
    from transformers import AutoConfig

    from ds_spd.plan import Plan
    plan = Plan.from_blocks(model_dir, AutoConfig.from_pretrained(model_dir), 2, [], **changes)
    for b in plan.blocks:
        b.sensitivity = 0.01
    plan.scan = {"metric": "ppl", "baseline": 1.0}
    path = os.path.join(tmp, "plan.json")
    plan.save(path)
    return path


def _foreign_dir(tmp: str) -> str:
    path = os.path.join(tmp, "mine")
    os.makedirs(os.path.join(path, "sub"))
    _text(path, "notes.txt", "my notes")
    return path


def _truncated_checkpoint(tmp: str, model_dir: str) -> str:
    from ds_spd.checkpoint import WEIGHTS
    ck = os.path.join(tmp, "ck")
    os.makedirs(ck)
    plan = _plan(tmp, model_dir)
    os.replace(plan, os.path.join(ck, "plan.json"))
    with open(os.path.join(ck, WEIGHTS), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # a header that does not cover the file
    return ck


def _checkpoint_with_bad_plan(tmp: str) -> str:
    import torch
    from safetensors.torch import save_file

    from ds_spd.checkpoint import WEIGHTS
    ck = os.path.join(tmp, "ck_bad_plan")
    os.makedirs(ck)
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, os.path.join(ck, WEIGHTS))
    _text(ck, "plan.json", json.dumps({"model": 3, "blocks": "all"}))
    return ck


def _checkpoint_of_block_1(tmp: str, model_dir: str) -> str:
    """An SPD checkpoint with block 1 distilled (its weights: the model's own)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ds_spd.checkpoint import save_checkpoint
    from ds_spd.plan import Plan
    cfg = AutoConfig.from_pretrained(model_dir)
    plan = Plan.from_blocks(model_dir, cfg, 2, [1])
    plan.blocks[1].cls = "SB"
    prefix = "model.layers.1."
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    ck = os.path.join(tmp, "ck_block1")
    save_checkpoint(ck, plan, {1: {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}}, cfg, {})
    return ck


def _work_dir_without_fingerprint(tmp: str) -> str:
    work = os.path.join(tmp, "work")
    os.makedirs(work)
    _text(work, "latest", "epoch1")
    return work


V = ["--virtual-tp", "2"]
Case = tuple[str, str, Callable[[str, str], list[str]], str]

CASES: list[Case] = [
    ("binary --config", "unreadable file",
     lambda t, m: ["eval", "--config", _binary(t, "c.json"), "--model", m, *V], "is not UTF-8 text"),
    ("binary plan file", "unreadable file",
     lambda t, m: ["eval", "--plan", _binary(t, "p.json"), "--model", m, *V], "is not UTF-8 text"),
    ("binary --text file", "unreadable file",
     lambda t, m: ["eval", "--text", _binary(t, "t.txt"), "--model", m, *V, *TINY_DATA], "is not UTF-8 text"),
    ("empty --text file", "unreadable file",
     lambda t, m: ["eval", "--text", _text(t, "e.txt", "\n  \n"), "--model", m, *V, *TINY_DATA], "is empty"),
    ("missing --text file, model path missing too (data checked first)", "missing file",
     lambda t, m: ["eval", "--text", os.path.join(t, "none.txt"), "--model", os.path.join(t, "nomodel"), *V],
     "none.txt' not found"),
    ("truncated spd_blocks.safetensors", "unreadable file",
     lambda t, m: ["eval", "--checkpoint", _truncated_checkpoint(t, m), "--model", m, *V],
     "spd_blocks.safetensors' is not a readable safetensors file"),
    ("local model path that does not exist", "missing file",
     lambda t, m: ["eval", "--model", os.path.join(t, "no", "such", "model"), *V], "does not exist"),
    ("hub model id, hub unreachable", "offline hub",
     lambda t, m: ["eval", "--model", "someorg/some-model", *V], "cannot be reached"),
    ("hub --dataset name, hub unreachable", "offline hub",
     lambda t, m: ["eval", "--dataset", "someorg/some-data", "--model", m, *V], "cannot be reached"),
    ("reversed --spd-blocks range", "bad value",
     lambda t, m: ["eval", "--spd-blocks", "3-1", "--model", m, *V], "is reversed"),
    ("scan --out in an unwritable place", "output path",
     lambda t, m: ["scan", "--out", "/proc/ds_spd_test/plan.json", "--model", m, *V, *TINY_DATA], "cannot write"),
    ("scan --out onto a directory", "output path",
     lambda t, m: ["scan", "--out", t, "--model", m, *V, *TINY_DATA], "is a directory"),
    ("scan --out over a file ds_spd did not write", "output path",
     lambda t, m: ["scan", "--out", _text(t, "notes.json", "{}"), "--model", m, *V, *TINY_DATA],
     "was not written by ds_spd"),
    ("plan --out onto a directory", "output path",
     lambda t, m: ["plan", "--plan", _plan(t, m), "--spd-count", "1", "--out", t], "is a directory"),
    ("distill --out onto an existing non-checkpoint directory", "output path",
     lambda t, m: ["distill", "--plan", _plan(t, m), "--model", m, "--out", _foreign_dir(t), *REFUSED_DATA],
     "was not written by ds_spd"),
    ("distill --out onto a file", "output path",
     lambda t, m: ["distill", "--plan", _plan(t, m), "--model", m, "--out", _text(t, "f", "x"), *REFUSED_DATA],
     "is a file"),
    ("distill --out in an unwritable place", "output path",
     lambda t, m: ["distill", "--plan", _plan(t, m), "--model", m, "--out", "/proc/ds_spd_test/ck", *REFUSED_DATA],
     "cannot write"),
    ("distill work dir that ds_spd did not write", "trusted input",
     lambda t, m: ["distill", "--plan", _plan(t, m), "--model", m, "--out", os.path.join(t, "ck"),
                   "--work-dir", _work_dir_without_fingerprint(t), *REFUSED_DATA], "has no ds_spd_run.json"),
    ("eval --spd-blocks outside the checkpoint's SPD blocks", "plan mismatch",
     lambda t, m: ["eval", "--checkpoint", _checkpoint_of_block_1(t, m), "--spd-blocks", "2,3", "--model", m, *V,
                   *TINY_DATA], "blocks [2, 3] are not SPD blocks of checkpoint"),
    ("distill --activation-budget with the joint trainer", "ignored flag",
     lambda t, m: ["distill", "--plan", _plan(t, m), "--model", m, "--trainer", "joint", "--activation-budget", "1",
                   "--out", os.path.join(t, "ck"), *REFUSED_DATA],
     "activation_budget_gb applies to the layerwise trainer only"),
    ("plan for another tp_grain_size", "plan mismatch",
     lambda t, m: ["eval", "--plan", _plan(t, m, tp_grain_size=32), "--model", m, *V], "tp_grain_size 32, not 64"),
    ("a flag the command cannot honour (distill --spd-blocks)", "ignored flag",
     lambda t, m: ["distill", "--plan", _plan(t, m), "--model", m, "--spd-blocks", "1", *REFUSED_DATA],
     "unrecognized arguments: --spd-blocks 1"),
    ("generate with an empty prompt", "bad value",
     lambda t, m: ["generate", "--prompt", "", "--model", m, *V], "an empty prompt has no token"),
    ("generate --chat with a base model (no chat template)", "bad value",
     lambda t, m: ["generate", "--chat", "--prompt", "hi", "--model", m, *V], "has no chat template (a base model)"),
    ("generate --max-new-tokens -1", "bad value",
     lambda t, m: ["generate", "--max-new-tokens", "-1", "--model", m, *V], "--max-new-tokens must be at least 1"),
    ("checkpoint whose plan.json is not a plan", "unreadable file",
     lambda t, m: ["eval", "--checkpoint", _checkpoint_with_bad_plan(t), "--model", m, *V],
     "is not a valid ds_spd plan: key 'model': Input should be a valid string; key 'fingerprint': Field required"),
    ("serve --max-seqs 0", "bad value",
     lambda t, m: ["serve", "--max-seqs", "0", "--model", m, *V], "--max-seqs 0 is out of range: >= 1"),
    ("serve --api-key ''", "bad value",
     lambda t, m: ["serve", "--api-key", " ", "--model", m, *V], "--api-key is out of range: not empty"),
    ("bench-serve --backend without --url", "bad value",
     lambda t, m: ["bench-serve", "--backend", "openai", "--model", m, "--out", os.path.join(t, "bs")],
     "--backend chooses the request form for a running server: it needs --url"),
    ("unknown config key", "bad value",
     lambda t, m: ["eval", "--config", _text(t, "k.json", json.dumps({"spd": {"tp_sise": 2}})), "--model", m, *V],
     "config key 'spd.tp_sise': unknown key"),
]

#: The environment every case runs in: an unreachable hub endpoint (connection refused on loopback), so
#: the "offline" cases do not depend on this machine's network.
ENV = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
