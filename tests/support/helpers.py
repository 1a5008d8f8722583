"""Tiny random LLaMA-family models (with a tiny trained tokenizer) and launcher helpers for the tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from cli_batch import snapshot as file_tree  # noqa: F401  (a snapshot of a folder, to prove nothing changed)

from ds_spd.ports import free_port  # noqa: F401  (the tests' way to pick a port)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# 6 query / 3 KV heads: tp 2 splits it unevenly (4+2 query heads), like SmolLM2's 9/3 -> 6+3.
UNEVEN = dict(hidden_size=96, intermediate_size=200, num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=3, head_dim=16)
# 8 query / 4 KV heads: tp 2 splits it evenly.
EVEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, head_dim=8)


# One KV head, 4 query heads: tp 2 and 4 need KV-head replication (Gemma 3 270M's shape).
KV1 = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=1, head_dim=16)
# SmolLM2's head shape (9 query / 3 KV heads): tp 6 replicates each KV head on 2 ranks (2 + 1 query heads).
SMOL_HEADS = dict(hidden_size=72, intermediate_size=384, num_hidden_layers=3, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=8)


def tiny_config(model_type: str = "llama", vocab_size: int = 384, **overrides):
    from transformers import AutoConfig
    kwargs = {**UNEVEN, "vocab_size": vocab_size, "max_position_embeddings": 512, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def independent_split(config, tp: int, grain: int = 64) -> tuple[list[int], list[int]]:
    """Per-rank o_proj input columns and MLP columns, computed here from the rule DeepSpeed AutoTP documents
    (not from ds_spd's TPLayout, which the test references must not reuse): whole KV groups per rank, the
    first ``n_kv % tp`` ranks one group more; MLP columns in units of ``grain``, the first ranks one unit
    more, the remainder below one unit to the last rank."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    units, rest = divmod(config.intermediate_size, grain)
    mlp = [(units // tp + (r < units % tp)) * grain for r in range(tp)]
    mlp[-1] += rest
    if tp > n_kv:   # vLLM's replication: tp/n_kv consecutive ranks share a KV head and split its query heads
        share = tp // n_kv
        heads = [group // share + (r % share < group % share) for r in range(tp)]
        return [h * head_dim for h in heads], mlp
    kv = [n_kv // tp + (r < n_kv % tp) for r in range(tp)]
    return [k * group * head_dim for k in kv], mlp


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():  # larger than the default init so that SPD visibly changes the output
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def tiny_tokenizer(vocab_size: int = 384):
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def save_tiny(path: str, **overrides) -> str:
    tiny_model(**overrides).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE")


def clean_env(**extra) -> dict:
    """This process's environment without the distributed variables an in-process test may have set."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    return {**env, "PYTHONPATH": ROOT, **extra}


def launch(args: list[str], nprocs: int = 2, timeout: int = 600, module: bool = False,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``deepspeed --num_gpus nprocs [--module] args`` on CPU ranks, as a user would."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", str(nprocs), "--master_port", str(free_port())]
    cmd += (["--module"] if module else []) + args
    full_env = clean_env(OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def launch_workers(args: list[str], nprocs: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a library-level worker script (tests/support/*_worker.py) on ``nprocs`` CPU ranks under torchrun: the
    deepspeed launcher's own two processes cost about 4 s of CPU a launch, and what these workers test is the
    library under any launcher (the CLI's tests use the deepspeed launcher, as the README does)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
           "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=clean_env(OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def last_json(stdout: str) -> dict:
    """The command's JSON line: its last stdout line, before any lines the deepspeed launcher logs at exit."""
    return json.loads([line for line in stdout.strip().splitlines() if line.startswith("{")][-1])


def run_cli(args: list[str], timeout: int = 600, check: bool = True, env: dict | None = None,
            runner: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m ds_spd ARGS`` (or ``runner + ARGS``) in a clean environment (plus ``env``)."""
    env = clean_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), **(env or {}))
    proc = subprocess.run([*(runner or [sys.executable, "-m", "ds_spd"]), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"ds_spd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def cli_json(args: list[str], capsys) -> dict:
    """``ds-spd ARGS --json`` through the CLI's main in this process (no interpreter start): its JSON line."""
    from ds_spd.cli import main
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return last_json(capsys.readouterr().out)


def run_cli_batch(argvs: list, workdir: str, env: dict | None = None) -> list[dict]:
    """Several ``ds-spd`` command lines through the CLI's main in one process (tests/support/cli_batch.py: one
    interpreter start instead of one per command; a case may ask for snapshots of folders after it); per command
    its code, stdout, stderr, seconds (and snapshots)."""
    os.makedirs(workdir, exist_ok=True)
    cases, results = os.path.join(workdir, "cases.json"), os.path.join(workdir, "results.json")
    with open(cases, "w") as f:
        json.dump(argvs, f)
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "support", "cli_batch.py"), cases, results], check=True,
                   cwd=ROOT, timeout=600, env=clean_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
                                                        **(env or {})))
    with open(results) as f:
        return json.load(f)


def shm_buffers() -> set[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (ds_spd unlinks each once every rank has mapped it)."""
    return {f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer")} \
        if os.path.isdir("/dev/shm") else set()


def assert_no_shm_left(before: set[str], what: str, wait: float = 20.0) -> None:
    """No buffer that was not there before persists: one another test's launch is creating right now (tests
    may run in parallel) is unlinked within seconds, a leaked one stays."""
    import time
    end = time.monotonic() + wait
    while (left := shm_buffers() - before) and time.monotonic() < end:
        time.sleep(0.5)
    assert not left, f"{what} left DeepSpeed's shm all-reduce buffer in /dev/shm: {sorted(left)}"


def check_tp_worker(results: list[dict], blocks: list[int], name: str) -> None:
    """The per-rank results of tests/support/tp_worker.py for one model: AutoTP's shards on every layer == the
    layout; SPD off == HF, real == virtual with SPD on ``blocks``, SPD really changed the function; 2 all-reduces
    per non-SPD block, 1 per SPD block, +1 for AutoTP's row-parallel lm_head; generation identical on every path
    and every rank; the same with lagged attention where the family has pre-norm blocks."""
    for rank, res in enumerate(results):
        assert set(res["local_o_proj_cols_per_layer"]) == {res["layout_attn_cols"][rank]}, name
        assert set(res["local_mlp_cols_per_layer"]) == {res["layout_mlp_cols"][rank]}, name
        assert res["off_vs_hf"] < 1e-5 and res["real_vs_virtual"] < 1e-5 and res["spd_vs_hf"] > 1e-3, (name, res)
        n = res["n_layers"]
        assert res["off_allreduce"]["allreduce_per_forward"] == 2 * n + 1, name
        assert res["spd_allreduce"]["allreduce_per_forward"] == 2 * n - len(blocks) + 1, name
        assert res["all_spd_allreduce"]["allreduce_per_forward"] == n + 1, name
        assert res["gen_real"] == res["gen_virtual"] == res["gen_nocache"], name
        if "lag_gen" in res:   # lagged attention (pre-norm): a full forward syncs twice a block
            assert res["lag_real_vs_virtual"] < 1e-5 and res["lag_allreduce"]["allreduce_per_forward"] == 2 * n + 1
            assert res["lag_gen"][0] == res["lag_gen"][1] == res["lag_gen"][2], name
            assert res["lag_gen"][0] == results[0]["lag_gen"][0], name
    assert all(res["gen_real"] == results[0]["gen_real"] for res in results), name


# ---------------------------------------------------------------- shared by several test files

#: DeepSpeed ZeRO-2 on CPU ranks for the distillation tests (torch AdamW, no per-step prints)
CPU_ZERO2 = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
             "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.0, "torch_adam": True}}}

DISTILL_DATA = ["--max-samples", "8", "--seq-len", "24"]   # distill's micro-batch is the DeepSpeed config's
DATA = [*DISTILL_DATA, "--batch-size", "4"]


def plan_of_classes(model, classes):
    """A plan for ``model`` (virtualized, or anything with a ``config``) with these block classes."""
    from ds_spd.plan import Plan
    tp = model.spd_layout.tp_size if hasattr(model, "spd_layout") else 2   # a virtualized model, or a bare config
    plan = Plan.from_blocks("tiny", model.config, tp, [])
    for b, c in zip(plan.blocks, classes):
        b.cls, b.sensitivity = c, 0.1
    return plan


def tiny_plan_file(model_dir, tmp_path, classes):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    plan = plan_of_classes(type("M", (), {"config": cfg})(), classes)
    plan.model = model_dir
    path = str(tmp_path / "plan.json")
    plan.save(path)
    return path


def spd_checkpoint(model_dir: str, path: str, blocks, tuned=(), lag: bool = False) -> str:
    """An SPD checkpoint of ``model_dir`` whose distilled ``blocks`` (and ``tuned`` TP-form blocks, as ``distill
    --kl-blocks all`` stores them) hold other (random) weights than the base model's; ``lag``: its plan says they
    were distilled with lagged attention."""
    from transformers import AutoConfig

    from ds_spd.checkpoint import save_checkpoint
    from ds_spd.plan import Plan
    cfg = AutoConfig.from_pretrained(model_dir)
    plan = Plan.from_blocks(model_dir, cfg, 2, list(blocks))
    plan.lag = lag
    for b in blocks:
        plan.blocks[b].cls = "SB"
    other = tiny_model(cfg.model_type, seed=7).state_dict()
    states = {}
    for b in (*blocks, *tuned):
        prefix = f"model.layers.{b}."
        states[b] = {k[len(prefix):]: v for k, v in other.items() if k.startswith(prefix)}
    save_checkpoint(path, plan, states, cfg, {}, tuned=list(tuned))
    return path


#: tiny configs of every family beyond LLaMA (model type, overrides)
FAMILIES = {
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),   # q/k/v biases
    "llama3-rope": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", dict(hidden_act="gelu_pytorch_tanh")),
    "phi3": ("phi3", dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    "gemma2": ("gemma2", dict(sliding_window=8, query_pre_attn_scalar=16)),
    "gemma3": ("gemma3_text", dict(sliding_window=8, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"] * 2)),
}


#: One KV head, 4 query heads, 4 blocks: tp 2 and 4 replicate the KV head (Gemma 3 270M's shape).
KV1_SHAPE = {**KV1, "num_hidden_layers": 4}


# ---------------------------------------------------------------- the README's path, quick preset

QUICK = ["--max-samples", "2", "--seq-len", "32", "--batch-size", "2"]


def readme_path(model: str, tmp_path, extra: list[str] = ()) -> tuple[dict, dict, str]:
    """The README's scan -> plan (3 blocks) -> distill through the CLI, quick preset, on ``model``; asserts every
    chosen block that changes the model is trained; (scan JSON, distill JSON, plan path)."""
    from ds_spd.plan import load_plan
    from ds_spd.stages.planner import relative
    plan, ckpt = str(tmp_path / "plan.json"), str(tmp_path / "ckpt")
    # one process (the shipped models' rankings are zero-shot: distill is its only training run)
    results = run_cli_batch([
        ["scan", "--model", model, "--tp", "2", *QUICK, *extra, "--out", plan, "--json"],
        ["plan", "--plan", plan, "--spd-count", "3", "--json"],
        ["distill", "--model", model, "--plan", plan, *QUICK[:4], *extra, "--epochs", "1", "--out", ckpt, "--json"]],
        str(tmp_path / "batch"))
    assert [r["code"] for r in results] == [0, 0, 0], [r["stderr"][-3000:] for r in results]
    scan, _, distill = (last_json(r["stdout"]) for r in results)
    chosen = load_plan(plan)
    rel = relative(chosen)
    costly = {i for i in chosen.spd_blocks if rel[i] != 0}
    trained = {int(i) for i in distill["final_mse"]}
    assert len(chosen.spd_blocks) == 3 and costly and costly <= trained   # nothing that changes the model untrained
    assert trained == {b.index for b in chosen.blocks if b.cls in ("SB", "ESB")}
    with open(f"{ckpt}/provenance.json") as f:
        assert set(json.load(f)["final_mse"]) == {str(i) for i in trained}
    return scan, distill, plan


def _mlp_parts(mlp):
    """gate, up, down weights, their biases (gate, up) and the activation, read straight from the HF module."""
    if hasattr(mlp, "gate_up_proj"):   # fused (Phi-3)
        gate, up = mlp.gate_up_proj.weight.chunk(2)
        return gate, up, None, None, mlp.down_proj.weight, mlp.activation_fn
    return (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.gate_proj.bias, mlp.up_proj.bias, mlp.down_proj.weight,
            mlp.act_fn)


def reference_logits(model, ids, tp: int, blocks, lag: bool = False) -> torch.Tensor:
    """The SPD block math (docs/method.md section 1) computed with hooks on the unmodified HF model, no ds_spd block
    code: the one reference the block tests and the family tests compare with.

    A pre-hook on o_proj captures the concatenated head outputs; a hook on each SPD layer replaces its output by
    pre-norm  X + sum_r [Y_r + MLP_r(N2(X + Y_r + L_r + b_o))] + b_o + b_d;
    sandwich  X + Na(sum_r Y_r) + No(sum_r MLP_r(Nf(X + Na(Y_r)))).
    L_r = 0, or with ``lag`` (pre-norm) the other ranks' sum_s Y_s - Y_r one position late, 0 at the first.
    The split is computed independently (:func:`independent_split`) and checked against ds_spd's layout."""
    import copy

    import torch.nn.functional as F

    from ds_spd.core.layout import TPLayout
    model = copy.deepcopy(model)
    attn_cols, mlp_cols = independent_split(model.config, tp)
    layout = TPLayout.for_model(model.config, tp)
    assert (attn_cols, mlp_cols) == (list(layout.attn_cols), list(layout.mlp_cols))
    starts = [sum(attn_cols[:r]) for r in range(tp)]
    for i, layer in enumerate(model.model.layers):
        if i not in blocks:
            continue
        heads = {}
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, heads=heads: heads.__setitem__("h", args[0]))

        def replace(layer, args, kwargs, output, heads=heads):
            x = args[0] if args else kwargs["hidden_states"]
            gate, up, g_b, u_b, down, act = _mlp_parts(layer.mlp)
            o_b = layer.self_attn.o_proj.bias if layer.self_attn.o_proj.bias is not None else 0
            d_b = layer.mlp.down_proj.bias if layer.mlp.down_proj.bias is not None else 0
            sandwich = hasattr(layer, "pre_feedforward_layernorm")
            ys = [heads["h"][..., a0:a0 + a] @ layer.self_attn.o_proj.weight[:, a0:a0 + a].T
                  for a0, a in zip(starts, attn_cols)]
            zs, m0 = [], 0
            for y, m in zip(ys, mlp_cols):
                lagged = F.pad((sum(ys) - y)[..., :-1, :], (0, 0, 1, 0)) if lag else 0
                u = (layer.pre_feedforward_layernorm(x + layer.post_attention_layernorm(y)) if sandwich
                     else layer.post_attention_layernorm(x + y + lagged + o_b))
                g, h = u @ gate[m0:m0 + m].T, u @ up[m0:m0 + m].T
                if g_b is not None:
                    g, h = g + g_b[m0:m0 + m], h + u_b[m0:m0 + m]
                zs.append((act(g) * h) @ down[:, m0:m0 + m].T)
                m0 += m
            if sandwich:
                return x + layer.post_attention_layernorm(sum(ys)) + layer.post_feedforward_layernorm(sum(zs))
            return x + sum(ys) + sum(zs) + o_b + d_b
        layer.register_forward_hook(replace, with_kwargs=True)
    with torch.no_grad():
        return model(ids).logits
